"""Control-channel load: write JSON lines to $BAQUP_CONTROL_FD as fast as possible.

usage: flood.py MODE COUNT RESULT [STOPFILE]
  MODE   mixed (progress and event lines, alternating), events (event lines only),
         until (mixed lines until STOPFILE exists; COUNT is ignored)
Each write is timed; RESULT receives {lines, seconds, max_write_ms, writes_over_1ms,
writes_over_10ms} as JSON. Under baqup-run an artifact is written so the job succeeds.
"""

import json
import os
import sys
import time

CODES = 50


def line(index: int, mode: str, total: int) -> bytes:
    if mode == "events" or index & 1:
        return (
            b'{"type":"event","severity":"warn","code":"FILE_CHANGED_%d",'
            b'"message":"file changed while it was read","path":"/data/d%d/f%d.dat"}\n'
            % (index % CODES, index % 500, index)
        )
    return (
        b'{"type":"progress","percent_complete":%d,"bytes_processed":%d,'
        b'"files_processed":%d,"current_file":"/data/d%d/f%d.dat"}\n'
        % (index * 100 // max(total, 1), index * 4096, index, index % 500, index)
    )


def main() -> None:
    mode, count, result = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    stop = sys.argv[4] if len(sys.argv) > 4 else None
    fd = int(os.environ.get("BAQUP_CONTROL_FD", "3"))
    write = os.write
    clock = time.perf_counter_ns
    worst = over1 = over10 = 0
    index = 0
    started = clock()
    while True:
        if mode == "until":
            if index % 1000 == 0 and stop is not None and os.path.exists(stop):
                break
        elif index >= count:
            break
        data = line(index, "mixed" if mode == "until" else mode, count or 1000000)
        before = clock()
        write(fd, data)
        took = clock() - before
        worst = max(worst, took)
        if took > 1_000_000:
            over1 += 1
            if took > 10_000_000:
                over10 += 1
        index += 1
    seconds = (clock() - started) / 1e9
    work = os.environ.get("BAQUP_WORK_DIR")
    if work:
        with open(os.path.join(work, "out.txt"), "w") as handle:
            handle.write(f"{index} lines\n")
    with open(result, "w") as handle:
        json.dump(
            {
                "lines": index,
                "seconds": seconds,
                "max_write_ms": worst / 1e6,
                "writes_over_1ms": over1,
                "writes_over_10ms": over10,
            },
            handle,
        )


if __name__ == "__main__":
    main()
