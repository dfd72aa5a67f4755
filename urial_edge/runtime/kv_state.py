"""KV states of one sequence: made for a model, filled by a prefill, copied, checked against a model.

A state is a list of mlx-lm caches, one per layer (``KVCache``, ``RotatingKVCache``
for sliding-window layers, ``QuantizedKVCache`` when stored with ``--kv-bits``).
The prefix cache, saved sessions and the engine all hold states of this kind.
"""

from typing import List, Optional

import mlx.core as mx
from mlx.utils import tree_map
from mlx_lm.models import cache as mlx_cache

from ..model.loading import model_dtype
from ..progress import Progress

PREFILL_STEP = 512  # tokens per forward pass when filling a state (the engine's chunk size too)
KV_GROUP_SIZE = 64


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


def prefill(model, tokens: List[int], cache: list, progress: Optional[Progress] = None) -> None:
    """Run ``tokens`` through the model to fill ``cache`` (one sequence), in chunks."""
    total = len(tokens)
    for start in range(0, total, PREFILL_STEP):
        chunk = mx.array(tokens[start:start + PREFILL_STEP])[None]
        model(chunk, cache=cache)
        mx.eval([c.state for c in cache])
        if progress:
            progress(min(start + PREFILL_STEP, total), total)


def build(model, tokens: List[int], kv_bits: Optional[int] = None, progress: Optional[Progress] = None) -> list:
    """A new state holding ``tokens``."""
    cache = make_cache(model, kv_bits)
    prefill(model, tokens, cache, progress)
    return cache


def dequantized(c):
    """A float ``KVCache`` with the contents of a ``QuantizedKVCache`` (other caches as they are).

    mlx-lm's batch caches hold float keys and values, so a quantized prefix is
    stored small and expanded per request.
    """
    if not isinstance(c, mlx_cache.QuantizedKVCache):
        return c
    out = mlx_cache.KVCache()
    if c.keys is not None:
        out.keys = mx.dequantize(*c.keys, group_size=c.group_size, bits=c.bits)[..., :c.offset, :]
        out.values = mx.dequantize(*c.values, group_size=c.group_size, bits=c.bits)[..., :c.offset, :]
    out.offset = c.offset
    return out


def copy_cache(cache: list) -> list:
    """An independent copy of a state."""
    def copy(x):
        return mx.array(x) if isinstance(x, mx.array) else x

    return [type(c).from_state(tree_map(copy, c.state)) for c in cache]


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
