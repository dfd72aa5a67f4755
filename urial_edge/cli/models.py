"""``urial-edge models``: list, inspect, pull, import and remove models."""

from pathlib import Path

import click

from ..disk.files import dir_size
from ..disk.paths import models_dir
from ..errors import UrialError
from ..model.store import (check_model_name, default_precision, import_into_store, is_model_dir, list_models,
                           model_info, parse_precision, pull_model, remove_model)
from ..progress import progress_bar
from ..units import format_size
from .group import Group
from .options import Checked, text_argument


@click.group(cls=Group)
def models():
    """List, inspect, pull, import and remove models."""


@models.command("list")
def models_list():
    """Registry models and models in the store."""
    for row in list_models():
        mark = "*" if row["default"] else " "
        click.echo(f"{mark} {row['name']:<16} {row['status']:<22} {row['description']}")


@models.command("info")
@click.argument("name", required=False)
@click.option("--path", "path_only", is_flag=True, help="Print only the local directory.")
def models_info(name, path_only):
    """Details of a model (the default when NAME is omitted); the directory is the last line."""
    info = model_info(name)
    if path_only and "path" not in info:
        raise UrialError(f"model {info['name']!r} is {info['status']}")
    if not path_only:
        for key, value in info.items():
            if key not in ("path",) and value is not None:
                click.echo(f"{key}: {format_size(value) if key == 'size_bytes' else value}")
    if "path" in info:
        click.echo(info["path"])


@models.command("pull")
@click.argument("name")
@click.option("--file", default=None, metavar="NAME.gguf", help="The GGUF file to take from a repo with several.")
def models_pull(name, file):
    """Download NAME (a registry name or a Hugging Face repo id) and convert it if it is a GGUF.

    Downloads go through huggingface-hub: its cache, its progress bars, and
    resuming where an interrupted download stopped. Prints the directory last.
    """
    path = pull_model(text_argument(name, "NAME"), file)
    click.echo(f"{name}: {format_size(dir_size(path))} in {path}", err=True)
    click.echo(str(path))


@models.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--name", type=Checked(check_model_name, "name"), default=None,
              help="Store name (default: the file name).")
@click.option("--quantize", type=click.Choice(["4", "8", "none"]), default=None,
              help="MLX quantization (default: the platform's choice).")
@click.option("--force", is_flag=True, help="Replace a model of the same name.")
def models_import(file, name, quantize, force):
    """Convert a GGUF file into an MLX model in the store."""
    name = check_model_name(file.stem) if name is None else name
    if is_model_dir(models_dir() / name) and not force:
        raise UrialError(f"a model named {name!r} already exists; use --force to replace it")
    bits = default_precision() if quantize is None else parse_precision(quantize)
    target = import_into_store(file, name, bits, progress_bar("importing"))
    click.echo(f"imported {file} as {name!r} ({format_size(dir_size(target))})", err=True)
    click.echo(str(target))


@models.command("remove")
@click.argument("name")
def models_remove(name):
    """Delete a model from the store."""
    click.echo(f"removed {remove_model(name)}", err=True)
