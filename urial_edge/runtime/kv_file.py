"""The file format of stored KV states (prefix caches and chat sessions).

A file is an mlx-lm prompt cache (``mlx_lm.models.cache.load_prompt_cache``
reads it) whose metadata also carries a CRC-32 of the tensor data and the state's
geometry (each layer's kind, numbers, and array shapes and dtypes). It is written
atomically and durably (``disk.files.atomic_file``); :func:`load` refuses a file
that cannot be read, fails its checksum, is not a consistent state, or whose
tensors are not those its geometry records (damage a recomputed checksum hides).
What a file claims to hold (its key, its token ids) and whether it fits a model
are checked by its owner, which knows what to expect.
"""

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any, List, Tuple

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.models import cache as mlx_cache

from ..disk.files import atomic_file, failed_write
from ..errors import one_line
from .kv_state import geometry, layout_problem


def checksum(cache: list) -> str:
    """CRC-32 over every array in the cache state, in order."""
    crc = 0
    for _, x in tree_flatten([c.state for c in cache]):
        if isinstance(x, mx.array):
            crc = zlib.crc32(memoryview(x.view(mx.uint8)), crc)
        else:
            crc = zlib.crc32(repr(x).encode(), crc)
    return f"{crc:08x}"


def tokens_digest(tokens: List[int]) -> str:
    """SHA-256 of a list of token ids, as files record the ids they hold."""
    return hashlib.sha256(json.dumps(list(tokens)).encode()).hexdigest()


def library_versions() -> dict:
    """The versions that shape a stored state's layout (part of every prefix cache's key)."""
    from mlx_lm._version import __version__ as mlx_lm_version  # not mlx_lm itself: see model/backend.py

    return {"mlx": mx.__version__, "mlx_lm": mlx_lm_version}


def save(path: Path, cache: list, metadata: dict) -> None:
    """Write the state atomically and durably, with a checksum of its data and its geometry (values become
    JSON strings). A full disk is a UrialError: MLX reports failed writes as RuntimeError, not OSError."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["checksum"] = checksum(cache)
    meta["geometry"] = json.dumps(geometry(cache))
    with atomic_file(path, suffix=".safetensors") as tmp:
        try:
            mlx_cache.save_prompt_cache(str(tmp), cache, meta)
        except RuntimeError as e:
            raise failed_write(tmp, one_line(e)) from None


def load(path: Path) -> Tuple[list, dict]:
    """Read a state file; raise ValueError with the reason if it is damaged."""
    try:
        cache, meta = mlx_cache.load_prompt_cache(str(path), return_metadata=True)
    except Exception as e:
        raise ValueError(f"unreadable ({one_line(e)})") from None
    if meta.get("checksum") != checksum(cache):
        raise ValueError("checksum mismatch (the file is damaged)")
    problem = layout_problem(cache)
    if problem:
        raise ValueError(f"is not a consistent state ({problem})")
    if "geometry" in meta and meta["geometry"] != json.dumps(geometry(cache)):
        raise ValueError("has tensors of other shapes than its metadata records (the file was changed)")
    return cache, meta


def header_metadata(path: Path) -> dict:
    """The metadata a file was saved with, read from its header alone ({} if the header is damaged).

    For listings (no tensor is read) and for files whose tensor data is damaged.
    mlx-lm stores ``[metadata, cache classes, scalars]`` flattened; the metadata comes first.
    """
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header: Any = json.loads(f.read(size)) if 0 < size < 1 << 26 else {}
        flat = header.get("__metadata__", {}) if isinstance(header, dict) else {}
        meta = tree_unflatten(list(flat.items()))[0]
    except (OSError, ValueError, TypeError, KeyError, IndexError, AttributeError):
        return {}
    return meta if isinstance(meta, dict) else {}
