"""`python -m baqup_supervisor` is `baqup-run`."""

from .entry import main  # first: it blocks the job's signals before any other import

if __name__ == "__main__":
    main()
