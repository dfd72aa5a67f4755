"""Measuring many answers at once: the batched engine against a loop of single answers and against
``mlx_lm.batch_generate`` fed the same prefix caches, and a running server under concurrent clients.

Used by ``urial-edge bench`` (the 8-query and 8-client rows, ``suite.py``) and by ``benchmarks/bench_batch.py``
(the full sweep). Everything runs side by side in one process (or one server), so the ratios hold
on a shared, noisy machine even when the absolute rates move.
"""

import statistics
import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

import mlx.core as mx

from ..runtime import prompt as urial
from ..runtime.engine import Request
from ..runtime.kv_state import copy_cache
from ..runtime.options import GenerationOptions
from ..serve.client import chat_body, stream_chat
from ..testing.server_process import launch

QUERIES = [
    "What are three good habits for staying healthy while working from home?",
    "Explain how a rainbow forms.",
    "Give me a short plan for learning to cook.",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly robot and explain it.",
    "How do I keep a houseplant alive?",
    "Why do leaves change colour in autumn?",
    "Write two sentences about the ocean.",
    "What should I pack for a weekend hiking trip?",
    "How does a bicycle stay upright?",
    "Give three tips for a job interview.",
    "What is a prime number? Give examples.",
    "Describe a sunrise to someone who has never seen one.",
    "How can I save money on groceries?",
    "What makes a good story?",
    "Explain what a computer program is to a child.",
]


def equal_work(bot, queries: Sequence[str], max_tokens: int) -> list:
    """Requests that run to EOS or ``max_tokens`` with no frame, stop strings or penalty: the same work
    ``mlx_lm.batch_generate`` does, so token counts and rates compare directly."""
    options = GenerationOptions(max_tokens=max_tokens, repetition_penalty=1.0)
    prefix = bot.prefix
    return [Request(bot.after_prefix(urial.render_turn(q)), prefix.fresh(), prefix.tokens, options,
                    framed=False) for q in queries]


def ours(bot, queries: Sequence[str], max_tokens: int, batch_size: int) -> dict:
    """Aggregate tokens/s of urial-edge's engine with ``batch_size`` answers in flight."""
    requests = equal_work(bot, queries, max_tokens)
    mx.reset_peak_memory()
    start = time.perf_counter()
    answers = list(bot.run(requests, batch_size))
    wall = time.perf_counter() - start
    tokens = sum(len(a.token_ids) for a in answers)
    return {"tokens": tokens, "seconds": wall, "tps": tokens / wall, "ids": [a.token_ids for a in answers],
            "peak_mb": mx.get_peak_memory() / 1e6}


def mlx_lm_batch(bot, queries: Sequence[str], max_tokens: int) -> dict:
    """The same queries through ``mlx_lm.generate.batch_generate``, each fed a copy of our prefix cache."""
    from mlx_lm.generate import batch_generate  # imports transformers: only for this peer

    class Tokens:  # the two things batch_generate asks of a tokenizer
        eos_token_ids = sorted(bot.tokenizer.eos_ids)
        decode = staticmethod(bot.tokenizer.decode)

    prompts = [bot.after_prefix(urial.render_turn(q)) for q in queries]
    caches = [copy_cache(bot.prefix.fresh()) for _ in queries]
    mx.eval([c.state for cache in caches for c in cache])
    mx.reset_peak_memory()
    start = time.perf_counter()
    result = batch_generate(bot.model, Tokens(), prompts, prompt_caches=caches, max_tokens=max_tokens,
                            return_token_ids=True)
    wall = time.perf_counter() - start
    tokens = sum(len(t) for t in result.token_ids)
    return {"tokens": tokens, "seconds": wall, "tps": tokens / wall, "ids": result.token_ids,
            "peak_mb": mx.get_peak_memory() / 1e6}


def agreement(ids: List[List[int]], reference: List[List[int]]) -> dict:
    """How many answers equal the reference token for token, and the share of equal leading tokens."""
    same = sum(a == b for a, b in zip(ids, reference))
    lead = sum(next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
               for a, b in zip(ids, reference))
    return {"identical": same, "of": len(reference), "token_agreement": lead / max(1, sum(map(len, reference)))}


def throughput(bot, sizes=(1, 2, 4, 8, 16), max_tokens: int = 64, repeats: int = 2) -> List[dict]:
    """For each number of queries: urial-edge batched, one at a time, and mlx_lm.batch_generate."""
    rows = []
    ours(bot, QUERIES[:2], 8, 2)  # warm up: first-call compilation and allocation
    mlx_lm_batch(bot, QUERIES[:2], 8)
    for n in sizes:
        queries = (QUERIES * (n // len(QUERIES) + 1))[:n]
        runs = {"batched": [], "sequential": [], "mlx_lm": []}
        for _ in range(repeats):  # in turns, so drift on the machine hits every row alike
            runs["batched"].append(ours(bot, queries, max_tokens, n))
            runs["sequential"].append(ours(bot, queries, max_tokens, 1))
            runs["mlx_lm"].append(mlx_lm_batch(bot, queries, max_tokens))
        best = {k: max(v, key=lambda r: r["tps"]) for k, v in runs.items()}
        rows.append({
            "queries": n, "max_tokens": max_tokens,
            "batched_tps": best["batched"]["tps"], "sequential_tps": best["sequential"]["tps"],
            "mlx_lm_batch_tps": best["mlx_lm"]["tps"],
            "batched / sequential": best["batched"]["tps"] / best["sequential"]["tps"],
            "batched / mlx_lm": best["batched"]["tps"] / best["mlx_lm"]["tps"],
            "tokens": best["batched"]["tokens"], "peak_mb": best["batched"]["peak_mb"],
            "mlx_lm_peak_mb": best["mlx_lm"]["peak_mb"],
            "vs_single": agreement(best["batched"]["ids"], best["sequential"]["ids"]),
            "vs_mlx_lm": agreement(best["batched"]["ids"], best["mlx_lm"]["ids"]),
        })
    return rows


# -- a running server under concurrent clients ------------------------------------------------------


def one_client(info: dict, query: str, max_tokens: int, out: dict, model: Optional[str] = None) -> None:
    """Stream one answer (from ``model``, or the server's default); record its time to first token and its
    token count."""
    start = time.perf_counter()
    body = chat_body([{"role": "user", "content": query}], GenerationOptions(max_tokens=max_tokens), model)
    for chunk in stream_chat(info, body):
        choice = chunk["choices"][0]
        if "ttft" not in out and (choice.get("delta") or {}).get("content"):
            out["ttft"] = time.perf_counter() - start
        if choice.get("finish_reason"):
            out["tokens"] = chunk["usage"]["completion_tokens"]
    out["end"] = time.perf_counter()
    out.setdefault("ttft", out["end"] - start)


def run_clients(jobs: Sequence[Tuple[dict, Optional[str]]], max_tokens: int) -> dict:
    """One streaming client per ``(server info, model)`` job, all at once: aggregate tokens/s and the spread
    of first-token times."""
    results = [{} for _ in jobs]
    threads = [threading.Thread(target=one_client, args=(info, QUERIES[i % len(QUERIES)], max_tokens, r, model))
               for i, ((info, model), r) in enumerate(zip(jobs, results))]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(r["end"] for r in results) - start
    ttfts = sorted(r["ttft"] for r in results)
    return {"clients": len(jobs), "tokens": sum(r["tokens"] for r in results),
            "tps": sum(r["tokens"] for r in results) / wall, "ttft_p50": statistics.median(ttfts),
            "ttft_p95": ttfts[min(len(ttfts) - 1, int(round(0.95 * (len(ttfts) - 1))))]}


def concurrent(info: dict, clients: int, max_tokens: int) -> dict:
    """``clients`` streaming requests at once to the server's default model."""
    return run_clients([(info, None)] * clients, max_tokens)


def long_answer(info: dict, prefix_text: str, out: dict) -> None:
    """A long raw continuation of the URIAL prompt (no frame to stop it), read until ``out["done"]`` is set
    (leaving cancels it on the server) or it ends by itself (EOS or the server's token limit)."""
    text = prefix_text + urial.render_turn("Write a long, detailed essay about the history of writing systems.")
    body = {"prompt": text, **GenerationOptions(max_tokens=4096, stop=()).to_json()}
    for chunk in stream_chat(info, body, "/v1/completions"):
        if chunk["choices"][0].get("text"):
            out.setdefault("first", time.perf_counter())
        if out.get("done"):
            break
    out["end"] = time.perf_counter()


def short_beside_long(info: dict, prefix_text: str, repeats: int = 3) -> dict:
    """Time to first token of a short request on an idle server, and while a long answer is generated."""
    def ttft() -> float:
        out = {}
        one_client(info, "Name a colour.", 8, out)
        return out["ttft"]

    idle = statistics.median(ttft() for _ in range(repeats))
    busy = []
    for _ in range(repeats):
        long = {}
        thread = threading.Thread(target=long_answer, args=(info, prefix_text, long))
        thread.start()
        while "first" not in long and thread.is_alive():
            time.sleep(0.01)
        busy.append(ttft())
        answered = time.perf_counter()
        ended = long.get("end")  # by itself, before the short answer's first token: nothing was measured
        long["done"] = True
        thread.join()
        if ended is not None and ended < answered:
            raise RuntimeError("the long answer ended before the short one's first token; the model stops early")
    return {"idle_ttft": idle, "busy_ttft": statistics.median(busy), "busy / idle": statistics.median(busy) / idle}


def server_rows(spec: List[str], prefix_text: str, clients=(1, 4, 8), max_tokens: int = 64,
                repeats: int = 2) -> dict:

    proc, info = launch([*spec, "--max-batch", str(max(clients))])
    try:
        concurrent(info, 2, 8)  # warm up
        rows = []
        for c in clients:
            runs = [concurrent(info, c, max_tokens) for _ in range(repeats)]
            rows.append(max(runs, key=lambda r: r["tps"]))
        base = rows[0]["tps"]
        for row in rows:
            row["tps / one client"] = row["tps"] / base
        return {"concurrency": rows, "short_beside_long": short_beside_long(info, prefix_text)}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def summary(rows: List[dict], server: Dict) -> Dict[str, float]:
    """The headline ratios: 8 queries batched vs one at a time and vs mlx-lm; 8 clients vs 1."""
    at8 = next(r for r in rows if r["queries"] == 8)
    eight = next(r for r in server["concurrency"] if r["clients"] == 8)
    return {"batch of 8 / sequential": at8["batched / sequential"], "batch of 8 / mlx_lm.batch_generate":
            at8["batched / mlx_lm"], "server 8 clients / 1 client": eight["tps / one client"],
            "server short-request ttft, busy / idle": server["short_beside_long"]["busy / idle"]}
