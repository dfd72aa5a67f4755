"""``urial-edge doctor``: the platform, MLX, BLAS, versions and storage, one item per line; exit 1 on a problem."""

import os
import platform
import sys
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Optional

import click

from ..disk.files import dir_size
from ..disk.paths import cache_dir, home, models_dir, sessions_dir
from ..distributed import world as distributed
from ..model.backend import blas_in_use
from ..model.registry import load_registry
from ..model.store import default_precision
from ..units import format_size
from .group import EXIT_ERROR

PACKAGES = ("urial-edge", "mlx", "mlx-lm", "huggingface-hub", "click", "gguf", "tokenizers", "mkl")


def home_problem(folder: Path) -> Optional[str]:
    """Why urial-edge cannot keep its files in ``folder`` (None if it can): it must be a directory (or be
    creatable) that a file can really be written to (root ignores permission bits; a read-only mount does not)."""
    if folder.exists() and not folder.is_dir():
        return f"{folder} is not a directory (URIAL_EDGE_HOME must name a folder)"
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        return f"{existing} is not a directory, so {folder} cannot be made"
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError:
        return f"{existing} is not writable" + (f", so {folder} cannot be made" if existing != folder else "")
    return None


@click.command()
def doctor():
    """Describe the platform, MLX, BLAS, versions and storage; flag misconfiguration."""
    import mlx.core as mx  # after the entry point prepared the BLAS

    problems = []

    def line(key, value):
        click.echo(f"{key:<16} {value}")

    line("platform", f"{platform.system()} {platform.release()} {platform.machine()}, Python {platform.python_version()}")
    line("mlx device", f"{mx.default_device()} (Metal {'available' if mx.metal.is_available() else 'not available'})")
    blas = blas_in_use()
    line("blas", blas)
    if sys.platform.startswith("linux") and "slow" in blas and os.environ.get("URIAL_EDGE_BLAS", "").lower() != "off":
        problems.append("no optimised BLAS found: pip install mkl (x86_64) or apt install libopenblas0-pthread")
    for package in PACKAGES:
        try:
            line(package, version(package))
        except PackageNotFoundError:
            line(package, "not installed")
    bits = default_precision()
    line("precision", f"{'q' + str(bits) if bits else 'float32'} for new conversions")
    line("distributed", distributed.describe())
    line("home", str(home()))
    problem = home_problem(home())
    if problem:
        problems.append(problem)
    for label, folder in (("models", models_dir()), ("cache", cache_dir()), ("sessions", sessions_dir())):
        size = format_size(dir_size(folder)) if folder.exists() else "empty"
        line(label, f"{folder} ({size})")
        if folder.exists() and not os.access(folder, os.W_OK):
            problems.append(f"{folder} is not writable")
    default, _ = load_registry()
    line("default model", f"{default} ({'ready' if (models_dir() / default).exists() else 'converts on first use'})")
    if os.environ.get("HF_HUB_OFFLINE"):
        line("hub", "offline (HF_HUB_OFFLINE set): only cached Hugging Face models resolve")
    for problem in problems:
        click.echo(f"problem          {problem}")
    if problems:
        sys.exit(EXIT_ERROR)
