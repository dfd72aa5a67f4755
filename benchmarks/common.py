"""Helpers shared by the benchmark scripts: machine description and result files."""

import argparse
import json
import os
import platform
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    import mlx.core as mx
    from importlib.metadata import version

    from urial_edge.model.backend import blas_in_use

    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "mlx": version("mlx"),
        "mlx_lm": version("mlx-lm"),
        "device": str(mx.default_device()),
        "metal": mx.metal.is_available(),
        "blas": blas_in_use(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }


def write_results(name: str, rows: list, columns: list, title: str, notes: str = "", extra: dict = None) -> Path:
    """Write ``results/<name>.json`` and ``results/<name>.md`` (a table of ``columns``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    info = machine()
    data = {"title": title, "machine": info, "rows": rows, **(extra or {})}
    (RESULTS / f"{name}.json").write_text(json.dumps(data, indent=2))
    lines = [f"# {title}", "", notes, "" if notes else "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)) for c in columns) + " |")
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in info.items())]
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")
    return RESULTS / f"{name}.md"


def fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 100 else f"{value:.0f}"
    return "" if value is None else str(value)


def best_of(fn, repeats: int = 3):
    """The minimum wall time of ``fn()`` over ``repeats`` runs, and its last result."""
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def in_turns(runs: dict, repeats: int, key) -> dict:
    """Run each of ``runs`` (name -> function) once per round for ``repeats`` rounds, in turns, so that a
    shared machine's load falls on all of them alike; each one's best result by ``key`` (lowest)."""
    best = {}
    for _ in range(repeats):
        for name, fn in runs.items():
            result = fn()
            if name not in best or key(result) < key(best[name]):
                best[name] = result
    return best


def model_arguments(max_tokens: int, repeats: int) -> argparse.ArgumentParser:
    """A parser with the options most benchmarks share: --model, --prompt, --max-tokens, --repeats."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt", default=None)
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--repeats", type=int, default=repeats)
    return parser
