"""The URIAL prefix's KV state: built once, stored on disk, resumed from.

A cache file is named by a content key: a SHA-256 over everything that changes
the stored keys and values (model weights, tokenizer, the exact prefix token
ids, KV quantization, file format and library versions). Change any of them
and a new file is built; a stale file is never used.

Files are mlx-lm prompt caches (``mlx_lm.models.cache.load_prompt_cache`` reads
them) whose metadata also records, in plain words, what they were built from,
the key, a hash of the token ids and a checksum of the tensor data. On load all
of it is checked: a file that fails to load, fails its checksum, carries another
key or other tokens (a file copied over another), or does not fit the loaded
model (its layers, their kinds, window sizes and keep counts, head sizes and
positions: ``kv_state.check_fits``) is rebuilt with a one-line warning, so an
answer never comes from a state that is not the one asked for.

A model split over several ranks (``distributed/``) keeps one file per rank (the
key names the rank, the number of ranks and the split); the ranks use their
files only if every rank's is valid, else all rebuild theirs together.

The folder is kept under a size cap (``URIAL_EDGE_CACHE_MAX``, default 2G):
after a new file is saved, the least recently used ones beyond it are removed.
"""

import contextlib
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from ..disk.files import file_lock, is_temporary, remove_stale_temporaries
from ..disk.paths import cache_dir, ensure_dir
from ..distributed.world import all_ranks_have
from ..errors import UrialError, describe_os_error
from ..log import warn
from ..progress import Progress
from ..units import parse_size
from . import kv_file
from .kv_file import library_versions, tokens_digest
from .kv_state import KV_GROUP_SIZE, build, check_fits, dequantized
from .options import parse_kv_bits

FORMAT_VERSION = 3  # 3: files record their geometry (kv_file)
DEFAULT_MAX_BYTES = "2G"


@dataclass
class PrefixCache:
    """A loaded prefix state, shared read-only by every request that starts from it."""

    key: str
    tokens: List[int]
    state: list
    path: Path
    hit: bool
    seconds: float
    saved: bool = False  # the state is in its file (found there, or built and written)

    def fresh(self) -> list:
        """The state as float caches a request can start from (quantized layers dequantized)."""
        return [dequantized(c) for c in self.state]


def cache_key(model_id: str, tokenizer_id: str, tokens: List[int], kv_bits: Optional[int],
              shard: Optional[dict] = None) -> str:
    """The content key; ``shard`` (rank, world size, mode) separates the slices of a sharded model."""
    parts = {
        "format": FORMAT_VERSION,
        "model": model_id,
        "tokenizer": tokenizer_id,
        "tokens": tokens_digest(tokens),
        "kv_bits": kv_bits,
        "kv_group_size": KV_GROUP_SIZE if kv_bits else None,
        "libraries": library_versions(),
    }
    if shard:
        parts["shard"] = shard
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def load_or_build(
    model,
    tokens: List[int],
    model_id: str,
    tokenizer_id: str,
    description: dict,
    kv_bits: Optional[int] = None,
    use_disk: bool = True,
    progress: Optional[Progress] = None,
    shard: Optional[dict] = None,
) -> PrefixCache:
    """Return the prefix state for ``tokens``: from disk when valid, else built (and saved)."""
    kv_bits = parse_kv_bits(kv_bits)
    started = time.perf_counter()
    key = cache_key(model_id, tokenizer_id, tokens, kv_bits, shard)
    path = cache_dir() / f"{key}.safetensors"
    if not use_disk:
        return PrefixCache(key, tokens, build(model, tokens, kv_bits, progress), path, False,
                           time.perf_counter() - started)
    seen = _mtime(path)
    found = _try_load(path, key, model, kv_bits, tokens)
    if shard and not all_ranks_have(found is not None, f"prefix cache {path.name}"):
        found = None  # a split model: every rank uses its stored part, or all rebuild together
    if found is not None:
        return PrefixCache(key, tokens, found, path, True, time.perf_counter() - started, saved=True)
    writable = _writable_dir(cache_dir())
    lock = file_lock(path.with_suffix(".lock")) if writable else None
    with lock if lock is not None else contextlib.nullcontext():
        if not shard and writable and _mtime(path) != seen:  # another process built it meanwhile
            found = _try_load(path, key, model, kv_bits, tokens)
        if found is not None:
            return PrefixCache(key, tokens, found, path, True, time.perf_counter() - started, saved=True)
        cache = build(model, tokens, kv_bits, progress)
        metadata = {
            **description,
            "prefix_tokens": len(tokens),
            "tokens_sha256": tokens_digest(tokens),
            "kv_bits": kv_bits or "none",
            "format_version": FORMAT_VERSION,
            "libraries": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "key": key,
            **({"shard": shard} if shard else {}),
        }
        saved = writable and _save(path, cache, metadata)
    if writable:
        enforce_limit(keep=path)
    return PrefixCache(key, tokens, cache, path, False, time.perf_counter() - started, saved)


def _save(path: Path, cache: list, metadata: dict) -> bool:
    """Write a built state; a store that cannot take it (full, read-only) is a warning: the answer comes anyway."""
    try:
        kv_file.save(path, cache, metadata)
    except UrialError as e:
        warn(f"prefix cache not saved: {e}")
        return False
    return True


def _mtime(path: Path) -> Optional[int]:
    try:
        return path.stat().st_mtime_ns
    except OSError:
        return None


def _writable_dir(path: Path) -> bool:
    try:
        ensure_dir(path)
    except UrialError as e:
        warn(f"prefix cache not saved: {e}")
        return False
    if not os.access(path, os.W_OK):
        warn(f"prefix cache not saved: {describe_os_error(PermissionError(13, 'read-only'), path)}")
        return False
    return True


def identity_problem(meta: dict, key: str, tokens: List[int]) -> Optional[str]:
    """Why a file's metadata says it holds something other than ``key`` / ``tokens`` (None if it does not)."""
    if meta.get("key") != key:
        return "its metadata names another key (a file copied over this one?)"
    if meta.get("tokens_sha256") != tokens_digest(tokens):
        return "it holds other tokens than this prompt's"
    return None


def _try_load(path: Path, key: str, model, kv_bits: Optional[int], tokens: List[int]) -> Optional[list]:
    if not path.exists():
        return None
    try:
        cache, meta = kv_file.load(path)
    except ValueError as e:
        warn(f"prefix cache {path.name} {e}; rebuilding it")
        return None
    problem = identity_problem(meta, key, tokens)
    if problem:
        warn(f"prefix cache {path.name} is not this prompt's state ({problem}); rebuilding it")
        return None
    problem = check_fits(cache, model, kv_bits, len(tokens))
    if problem:
        warn(f"prefix cache {path.name} does not fit this model ({problem}); rebuilding it")
        return None
    _touch(path)
    return cache


def _touch(path: Path) -> None:
    """Mark a file as used (its access time) for the size cap; the modification time stays."""
    try:
        st = path.stat()
        os.utime(path, ns=(time.time_ns(), st.st_mtime_ns))
    except OSError:
        pass


def _cache_files() -> List[Path]:
    folder = cache_dir()
    if not folder.is_dir():
        return []
    return [f for f in folder.glob("*.safetensors") if not is_temporary(f)]


def _last_used(f: Path) -> float:
    st = f.stat()
    return max(st.st_atime, st.st_mtime)


def max_bytes() -> int:
    """The cap on the cache folder's size (``URIAL_EDGE_CACHE_MAX``, e.g. ``500M``; ``0`` for none)."""
    return parse_size(os.environ.get("URIAL_EDGE_CACHE_MAX") or DEFAULT_MAX_BYTES)


def enforce_limit(keep: Optional[Path] = None) -> List[Path]:
    """Remove the least recently used cache files beyond :func:`max_bytes` (never ``keep``)."""
    try:
        limit = max_bytes()
    except UrialError as e:
        warn(f"URIAL_EDGE_CACHE_MAX ignored: {e}")
        return []
    if not limit:
        return []
    return clear_caches(max_size=limit, keep=keep)


def list_caches() -> List[dict]:
    rows = []
    for f in sorted(_cache_files(), key=lambda p: p.stat().st_mtime, reverse=True):
        st = f.stat()
        row = {"key": f.stem, "path": str(f), "size": st.st_size, "modified": st.st_mtime}
        meta = kv_file.header_metadata(f)
        if meta:
            row.update({k: meta.get(k) for k in ("model", "prompt", "prefix_tokens", "kv_bits")})
        else:
            row["damaged"] = True
        rows.append(row)
    return rows


def verify_caches() -> List[tuple]:
    """``(path, problem or None)`` for every cache file (temporary files of writers are skipped)."""
    results = []
    for f in sorted(_cache_files()):
        try:
            _, meta = kv_file.load(f)
            problem = None if meta.get("key") == f.stem else "its name does not match its key"
        except ValueError as e:
            problem = str(e)
        results.append((f, problem))
    return results


def clear_caches(older_than: Optional[float] = None, max_size: Optional[int] = None,
                 keep: Optional[Path] = None) -> List[Path]:
    """Delete cache files: all, those unused for ``older_than`` seconds, or the least recently used
    beyond ``max_size`` bytes. Temporary files left by killed writers go too."""
    files = sorted(_cache_files(), key=_last_used, reverse=True)
    if keep is not None and keep in files:  # the file just written counts first
        files.remove(keep)
        files.insert(0, keep)
    now = time.time()
    doomed = []
    total = 0
    for f in files:
        total += f.stat().st_size
        if f == keep:
            continue
        if older_than is not None and now - _last_used(f) > older_than:
            doomed.append(f)
        elif max_size is not None and total > max_size:
            doomed.append(f)
        elif older_than is None and max_size is None:
            doomed.append(f)
    for f in doomed:
        f.unlink(missing_ok=True)
        f.with_suffix(".lock").unlink(missing_ok=True)
    stale = older_than if older_than is not None else 0.0
    remove_stale_temporaries(cache_dir(), min(stale, 600.0) if max_size is None else 600.0)
    return doomed
