"""Prefill and decode speed of the bundled model at float32, 8-bit and 4-bit MLX precision.

    python benchmarks/bench_precision.py

The numbers behind the per-platform default precision (urial_edge.models.default_precision).
All three variants are measured side by side in one process on the same prompt.
Writes results/precision.{json,md}.
"""

import urial_edge  # noqa: F401  (first: it sets up the optimised BLAS before MLX loads)
import time

from common import write_results

import mlx.core as mx
import mlx.nn as nn

from urial_edge.generate import GenerationOptions, generate_tokens, prefill
from urial_edge.modeling import load_model
from urial_edge.models import resolve_model
from urial_edge.prefix_cache import make_cache
from urial_edge.tokenizer import Tokenizer

TEXT = ("The history of the bicycle begins in the early nineteenth century, when inventors in Europe "
        "experimented with two-wheeled machines pushed along by the rider's feet. ") * 12


def speeds(model, ids, decode_tokens=32) -> dict:
    cache = make_cache(model)
    start = time.perf_counter()
    prefill(model, ids, cache)
    prefill_s = time.perf_counter() - start
    options = GenerationOptions(max_tokens=decode_tokens, repetition_penalty=1.0)
    stream = generate_tokens(model, ids[-1:], cache, ids[:-1], options)
    next(stream)
    start = time.perf_counter()
    n = sum(1 for _ in stream)
    return {"prefill_tok_s": len(ids) / prefill_s, "decode_tok_s": n / (time.perf_counter() - start)}


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
