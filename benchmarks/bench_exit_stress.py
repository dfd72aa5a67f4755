"""Crashes at exit: hundreds of ``ask``, ``ask --no-cache`` and resumed ``batch`` runs beside busy cores.

    python benchmarks/bench_exit_stress.py [--model gemma-3-270m] [--runs 300] [--workers 4] [--hogs 2]

Each run is a fresh process answering with the real model (8 tokens), several at once, while ``--hogs``
processes (``while 1: pass``) keep the cores busy; a run that exits non-zero or prints one of glibc's heap
messages counts as a crash (``urial_edge/testing/exit_stress.py``). Writes results/exit_stress.{json,md}.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the BLAS the runs use is the one reported
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import write_results

from urial_edge.runtime.prompt import DEFAULT_PROMPT
from urial_edge.testing import exit_stress


def commit() -> str:
    here = Path(__file__).resolve().parent
    found = subprocess.run(["git", "-C", str(here), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
                           capture_output=True, text=True).stdout.strip()
    return found.stdout.strip() + (" (with uncommitted changes)" if dirty else "")


def progress(k: int, run: exit_stress.Run) -> None:
    crash = f"  CRASHED {run.tail}" if run.crashed else ""
    print(f"{k} {run.kind}: exit {run.returncode} in {run.seconds:.1f} s{crash}", file=sys.stderr, flush=True)


def rows(runs: list) -> list:
    table = []
    for kind in (*exit_stress.KINDS, None):
        chosen = [r for r in runs if kind is None or r.kind == kind]
        table.append({"runs": kind or "all", "count": len(chosen), "crashes": sum(r.crashed for r in chosen),
                      "median s": statistics.median(r.seconds for r in chosen),
                      "slowest s": max(r.seconds for r in chosen)})
    return table


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="gemma-3-270m")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--runs", type=int, default=300)
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--hogs", type=int, default=2)
    p.add_argument("--commit", default=None, help="the commit of the code run (default: git's HEAD here)")
    a = p.parse_args()
    started, load_before = time.time(), os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as work:
        runs = exit_stress.stress([a.model], a.prompt, a.runs, Path(work), dict(os.environ), a.workers, a.hogs,
                                  on_run=progress)
    crashes = [r for r in runs if r.crashed]
    conditions = {"model": a.model, "prompt": a.prompt, "workers": a.workers, "cpu_hogs": a.hogs,
                  "cores": os.cpu_count(), "load_1min_before": load_before,
                  "load_1min_after": os.getloadavg()[0], "commit": a.commit or commit(),
                  "wall_seconds": round(time.time() - started)}
    notes = (f"{len(runs)} runs, {len(crashes)} crashed (non-zero exit or a glibc heap message), {a.workers} at a "
             f"time beside {a.hogs} busy processes on {os.cpu_count()} cores, in {conditions['wall_seconds']} s; "
             f"model {a.model}, prompt {a.prompt}, 8 tokens per answer; commit {conditions['commit']}.")
    print(write_results("exit_stress", rows(runs), ["runs", "count", "crashes", "median s", "slowest s"],
                        "Crashes at exit under load", notes,
                        {"conditions": conditions, "crashed": [r.__dict__ for r in crashes]}))


if __name__ == "__main__":
    main()
