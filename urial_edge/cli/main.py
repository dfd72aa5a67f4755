"""The ``urial-edge`` command: every command group, and the entry point.

stdout carries only answers (or JSON); progress, warnings and errors go to stderr.
A new command goes in a module of its own (or of its group) and is added below.
"""

import click

from .. import __version__
from ..distributed import world as distributed
from ..model.backend import prepare
from .answer import ask, batch, chat
from .bench import bench
from .cache import cache
from .doctor import doctor
from .eval import evaluate
from .group import Group
from .models import models
from .prompts import prompts
from .serve import serve
from .shift import shift


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="urial-edge")
def cli():
    """Aligned answers from base LLMs, offline, with a cached URIAL prefix."""


for command in (ask, chat, batch, evaluate, shift, models, prompts, cache, bench, serve, doctor):
    cli.add_command(command)


def main():
    """The entry point: prepare MLX (fast BLAS, light mlx-lm imports) before any command can import it."""
    prepare()
    distributed.quiet_followers()  # under mlx.launch only rank 0 prints
    cli(prog_name="urial-edge")


if __name__ == "__main__":
    main()
