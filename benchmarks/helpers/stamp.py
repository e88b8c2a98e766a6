"""Start-up probe: the child's first instruction records time.time_ns() to argv[1]."""

import sys
import time

STAMP = time.time_ns()
with open(sys.argv[1], "w") as handle:
    handle.write(str(STAMP))
