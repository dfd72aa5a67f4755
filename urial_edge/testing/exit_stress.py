"""Exit stress: many short command-line runs beside busy processes, counting those that did not end cleanly.

Issue 24 saw 3 crashes at exit in about 120 runs under load (``corrupted double-linked list``,
``malloc_consolidate(): unaligned fastbin chunk``, exit 134, each after a complete answer): MKL's exit
handlers freed their buffers while MLX's thread was still in one of its matrix products. The runs are
``ask``, ``ask --no-cache`` and a resumed ``batch``, in turns, several at once, beside processes that keep
every core busy. The test (``tests/test_faults.py``) and ``benchmarks/bench_exit_stress.py`` use this.
"""

import contextlib
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

KINDS = ("ask", "ask --no-cache", "batch resume")
HEAP_MESSAGES = ("corrupted", "malloc", "free()", "double free")  # glibc's heap checks, on stderr
QUERIES = 4  # lines of the batch; a resumed run finds the first two answered


@dataclass
class Run:
    """One finished run: what it was, how it ended, and the end of its stderr if it did not end cleanly."""

    kind: str
    model: str
    returncode: int
    seconds: float
    tail: str = ""

    @property
    def crashed(self) -> bool:
        return bool(self.tail)


def crashed(returncode: int, stderr: str) -> bool:
    """Whether a run did not end cleanly: a non-zero exit (a signal: SIGSEGV, SIGABRT) or a heap message."""
    return returncode != 0 or any(m in stderr for m in HEAP_MESSAGES)


def cli_argv(*argv) -> List[str]:
    return [sys.executable, "-m", "urial_edge.cli", *map(str, argv)]


@contextlib.contextmanager
def cpu_hogs(count: int) -> Iterator[None]:
    """``count`` processes that each keep a core busy (``while 1: pass``) while the block runs."""
    hogs = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(count)]
    try:
        yield
    finally:
        for hog in hogs:
            hog.kill()
            hog.wait()


def _half_done(model: str, args: List[str], work: Path, env: dict) -> Tuple[Path, str]:
    """The batch input, and the first two lines of its results, as a run interrupted halfway leaves them."""
    queries = work / "queries.jsonl"
    queries.write_text("".join(json.dumps({"id": i, "query": f"Question {i}?"}) + "\n" for i in range(QUERIES)))
    out = work / f"{Path(model).name}-done.jsonl"
    subprocess.run(cli_argv("batch", queries, "-o", out, *args), env=env, check=True, capture_output=True)
    return queries, "".join(out.read_text().splitlines(keepends=True)[:2])


def plan(models: Sequence[str], prompt: str, runs: int, work: Path, env: dict,
         max_tokens: int = 8) -> List[Tuple[str, str, List[str]]]:
    """``runs`` runs as ``(kind, model, argv)``: the models in turns, and for each the three kinds in turns.
    Every model's prefix cache is built first (``ask`` then finds it, as it usually does)."""
    args = {m: ["--model", m, "-p", prompt, "--max-tokens", str(max_tokens)] for m in models}
    done = {m: _half_done(m, args[m], work, env) for m in models}
    planned = []
    for k in range(runs):
        model = models[k % len(models)]
        kind = KINDS[(k // len(models)) % len(KINDS)]
        if kind == "batch resume":
            queries, lines = done[model]
            out = work / f"resume{k}.jsonl"
            out.write_text(lines)
            argv = cli_argv("batch", queries, "-o", out, *args[model])
        else:
            argv = cli_argv("ask", *args[model], "--no-server", *(["--no-cache"] if kind != "ask" else []),
                            f"Hello {k}?")
        planned.append((kind, model, argv))
    return planned


def _run(kind: str, model: str, argv: List[str], env: dict) -> Run:
    started = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    bad = crashed(proc.returncode, proc.stderr)
    return Run(kind, model, proc.returncode, time.perf_counter() - started,
               (proc.stderr.strip()[-300:] or f"exit {proc.returncode}") if bad else "")


def stress(models: Sequence[str], prompt: str, runs: int, work: Path, env: dict, workers: int = 4,
           hogs: int = 2, on_run: Optional[Callable[[int, Run], None]] = None) -> List[Run]:
    """Run the plan ``workers`` at a time beside ``hogs`` busy processes; every run, in order. ``on_run(k, run)``
    hears of each run as it ends (in order)."""
    planned = plan(models, prompt, runs, work, env)
    done = []
    with cpu_hogs(hogs), ThreadPoolExecutor(workers) as pool:
        for run in pool.map(lambda p: _run(*p, env), planned):
            done.append(run)
            if on_run is not None:
                on_run(len(done), run)
    return done
