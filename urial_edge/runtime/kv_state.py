"""KV states of one sequence: made for a model, filled by a prefill, copied, checked against a model.

A state is a list of mlx-lm caches, one per layer (``KVCache``, ``RotatingKVCache``
for sliding-window layers, ``QuantizedKVCache`` when stored with ``--kv-bits``).
The prefix cache, saved sessions and the engine all hold states of this kind.
"""

from typing import List, Optional

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import cache as mlx_cache

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


def geometry(cache: list) -> List[dict]:
    """What each layer of a state is, as JSON: its kind, its numbers (offset, window size and keep, ...)
    and the shape and dtype of every array. Recorded in every file, so that a file whose tensors were
    changed is found without the model (``cache verify``)."""
    layers = []
    for c in cache:
        arrays, numbers = [], []
        for _, x in tree_flatten(c.state):
            if isinstance(x, mx.array):
                arrays.append([list(x.shape), str(x.dtype)])
            else:
                numbers.append(x)
        layers.append({"kind": type(c).__name__, "numbers": numbers, "arrays": arrays})
    return layers


def _positions(c) -> Optional[int]:
    keys = c.keys[0] if isinstance(c.keys, (tuple, list)) else c.keys
    return None if keys is None else keys.shape[2]


def layout_problem(cache: list) -> Optional[str]:
    """Why ``cache`` is not a consistent state of one sequence, whatever the model (None if it is):
    every layer's keys and values are 4-d, for one sequence, hold as many positions as each other,
    and enough for the tokens the layer claims."""
    for i, c in enumerate(cache):
        arrays = [a for _, a in tree_flatten([c.keys, c.values]) if isinstance(a, mx.array)]
        if not arrays or any(a.ndim != 4 or a.shape[0] != 1 for a in arrays):
            return f"layer {i} has arrays of shapes {[tuple(a.shape) for a in arrays]}"
        n = _positions(c)
        if any(a.shape[2] != n for a in arrays):
            return f"layer {i} has keys and values of different lengths"
        window = getattr(c, "max_size", None)
        need = c.offset if window is None else min(c.offset, window)
        if n < need or (window is not None and not 0 <= c._idx <= n):
            return f"layer {i} holds {n} positions for {c.offset} tokens"
    return None


def _expected(model, kv_bits: Optional[int]) -> list:
    """The model's empty state after one token, built lazily (shapes and dtypes only: nothing is computed)."""
    cache = make_cache(model, kv_bits)
    model(mx.array([[0]]), cache=cache)
    return cache


def check_fits(cache: list, model, kv_bits: Optional[int], n_tokens: int) -> Optional[str]:
    """Why ``cache`` cannot be used with ``model`` (None if it can): the layers, their kinds, window sizes
    and keep counts, quantization, and the shape (but for the positions) and dtype of every array must be
    those the model makes, and every layer must hold ``n_tokens`` tokens."""
    problem = layout_problem(cache)
    if problem:
        return problem
    expected = _expected(model, kv_bits)
    if len(cache) != len(expected):
        return f"{len(cache)} layers in the file, {len(expected)} in the model"
    for i, (c, e) in enumerate(zip(cache, expected)):
        if type(c) is not type(e):
            return f"layer {i} is {type(c).__name__}, the model needs {type(e).__name__}"
        if c.offset != n_tokens:
            return f"layer {i} holds {c.offset} tokens, the prefix has {n_tokens}"
        for name in ("max_size", "keep", "group_size", "bits"):
            if getattr(c, name, None) != getattr(e, name, None):
                return f"layer {i} has {name} {getattr(c, name, None)}, the model needs {getattr(e, name, None)}"
        have, need = geometry([c])[0]["arrays"], geometry([e])[0]["arrays"]
        if [(s[:2] + s[3:], t) for s, t in have] != [(s[:2] + s[3:], t) for s, t in need]:
            return f"layer {i} has arrays of {have}, the model needs {need} (but for the positions)"
    return None
