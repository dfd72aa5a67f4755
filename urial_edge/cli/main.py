"""The ``urial-edge`` command: every command group, and the entry point.

stdout carries only answers (or JSON); progress, warnings and errors go to stderr.
A new command goes in a module of its own (or of its group) and is added below.
"""

import io
import os
import sys

import click

from .. import __version__
from ..distributed import world as distributed
from ..errors import UrialError
from ..model.backend import prepare
from .answer import ask, chat
from .batch import batch
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


class ClosedOutput(io.TextIOBase):
    """Standard output that the caller closed (``>&-``): writing to it is an error, not an answer thrown away."""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        raise UrialError("standard output is closed: the output has nowhere to go")


def guard_standard_streams() -> None:
    """Give closed standard streams (``<&-``, ``>&-``) a placeholder on /dev/null, so that no file opened
    later takes their descriptor (model weights opened as descriptor 0, a cache written through 1), and
    make writing to a closed standard output fail. A closed standard input stays ``None``."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDONLY if fd == 0 else os.O_WRONLY)  # the lowest free descriptor: fd
            if fd == 1:
                sys.stdout = ClosedOutput()


def main():
    """The entry point: prepare MLX (fast BLAS, light mlx-lm imports) before any command can import it."""
    guard_standard_streams()
    prepare()
    distributed.quiet_followers()  # under mlx.launch only rank 0 prints
    cli(prog_name="urial-edge")


if __name__ == "__main__":
    main()
