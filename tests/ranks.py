"""Start local ranks under ``mlx.launch`` and collect what each saw; run as a script, it is one rank.

    python tests/ranks.py OUT_DIR MODEL PROMPT OPTIONS_JSON QUERY [QUERY ...]

As a script (alone or under mlx.launch) it answers the queries through the
Python API, with the generation options given as JSON, and writes ``OUT_DIR/rank<r>.json``: this rank's part of the model,
whether its prefix cache was a hit and where it lives, each answer (text,
token ids, stats), the seconds from start to a loaded model, and peak memory.
:func:`probe` launches it on ``n`` ranks. Used by tests/test_distributed.py and
benchmarks/bench_distributed.py.
"""

import time

STARTED = time.perf_counter()

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

LAUNCH_TIMEOUT = 600


def launcher() -> str:
    found = Path(sys.executable).parent / "mlx.launch"
    return str(found) if found.exists() else "mlx.launch"


def free_port_block(n: int) -> int:
    """A first port such that ``n`` consecutive ports are free (the ring listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            first = s.getsockname()[1]
        if first + n < 65536 and all(_free(first + i) for i in range(n)):
            return first
    raise RuntimeError("no free block of ports")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def launch_command(n: int, *command: str) -> list:
    """``mlx.launch`` of ``command`` (run by this Python) on ``n`` local ranks over the ring backend."""
    return [launcher(), "-n", str(n), "--backend", "ring", "--starting-port", str(free_port_block(n)),
            "--python", sys.executable, "--", *command]


def probe(n: int, env: dict, out: Path, model, prompt, options: dict, queries: list, cwd=None):
    """Run this script on ``n`` ranks; returns (each rank's record, in rank order; the launch's result)."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("rank*.json"):
        old.unlink()
    command = launch_command(n, __file__, str(out), str(model), str(prompt), json.dumps(options), *queries)
    run = subprocess.run(command, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                         timeout=LAUNCH_TIMEOUT)
    files = [out / f"rank{r}.json" for r in range(n)]
    if not all(f.exists() for f in files):
        raise AssertionError(f"a rank wrote nothing:\n{run.stdout}\n{run.stderr}")
    return [json.loads(f.read_text()) for f in files], run


def main(out: str, model: str, prompt: str, options: str, *queries: str) -> None:
    import resource

    from urial_edge.model.backend import prepare

    prepare()  # first: the optimised BLAS before MLX loads
    import mlx.core as mx

    from urial_edge.runtime.assistant import Assistant

    bot = Assistant.load(model, prompt, **json.loads(options))
    loaded = time.perf_counter() - STARTED
    answers = [bot.ask(q) for q in queries]
    record = {
        "shard": bot.shard,
        "cache_hit": bot.prefix.hit,
        "prefix_path": str(bot.prefix.path),
        "load_seconds": loaded,
        "answers": [{"text": a.text, "token_ids": a.token_ids, "stats": a.stats.as_dict()} for a in answers],
        "peak_memory_mb": mx.get_peak_memory() / 1e6,
        "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    rank = bot.shard["rank"] if bot.shard else 0
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(*sys.argv[1:])
