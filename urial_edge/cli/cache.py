"""``urial-edge cache``: build, list, verify and clear prefix KV caches."""

import sys
from pathlib import Path

import click

from ..disk.paths import cache_dir
from ..errors import UrialError
from ..units import format_size
from .group import EXIT_ERROR, Group
from .options import DURATION, SIZE, kv_bits_option, load_assistant, model_options


@click.group(cls=Group)
def cache():
    """Build, list, verify and clear prefix KV caches."""


@cache.command("build")
@model_options
@kv_bits_option
def cache_build(model, prompt, kv_bits):
    """Build (or find) the prefix cache for a model and prompt."""
    assistant = load_assistant(model, prompt, kv_bits, no_cache=False)
    pc = assistant.prefix
    if not pc.saved:
        raise UrialError("the prefix cache was built but not saved (see the warning above)")
    click.echo(f"{'found' if pc.hit else 'built'} {len(pc.tokens)}-token prefix in {pc.seconds:.2f}s", err=True)
    click.echo(str(pc.path))


@cache.command("list")
def cache_list():
    """Cache files, newest first."""
    from ..runtime.prefix_cache import list_caches  # imports MLX

    for row in list_caches():
        if row.get("damaged"):
            click.echo(f"{row['key']}  {format_size(row['size']):>9}  DAMAGED")
        else:
            model = Path(str(row.get("model"))).name
            click.echo(f"{row['key']}  {format_size(row['size']):>9}  {row.get('prefix_tokens')} tok  "
                       f"kv={row.get('kv_bits')}  {model} / {row.get('prompt')}")


@cache.command("verify")
def cache_verify():
    """Check every cache file's integrity; exit 1 if any is damaged."""
    from ..runtime.prefix_cache import verify_caches  # imports MLX

    bad = 0
    for path, problem in verify_caches():
        click.echo(f"{'ok' if problem is None else 'BAD'}  {path.name}" + (f"  {problem}" if problem else ""))
        bad += problem is not None
    if bad:
        sys.exit(EXIT_ERROR)


@cache.command("clear")
@click.option("--older-than", type=DURATION, default=None, metavar="DURATION",
              help="Only files unused for this long (7d, 12h).")
@click.option("--max-size", type=SIZE, default=None, metavar="SIZE",
              help="Delete the oldest files beyond this total (500M).")
def cache_clear(older_than, max_size):
    """Delete cache files (all, or by age / total size)."""
    from ..runtime.prefix_cache import clear_caches  # imports MLX

    removed = clear_caches(older_than, max_size)
    click.echo(f"removed {len(removed)} cache file(s)", err=True)


@cache.command("path")
def cache_path():
    """Print the cache directory."""
    click.echo(str(cache_dir()))
