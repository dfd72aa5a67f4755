"""The benchmark suite behind ``urial-edge bench``: urial-edge against mlx-lm and llama.cpp, side by side.

On one model and prompt, in one run:

1. ``urial-edge ask`` in a fresh process, prefix cached;
2. the same with ``--no-cache``;
3. ``mlx_lm generate`` with a ``--prompt-cache-file`` made by ``mlx_lm cache_prompt``;
4. ``mlx_lm generate`` with the full prompt;
5. the floor: a fresh process that only loads the weights and the prefix cache,
   prefills the query and takes one decode step;
6. in-process time to first token, cached and uncached;
7. decode tokens per second of urial-edge and of ``mlx_lm.stream_generate``;
8. when the model came from a GGUF that is at hand (the bundled model, a
   ``.gguf`` file, a pulled GGUF) and llama-cpp-python is installed, llama.cpp
   on that same file: a fresh process that restores the prefix's KV state from
   a file written by ``llama_state_save_file`` (as ``llama-cli --prompt-cache``
   does), feeds the query and takes its first token, and its decode rate;

with the peak memory (max RSS) of each process. The result is ``OUT/suite.json``;
``benchmarks/bench_suite.py`` runs this and draws ``suite.md`` and ``suite.png`` from it.
"""

import compileall
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List, Optional

import mlx.core as mx

from ..disk.files import write_text_atomic
from ..disk.paths import ensure_dir, home
from ..model.backend import blas_in_use
from ..model.store import bundled_gguf, load_registry, read_info
from ..runtime.assistant import Assistant
from ..runtime.kv_file import library_versions
from ..runtime.kv_state import copy_cache, prefill
from ..runtime.options import GenerationOptions
from ..runtime.prompt import render_turn
from ..serve.client import stream_chat
from ..testing.server_process import launch
from . import batch, llamacpp

BATCH_REPEATS = 3

QUERY = "What are three good habits for staying healthy while working from home?"
COLD_ROWS = (ROW_ASK, ROW_NO_CACHE, ROW_MLX_CACHED, ROW_MLX_FULL, ROW_FLOOR) = (
    "urial-edge ask, cached (cold process)", "urial-edge ask --no-cache (cold process)",
    "mlx_lm generate --prompt-cache-file (cold process)", "mlx_lm generate, full prompt (cold process)",
    "floor: weights + prefix cache + query + 1 step")
ROW_LLAMA_CPP = "llama.cpp, same GGUF, KV state from a file (cold process)"

def timed(cmd: List[str], stdin: str = None) -> dict:
    """Wall time and peak RSS of one child process (measured by a small wrapper process)."""
    proc = subprocess.run([sys.executable, "-m", "urial_edge.bench.timed", *cmd], input=stdin, capture_output=True,
                          text=True)
    report = json.loads(proc.stderr.strip().splitlines()[-1])
    if report["code"] != 0:
        lines = [line for line in proc.stderr.strip().splitlines()[:-1] if line.strip()]
        raise RuntimeError(f"{' '.join(cmd[:5])} ... failed (exit {report['code']}): {lines[-3:]}")
    return {"wall_s": report["wall_s"], "peak_rss_mb": report["peak_rss_mb"]}


def summary(runs: List[dict]) -> dict:
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "peak_rss_mb": max((r["peak_rss_mb"] or 0) for r in runs), "runs": [r["wall_s"] for r in runs]}


def interleaved(n: int, commands: dict) -> dict:
    """Run each command ``n`` times, round-robin, after one discarded round.

    Taking turns spreads the machine's drift over all rows alike; the first
    fresh process after a big one runs slower, so the warm-up round is dropped.
    """
    for cmd in commands.values():
        timed(cmd)
    runs = {name: [] for name in commands}
    for _ in range(n):
        for name, cmd in commands.items():
            runs[name].append(timed(cmd))
    return {name: summary(r) for name, r in runs.items()}


def run_suite(model: Optional[str] = None, prompt: Optional[str] = None, repeats: int = 3, out: Optional[Path] = None,
              decode_tokens: int = 64) -> dict:
    """Run every row and write ``out/suite.json`` (default ``$URIAL_EDGE_HOME/bench``); returns the result."""
    out = out or default_out()
    bot = Assistant.load(model, prompt, max_tokens=1)
    # byte-compile our modules as installing a wheel does (PYTHONDONTWRITEBYTECODE may be set)
    compileall.compile_dir(str(Path(__file__).parent.parent), quiet=1)
    exe = [sys.executable, "-m", "urial_edge.cli"]
    spec = ["--model", str(bot.model_path), "--prompt", bot.prompt.path and str(bot.prompt.path) or bot.prompt.name]
    bot.prefix  # build and save the prefix cache before timing cold runs
    ask = [*exe, "ask", *spec, "--max-tokens", "1", "--json", QUERY]
    query = render_turn(QUERY)
    query_ids = bot.after_prefix(query)
    with tempfile.TemporaryDirectory() as tmp:
        cache_file = str(Path(tmp) / "prefix.safetensors")
        mlx_lm = [sys.executable, "-m", "mlx_lm"]
        timed([*mlx_lm, "cache_prompt", "--model", str(bot.model_path), "--prompt", "-",
               "--prompt-cache-file", cache_file], stdin=bot.prefix_text)
        generate = [*mlx_lm, "generate", "--model", str(bot.model_path), "--max-tokens", "1", "--ignore-chat-template"]
        commands = {
            ROW_ASK: ask,
            ROW_NO_CACHE: ask + ["--no-cache"],
            ROW_MLX_CACHED: generate + ["--prompt-cache-file", cache_file, "--prompt", query],
            ROW_FLOOR: [sys.executable, "-m", "urial_edge.bench.floor", str(bot.model_path), str(bot.prefix.path),
                        json.dumps(query_ids)],
        }
        peer = llama_cpp_peer(bot, source_gguf(model, bot.model_path, Path(tmp)), query_ids, Path(tmp), decode_tokens)
        if peer["command"]:
            commands[ROW_LLAMA_CPP] = peer["command"]
        rows = interleaved(repeats, commands)
        full = generate + ["--prompt", bot.prefix_text + query]
        rows[ROW_MLX_FULL] = summary([timed(full) for _ in range(repeats)])

    warm = {
        "in-process ttft, cached": min(bot.ask(QUERY).stats.ttft for _ in range(repeats)),
        "in-process ttft, full prefill": min(bot.ask(QUERY, no_cache=True).stats.ttft for _ in range(repeats)),
    }
    warm.update(server_latency(bot, spec, repeats))
    decode = decode_speeds(bot, decode_tokens)
    if peer["decode"] is not None:
        decode["llama.cpp decode tok/s"] = peer["decode"]
    batching = batch_rows(bot, spec, decode_tokens)
    result = summarise(rows, warm, decode, batching, peer["about"])
    write_text_atomic(ensure_dir(out) / "suite.json", json.dumps(result, indent=2))
    return result


def default_out() -> Path:
    return home() / "bench"


def source_gguf(spec: Optional[str], model_path: Path, folder: Path) -> Optional[Path]:
    """The GGUF the model was converted from, if it is at hand: the bundled package's (assembled into
    ``folder``) or the file the importer recorded."""
    default, registry = load_registry()
    entry = registry.get(spec or os.environ.get("URIAL_EDGE_MODEL") or default)
    if entry is not None and entry.source == "bundled":
        return bundled_gguf(entry, folder)
    source = read_info(model_path).get("source")
    return Path(source) if source and Path(source).is_file() else None


def llama_cpp_peer(bot, gguf: Optional[Path], query_ids: List[int], folder: Path, decode_tokens: int) -> dict:
    """llama.cpp on the model's own GGUF: the prefix's KV state saved to a file, the cold-process command that
    restores it and answers, and the decode rate. Without a GGUF or llama-cpp-python, says why."""
    if gguf is None:
        return {"command": None, "decode": None, "about": "not run: the model's GGUF is not at hand"}
    if importlib.util.find_spec("llama_cpp") is None:
        return {"command": None, "decode": None,
                "about": "not run: llama-cpp-python is not installed (pip install -e '.[bench]')"}
    import llama_cpp

    n_ctx = len(bot.prefix_ids) + len(query_ids) + decode_tokens + 8
    llm = llamacpp.load(gguf, n_ctx)
    state = folder / "llama-state.bin"
    llamacpp.save_state(llm, bot.prefix_ids, state)
    _, rate, _ = llamacpp.greedy(llm, bot.prefix_ids + query_ids, decode_tokens)
    del llm
    about = f"llama-cpp-python {llama_cpp.__version__}, {os.cpu_count()} threads, state file " \
            f"{state.stat().st_size / 1e6:.0f} MB; {llama_cpp.llama_print_system_info().decode().strip()}"
    command = [sys.executable, "-m", "urial_edge.bench.llamacpp", str(gguf), str(state), json.dumps(query_ids),
               str(n_ctx)]
    return {"command": command, "decode": rate, "about": about}


def server_latency(bot, spec: List[str], repeats: int) -> dict:
    """Time to first token through a warm ``urial-edge serve`` vs prefilling the query alone."""
    queries = [f"{QUERY} (variant {i})" for i in range(repeats)]
    prefill_s = []
    for q in queries:  # the model's share of a first token: the query's forward pass up to its last logits
        ids = bot.after_prefix(render_turn(q))
        cache = copy_cache(bot.prefix.fresh())
        start = time.perf_counter()
        prefill(bot.model, ids[:-1], cache)
        mx.eval(bot.model(mx.array(ids[-1:])[None], cache=cache)[:, -1, :])
        prefill_s.append(time.perf_counter() - start)
    proc, info = launch(spec)
    try:
        options = GenerationOptions(max_tokens=1).to_json()
        list(stream_chat(info, {"messages": [{"role": "user", "content": "warm up"}], **options}))
        ttft = []
        for q in queries:
            start = time.perf_counter()
            next(c for c in stream_chat(info, {"messages": [{"role": "user", "content": q}], **options})
                 if c["choices"])
            ttft.append(time.perf_counter() - start)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"server ttft (warm, over HTTP)": min(ttft), "query forward (model only)": min(prefill_s)}


def decode_speeds(bot, n: int) -> dict:
    """Decode tokens/s of urial-edge and of mlx-lm's stream_generate, same model, prompt and settings."""
    from mlx_lm import stream_generate  # imports transformers (about a second): only for this row
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    ids = bot.prefix_ids + bot.after_prefix(render_turn(QUERY))
    wrapper = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_file=str(bot.model_path / "tokenizer.json")))
    ours, theirs = [], []
    for _ in range(3):
        answer = bot.ask(QUERY, max_tokens=n, repetition_penalty=1.0, stop=["\x00never"])
        ours.append((answer.tokens, answer.stats.generation_tps))
        times, last = [], None
        for last in stream_generate(bot.model, wrapper, ids, max_tokens=n):
            times.append(time.perf_counter())
        # the same clock as ours: tokens after the first over the time since the first
        theirs.append((last.generation_tokens, (last.generation_tokens - 1) / (times[-1] - times[0])))
    best, best_theirs = max(ours, key=lambda r: r[1]), max(theirs, key=lambda r: r[1])
    return {"urial-edge decode tok/s": best[1], "mlx-lm stream_generate decode tok/s": best_theirs[1],
            "tokens (urial-edge, mlx-lm)": [best[0], best_theirs[0]]}


def batch_rows(bot, spec: List[str], tokens: int) -> dict:
    """Eight answers at once: batched vs one at a time vs mlx_lm.batch_generate, and a server with 8 clients.

    Single runs of these rows are noisy on a shared machine, so each runs ``BATCH_REPEATS`` times in turns
    and the best is kept, as ``benchmarks/bench_batch.py`` does.
    """
    throughput = batch.throughput(bot, sizes=(8,), max_tokens=tokens, repeats=BATCH_REPEATS)
    server = batch.server_rows(spec, bot.prefix_text, clients=(1, 8), max_tokens=tokens, repeats=BATCH_REPEATS)
    return {"throughput": throughput, "server": server, "ratios": batch.summary(throughput, server)}


def summarise(rows: dict, warm: dict, decode: dict, batching: dict, llama_cpp: str = "not run") -> dict:
    cold = {name: rows[name] for name in (*COLD_ROWS, ROW_LLAMA_CPP) if name in rows}
    cached = rows[ROW_ASK]["wall_s"]
    ratios = {
        "cached ask / mlx_lm with prompt cache": cached / rows[ROW_MLX_CACHED]["wall_s"],
        "cached ask / floor": cached / rows[ROW_FLOOR]["wall_s"],
        "cached ask / no-cache ask": cached / rows[ROW_NO_CACHE]["wall_s"],
        "in-process ttft speedup (full / cached)": warm["in-process ttft, full prefill"] / warm["in-process ttft, cached"],
        "decode urial-edge / mlx-lm": decode["urial-edge decode tok/s"] / decode["mlx-lm stream_generate decode tok/s"],
        "server ttft / query forward": warm["server ttft (warm, over HTTP)"] / warm["query forward (model only)"],
        "server ttft / cold cached ask": warm["server ttft (warm, over HTTP)"] / cached,
        **batching["ratios"],
    }
    if ROW_LLAMA_CPP in rows:
        ratios["cached ask / llama.cpp with state file"] = cached / rows[ROW_LLAMA_CPP]["wall_s"]
        ratios["decode urial-edge / llama.cpp"] = decode["urial-edge decode tok/s"] / decode["llama.cpp decode tok/s"]
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
               **library_versions(), "blas": blas_in_use(), "llama.cpp": llama_cpp,
               "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    return {"machine": machine, "cold": cold, "warm": warm, "decode": decode, "batching": batching,
            "ratios": ratios}
