"""Which BLAS MLX's float32 matmuls should use on Linux CPU, measured.

    python benchmarks/bench_blas.py

Each candidate runs in its own fresh process (a BLAS must be loaded before MLX):
the stock reference BLAS of the mlx[cpu] wheel, Intel MKL from PyPI (package
``mkl``), and Debian's OpenBLAS (package libopenblas0-pthread) when installed.
Measures a 1024x1024 float32 matmul, the bundled model's output projection for
one token (1x640 @ 640x262144), and the bundled model's prefill and decode
speed. Writes results/blas.{json,md}.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the optimised BLAS and light mlx_lm imports, before MLX loads
import json
import os
import subprocess
import sys

from common import write_results

from urial_edge.model.backend import SYSTEM_OPENBLAS, blas_candidates

PROBE = r"""
import json, sys, time
import urial_edge
import mlx.core as mx
from urial_edge.model.backend import blas_in_use

def best(fn, n=5):
    out = float("inf")
    for _ in range(n):
        t = time.perf_counter(); fn(); out = min(out, time.perf_counter() - t)
    return out

a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
x, w = mx.random.normal((1, 640)), mx.random.normal((640, 262144))
mx.eval(a, b, x, w)
row = {"blas": blas_in_use(), "matmul_1024_ms": 1000 * best(lambda: mx.eval(a @ b)),
       "lm_head_gemv_ms": 1000 * best(lambda: mx.eval(x @ w))}
sys.path.insert(0, sys.argv[1])
from bench_precision import TEXT, speeds
from urial_edge.model.loading import load_model
from urial_edge.model.store import resolve_model
from urial_edge.model.tokenizer import Tokenizer
path = resolve_model(None)
model, _ = load_model(path)
ids = Tokenizer(path).encode(TEXT, bos=True)[:256]
speeds(model, ids[:16], 2)
row.update(speeds(model, ids))
print(json.dumps(row))
"""


def run(blas: str) -> dict:
    env = {**os.environ, "URIAL_EDGE_BLAS": blas}
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", PROBE, here], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    candidates = ["off"] + [p for p in blas_candidates() if "mkl" in p]
    candidates += [p for p in SYSTEM_OPENBLAS if os.path.exists(p)]
    rows = []
    for blas in candidates:
        row = {"candidate": "stock" if blas == "off" else os.path.basename(blas), **run(blas)}
        print(row)
        rows.append(row)
    stock = rows[0]
    for row in rows:
        row["matmul_speedup"] = stock["matmul_1024_ms"] / row["matmul_1024_ms"]
        row["prefill_speedup"] = row["prefill_tok_s"] / stock["prefill_tok_s"]
        row["decode_speedup"] = row["decode_tok_s"] / stock["decode_tok_s"]
    columns = ["candidate", "matmul_1024_ms", "lm_head_gemv_ms", "prefill_tok_s", "decode_tok_s",
               "matmul_speedup", "prefill_speedup", "decode_speedup"]
    notes = ("Each row is a fresh process; speedups are against the stock wheel measured in the same run. "
             "Bundled Gemma-3-270M in float32, 256-token prefill, 32-token greedy decode.")
    print(write_results("blas", rows, columns, "Optimised BLAS for MLX on Linux CPU", notes))


if __name__ == "__main__":
    main()
