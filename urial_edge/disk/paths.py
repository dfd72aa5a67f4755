"""Where urial-edge keeps things on disk.

Layout under ``$URIAL_EDGE_HOME`` (default ``~/.cache/urial-edge``)::

    models/<name>/              MLX model directories (config, safetensors, tokenizer)
    cache/<key>.safetensors     prefix KV caches, named by their content key
    sessions/<name>.safetensors saved chat sessions (one file each)
    sessions/.shards/<size>-<mode>/rank<r>/<name>.safetensors  a rank's part of a split model's session
    servers/<key>-<port>.json   records of running ``urial-edge serve`` processes
    tokenizers/                 vocabulary indexes and remembered prefix token ids
"""

import os
from pathlib import Path

from ..errors import UrialError, describe_os_error


def home() -> Path:
    env = os.environ.get("URIAL_EDGE_HOME")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "urial-edge"


def models_dir() -> Path:
    return home() / "models"


def cache_dir() -> Path:
    return home() / "cache"


def sessions_dir() -> Path:
    return home() / "sessions"


def servers_dir() -> Path:
    return home() / "servers"


def tokenizers_dir() -> Path:
    return home() / "tokenizers"


def ensure_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UrialError(describe_os_error(e, path)) from None
    return path


# where a source checkout keeps a kind of data, when not at the top level of the repository
SOURCE_DIRS = {"eval": "benchmarks/eval"}


def package_data(kind: str, name: str) -> Path:
    """A shipped data file: ``prompts/...``, ``models/...`` or ``eval/...`` (the question set).

    Wheels carry them inside the package (``urial_edge/data/<kind>``); a source
    checkout keeps them at the top level of the repository (see :data:`SOURCE_DIRS`).
    """
    package = Path(__file__).resolve().parent.parent
    for base in (package / "data" / kind, package.parent / SOURCE_DIRS.get(kind, kind)):
        if (base / name).exists():
            return base / name
    return package / "data" / kind / name
