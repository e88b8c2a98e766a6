"""A fleet job's child: write the artifact, wait for GO, then report progress.

usage: fleet_child.py GOFILE STEPS STEP_SECONDS
Every job of the fleet starts (and sits in RUNNING, heartbeating) until the harness
creates GOFILE once all of them are up; then each child sleeps STEPS x STEP_SECONDS,
writing one progress line to $BAQUP_CONTROL_FD per step.
"""

import os
import sys
import time


def main() -> None:
    go, steps, step = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    with open(os.path.join(os.environ["BAQUP_WORK_DIR"], "out.txt"), "w") as handle:
        handle.write("ok\n")
    while not os.path.exists(go):
        time.sleep(0.25)
    fd = int(os.environ.get("BAQUP_CONTROL_FD", "3"))
    for index in range(1, steps + 1):
        os.write(fd, b'{"type":"progress","percent_complete":%d}\n' % (index * 100 // steps))
        time.sleep(step)


if __name__ == "__main__":
    main()
