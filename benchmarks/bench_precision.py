"""Prefill and decode speed of the bundled model at float32, 8-bit and 4-bit MLX precision.

    python benchmarks/bench_precision.py

The numbers behind the per-platform default precision (urial_edge.model.store.default_precision).
All three variants are measured side by side in one process on the same prompt.
Writes results/precision.{json,md}.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the optimised BLAS and light mlx_lm imports, before MLX loads
import time

from common import write_results

import mlx.core as mx
import mlx.nn as nn

from urial_edge.model.loading import load_model
from urial_edge.model.store import resolve_model
from urial_edge.model.tokenizer import Tokenizer
from urial_edge.runtime.kv_state import make_cache, prefill

TEXT = ("The history of the bicycle begins in the early nineteenth century, when inventors in Europe "
        "experimented with two-wheeled machines pushed along by the rider's feet. ") * 12


def speeds(model, ids, decode_tokens=32) -> dict:
    """Prefill tokens/s, and greedy decode tokens/s of the bare model (one token per forward pass)."""
    cache = make_cache(model)
    start = time.perf_counter()
    prefill(model, ids[:-1], cache)
    prefill_s = time.perf_counter() - start
    token = mx.array([ids[-1:]])
    start = time.perf_counter()
    for _ in range(decode_tokens):
        token = mx.argmax(model(token, cache=cache)[:, -1:, :], axis=-1)
        mx.eval(token)
    return {"prefill_tok_s": (len(ids) - 1) / prefill_s, "decode_tok_s": decode_tokens / (time.perf_counter() - start)}


def main():
    path = resolve_model(None)
    ids = Tokenizer(path).encode(TEXT, bos=True)[:256]
    rows = []
    for bits in (None, 8, 4):
        model, _ = load_model(path)
        if bits:
            nn.quantize(model, group_size=64, bits=bits)
            mx.eval(model.parameters())
        speeds(model, ids[:16], 2)  # warm up
        row = {"precision": f"q{bits}" if bits else "float32", **speeds(model, ids)}
        print(row)
        rows.append(row)
        del model
    base = rows[0]
    for row in rows:
        row["prefill_vs_float32"] = row["prefill_tok_s"] / base["prefill_tok_s"]
        row["decode_vs_float32"] = row["decode_tok_s"] / base["decode_tok_s"]
    columns = ["precision", "prefill_tok_s", "decode_tok_s", "prefill_vs_float32", "decode_vs_float32"]
    notes = (f"Bundled Gemma-3-270M, {len(ids)}-token prefill, 32-token greedy decode, one process. "
             "On CPU the default is the fastest row; with Metal, quantized weights are the default.")
    print(write_results("precision", rows, columns, "Model precision: speed on this machine", notes))


if __name__ == "__main__":
    main()
