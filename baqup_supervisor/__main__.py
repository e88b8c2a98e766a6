"""`python -m baqup_supervisor` is `baqup-run`."""

from .cli import run_main

if __name__ == "__main__":
    run_main()
