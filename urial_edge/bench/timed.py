"""``python -m urial_edge.bench.timed CMD...``: run CMD, then report its wall time and peak memory.

The report is one JSON line on standard error after CMD's own output: the peak
resident memory of the child alone, which the benchmarking process cannot
measure for itself (its own peak would count too).
"""

import json
import resource
import subprocess
import sys
import time


def main() -> None:
    start = time.perf_counter()
    proc = subprocess.run(sys.argv[1:], stdin=sys.stdin, stdout=sys.stdout, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - start
    sys.stderr.write(proc.stderr)
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    sys.stderr.write("\n" + json.dumps({"wall_s": wall, "peak_rss_mb": rss, "code": proc.returncode}) + "\n")


if __name__ == "__main__":
    main()
