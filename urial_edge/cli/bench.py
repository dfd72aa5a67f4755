"""``urial-edge bench``: the benchmark suite against mlx-lm and llama.cpp; JSON out, a table of ratios on stdout."""

from pathlib import Path

import click

from .options import model_options


@click.command()
@model_options
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=None,
              help="Folder for suite.json [default: $URIAL_EDGE_HOME/bench].")
def bench(model, prompt, repeats, out):
    """Benchmark cold and warm latency, decode speed and memory against mlx-lm (and llama.cpp)."""
    from ..bench.suite import default_out, run_suite  # imports MLX, mlx-lm and the peers

    out = out or default_out()
    result = run_suite(model, prompt, repeats, out)
    for key, value in result["ratios"].items():
        click.echo(f"{key:<42} {value:.2f}")
    click.echo(f"results in {out / 'suite.json'}", err=True)
