"""urial-edge against mlx-lm and llama.cpp, side by side in one run: the same as ``urial-edge bench``.

    python benchmarks/bench_suite.py [--repeats 3] [--model M] [--prompt P]

Cold processes (cached ask, --no-cache ask, mlx_lm generate with and without a
prompt-cache file, a bare floor script, and llama.cpp on the same GGUF restoring
the prefix state from a file), in-process time to first token,
server time to first token, decode speed and peak memory. Writes
results/suite.{json,md,png}; see urial_edge/bench.py for what each row measures.
"""

import urial_edge  # noqa: F401  (first: it sets up the optimised BLAS before MLX loads)
import sys

from common import RESULTS

from urial_edge.cli import cli

if __name__ == "__main__":
    cli(["bench", "--out", str(RESULTS), *sys.argv[1:]], prog_name="urial-edge")
