"""The URIAL prefix's KV state: built once, stored on disk, resumed from.

A cache file is named by a content key: a SHA-256 over everything that changes
the stored keys and values (model weights, tokenizer, the exact prefix token
ids, KV quantization, file format and library versions). Change any of them
and a new file is built; a stale file is never used.

Files are mlx-lm prompt caches (``mlx_lm.models.cache.load_prompt_cache`` reads
them) whose metadata also records, in plain words, what they were built from,
plus a checksum of the tensor data. A file that fails to load, fails its
checksum or does not fit the loaded model is rebuilt with a one-line warning.
"""

import contextlib
import hashlib
import json
import os
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from .generate import prefill
from .store import Progress, UrialError, atomic_file, cache_dir, describe_os_error, ensure_dir, one_line


import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import cache as mlx_cache

FORMAT_VERSION = 1
KV_GROUP_SIZE = 64


@dataclass
class PrefixCache:
    """A loaded prefix state. Use :meth:`fresh` for every request."""

    key: str
    tokens: List[int]
    state: list
    path: Path
    hit: bool
    seconds: float

    def fresh(self) -> list:
        """An independent copy of the prefix state that a request may extend."""
        return copy_cache(self.state)


def copy_cache(cache: list) -> list:
    def copy(x):
        return mx.array(x) if isinstance(x, mx.array) else x

    return [type(c).from_state(tree_map(copy, c.state)) for c in cache]


def library_versions() -> dict:
    from mlx_lm._version import __version__ as mlx_lm_version  # not mlx_lm itself: see startup.light_mlx_lm

    return {"mlx": mx.__version__, "mlx_lm": mlx_lm_version}


def cache_key(model_id: str, tokenizer_id: str, tokens: List[int], kv_bits: Optional[int]) -> str:
    parts = {
        "format": FORMAT_VERSION,
        "model": model_id,
        "tokenizer": tokenizer_id,
        "tokens": hashlib.sha256(json.dumps(tokens).encode()).hexdigest(),
        "kv_bits": kv_bits,
        "kv_group_size": KV_GROUP_SIZE if kv_bits else None,
        "libraries": library_versions(),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def make_cache(model, kv_bits: Optional[int] = None) -> list:
    """The model's empty KV cache; with ``kv_bits``, full-attention layers store quantized KV."""
    cache = mlx_cache.make_prompt_cache(model)
    if kv_bits:
        cache = [
            mlx_cache.QuantizedKVCache(group_size=KV_GROUP_SIZE, bits=kv_bits)
            if type(c) is mlx_cache.KVCache else c
            for c in cache
        ]
    return cache


def checksum(cache: list) -> str:
    """CRC-32 over every array in the cache state, in order."""
    crc = 0
    for _, x in tree_flatten([c.state for c in cache]):
        if isinstance(x, mx.array):
            crc = zlib.crc32(memoryview(x.view(mx.uint8)), crc)
        else:
            crc = zlib.crc32(repr(x).encode(), crc)
    return f"{crc:08x}"


def check_fits(cache: list, model, kv_bits: Optional[int], n_tokens: int) -> Optional[str]:
    """Why ``cache`` cannot be used with ``model`` (None if it can)."""
    expected = make_cache(model, kv_bits)
    if len(cache) != len(expected):
        return f"{len(cache)} layers in the file, {len(expected)} in the model"
    probe = model.layers[0].self_attn if hasattr(model.layers[0], "self_attn") else None
    n_kv = getattr(probe, "n_kv_heads", None)
    dtype = model_dtype(model)
    for i, (c, e) in enumerate(zip(cache, expected)):
        if type(c) is not type(e):
            return f"layer {i} is {type(c).__name__}, the model needs {type(e).__name__}"
        if c.offset != n_tokens:
            return f"layer {i} holds {c.offset} tokens, the prefix has {n_tokens}"
        keys = c.keys[0] if isinstance(c.keys, (tuple, list)) else c.keys
        if keys is None or keys.ndim != 4 or keys.shape[0] != 1 or (n_kv and keys.shape[1] != n_kv):
            return f"layer {i} has keys of shape {None if keys is None else keys.shape}"
        if not isinstance(c.keys, (tuple, list)) and keys.dtype != dtype:
            return f"layer {i} stores {keys.dtype}, the model computes in {dtype}"
    return None


def model_dtype(model):
    """The dtype activations (and so the KV cache) have: that of the norm weights."""
    params = tree_flatten(model.parameters())
    return next((v.dtype for k, v in params if k.endswith("norm.weight")), params[0][1].dtype)


def build(model, tokens: List[int], kv_bits: Optional[int], progress: Optional[Progress] = None) -> list:
    cache = make_cache(model, kv_bits)
    prefill(model, tokens, cache, progress)
    return cache


def save(path: Path, cache: list, metadata: dict) -> None:
    """Write the cache atomically (temporary file, then rename)."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    meta["checksum"] = checksum(cache)
    with atomic_file(path) as tmp:
        staged = tmp.with_name(tmp.name + ".safetensors")
        try:
            mlx_cache.save_prompt_cache(str(staged), cache, meta)
            os.replace(staged, tmp)
        finally:
            staged.unlink(missing_ok=True)


def load(path: Path) -> tuple:
    """Read a cache file; raise ValueError with the reason if it is damaged."""
    try:
        cache, meta = mlx_cache.load_prompt_cache(str(path), return_metadata=True)
    except Exception as e:
        raise ValueError(f"unreadable ({one_line(e)})") from None
    if meta.get("checksum") != checksum(cache):
        raise ValueError("checksum mismatch (the file is damaged)")
    return cache, meta


def warn(message: str) -> None:
    sys.stderr.write(f"warning: {' '.join(message.split())}\n")


@contextlib.contextmanager
def build_lock(path: Path):
    """Serialise builders of the same key across processes (best effort)."""
    try:
        import fcntl

        f = open(path.with_suffix(".lock"), "w")
    except (ImportError, OSError):
        yield
        return
    try:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(f, fcntl.LOCK_UN)
        f.close()


def load_or_build(
    model,
    tokens: List[int],
    model_id: str,
    tokenizer_id: str,
    description: dict,
    kv_bits: Optional[int] = None,
    use_disk: bool = True,
    progress: Optional[Progress] = None,
) -> PrefixCache:
    """Return the prefix state for ``tokens``: from disk when valid, else built (and saved)."""
    if kv_bits not in (None, 4, 8):
        raise UrialError(f"invalid KV cache bits {kv_bits!r}: use 4, 8 or none")
    started = time.perf_counter()
    key = cache_key(model_id, tokenizer_id, tokens, kv_bits)
    path = cache_dir() / f"{key}.safetensors"
    if not use_disk:
        return PrefixCache(key, tokens, build(model, tokens, kv_bits, progress), path, False,
                           time.perf_counter() - started)
    seen = _mtime(path)
    found = _try_load(path, model, kv_bits, tokens)
    if found is not None:
        return PrefixCache(key, tokens, found, path, True, time.perf_counter() - started)
    writable = _writable_dir(cache_dir())
    with build_lock(path) if writable else contextlib.nullcontext():
        if writable and _mtime(path) != seen:  # another process built it meanwhile
            found = _try_load(path, model, kv_bits, tokens)
        if found is not None:
            return PrefixCache(key, tokens, found, path, True, time.perf_counter() - started)
        cache = build(model, tokens, kv_bits, progress)
        metadata = {
            **description,
            "prefix_tokens": len(tokens),
            "kv_bits": kv_bits or "none",
            "format_version": FORMAT_VERSION,
            "libraries": library_versions(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "key": key,
        }
        if writable:
            try:
                save(path, cache, metadata)
            except UrialError as e:
                warn(f"prefix cache not saved: {e}")
    return PrefixCache(key, tokens, cache, path, False, time.perf_counter() - started)


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


def _try_load(path: Path, model, kv_bits: Optional[int], tokens: List[int]) -> Optional[list]:
    if not path.exists():
        return None
    try:
        cache, meta = load(path)
    except ValueError as e:
        warn(f"prefix cache {path.name} {e}; rebuilding it")
        return None
    problem = check_fits(cache, model, kv_bits, len(tokens))
    if problem:
        warn(f"prefix cache {path.name} does not fit this model ({problem}); rebuilding it")
        return None
    return cache


def list_caches() -> List[dict]:
    rows = []
    folder = cache_dir()
    if not folder.is_dir():
        return rows
    for f in sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_mtime, reverse=True):
        st = f.stat()
        row = {"key": f.stem, "path": str(f), "size": st.st_size, "modified": st.st_mtime}
        try:
            _, meta = mlx_cache.load_prompt_cache(str(f), return_metadata=True)
            row.update({k: meta.get(k) for k in ("model", "prompt", "prefix_tokens", "kv_bits")})
        except Exception:
            row["damaged"] = True
        rows.append(row)
    return rows


def verify_caches() -> List[tuple]:
    """``(path, problem or None)`` for every cache file."""
    results = []
    folder = cache_dir()
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            _, meta = load(f)
            problem = None if meta.get("key") == f.stem else "its name does not match its key"
        except ValueError as e:
            problem = str(e)
        results.append((f, problem))
    return results


def clear_caches(older_than: Optional[float] = None, max_size: Optional[int] = None) -> List[Path]:
    """Delete cache files: all, those unused for ``older_than`` seconds, or the oldest beyond ``max_size`` bytes."""
    folder = cache_dir()
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("*.safetensors"), key=lambda p: p.stat().st_atime, reverse=True)
    now = time.time()
    doomed = []
    total = 0
    for f in files:
        st = f.stat()
        total += st.st_size
        if older_than is not None and now - max(st.st_atime, st.st_mtime) > older_than:
            doomed.append(f)
        elif max_size is not None and total > max_size:
            doomed.append(f)
        elif older_than is None and max_size is None:
            doomed.append(f)
    for f in doomed:
        f.unlink(missing_ok=True)
        f.with_suffix(".lock").unlink(missing_ok=True)
    for tmp in folder.glob(".*.tmp*"):
        if now - tmp.stat().st_mtime > 3600:
            tmp.unlink(missing_ok=True)
    return doomed
