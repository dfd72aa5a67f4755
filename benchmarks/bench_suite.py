"""urial-edge against mlx-lm and llama.cpp, side by side in one run: ``urial-edge bench`` plus its report.

    python benchmarks/bench_suite.py [--repeats 3] [--model M] [--prompt P]

Cold processes (cached ask, --no-cache ask, mlx_lm generate with and without a
prompt-cache file, a bare floor script, and llama.cpp on the same GGUF restoring
the prefix state from a file), in-process time to first token, server time to
first token, decode speed, batches and peak memory. ``urial-edge bench`` writes
results/suite.json (see urial_edge/bench/suite.py for what each row measures);
this script then draws results/suite.md and results/suite.png from it.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the optimised BLAS and light mlx_lm imports, before MLX loads
import json
import sys

from common import RESULTS
from suite_report import render

from urial_edge.cli.main import cli

if __name__ == "__main__":
    cli(["bench", "--out", str(RESULTS), *sys.argv[1:]], prog_name="urial-edge", standalone_mode=False)
    render(json.loads((RESULTS / "suite.json").read_text()), RESULTS)
