"""Loading this rank's part of a model split over several processes.

mlx-lm's model classes split themselves: ``model.shard(group)`` (tensor
parallel: each rank holds a slice of every layer's heads and MLP columns) or
``model.model.pipeline(group)`` (each rank holds a run of layers). mlx-lm's
``sharded_load`` wraps the same three steps (load lazily, split, evaluate);
urial-edge runs them on its own loader because ``sharded_load`` also builds
mlx-lm's tokenizer (importing transformers, seconds on every rank) and
pipelines only checkpoints with a weight index.
"""

import math
import os
from pathlib import Path
from typing import Any, List, Optional, Tuple

from ..errors import UrialError, one_line
from ..model.loading import load_model
from ..model.store import resolve_model
from .world import _all_sum, is_leader, world

SHARDING_ENV = "URIAL_EDGE_SHARDING"  # "tensor" or "pipeline" to choose for models that have both


def load(spec: Optional[str]) -> Tuple[Path, Any, dict, Optional[dict]]:
    """Resolve and load a model: whole in one process, this rank's part under a launcher.

    Returns ``(path, model, config, shard)``; ``shard`` is ``{"rank", "size",
    "mode"}`` for a split model (it goes into the prefix cache's key) and None
    otherwise.
    """
    import mlx.core as mx

    w = world()
    path = _resolve_in_turn(spec)
    if w.size == 1:
        return (path, *load_model(path), None)
    model, config = load_model(path, lazy=True)
    mode = split_model(model, config, w.group)
    mx.eval(model.parameters())  # reads only the weights this rank kept
    return path, model, config, {"rank": w.rank, "size": w.size, "mode": mode}


def _resolve_in_turn(spec: Optional[str]) -> Path:
    """Rank 0 resolves first (converting the model once); then the others find it in place."""
    path = resolve_model(spec) if is_leader() else None
    w = world()
    if w.size > 1:
        import mlx.core as mx

        _all_sum(w, [0], mx.int32)  # a barrier: rank 0 is done
    return path or resolve_model(spec)


def split_model(model, config: dict, group) -> str:
    """Split ``model`` (weights not yet read) among ``group``'s ranks in place; returns the mode used."""
    size = group.size()
    mode = sharding_mode(model, config, size)
    try:
        if mode == "tensor":
            model.shard(group)
        else:
            model.model.pipeline(group)
    except (ValueError, AssertionError) as e:
        raise UrialError(f"cannot split model type {config.get('model_type')!r} over {size} ranks: "
                         f"{one_line(e)}") from None
    return mode


def sharding_mode(model, config: dict, size: int) -> str:
    """"tensor" where the architecture has ``shard`` and the heads divide, else "pipeline"; else a one-line error."""
    arch = config.get("model_type")
    has = {"tensor": hasattr(model, "shard"), "pipeline": hasattr(getattr(model, "model", None), "pipeline")}
    wanted = os.environ.get(SHARDING_ENV, "").strip().lower() or None
    cannot = f"model type {arch!r} cannot be split over {size} ranks"
    if wanted not in (None, "tensor", "pipeline"):
        raise UrialError(f"{SHARDING_ENV} must be 'tensor' or 'pipeline', got {wanted!r}")
    if not any(has.values()):
        raise UrialError(f"{cannot}: mlx-lm has neither tensor nor pipeline parallelism for it (architectures "
                         f"that have: {', '.join(splittable_architectures())})")
    if wanted and not has[wanted]:
        raise UrialError(f"{cannot} in {wanted} mode ({SHARDING_ENV}): mlx-lm does not have it for this architecture")
    problem = head_problem(config, size)
    if wanted == "tensor" or (wanted is None and has["tensor"] and (problem is None or not has["pipeline"])):
        if problem:
            raise UrialError(f"{cannot}: {problem}")
        return "tensor"
    layers = len(model.model.layers)
    if layers < size:
        raise UrialError(f"{cannot}: it has {layers} layers, fewer than the ranks")
    return "pipeline"


def head_problem(config: dict, size: int) -> Optional[str]:
    """Why tensor parallelism cannot split this model's attention heads evenly (None if it can)."""
    heads = config.get("num_attention_heads")
    kv_heads = config.get("num_key_value_heads") or heads
    if not isinstance(heads, int) or (heads % size == 0 and kv_heads % size == 0):
        return None
    common = math.gcd(heads, kv_heads)
    fits = [n for n in range(2, common + 1) if common % n == 0]
    hint = f"it splits over {' or '.join(map(str, fits[:4]))} ranks" if fits else "it cannot be split by heads"
    return f"its {heads} query heads and {kv_heads} key/value heads do not divide by {size} ({hint})"


def splittable_architectures() -> List[str]:
    """mlx-lm's model types with tensor or pipeline parallelism, read from its sources (no imports)."""
    import mlx_lm.models

    folder = Path(mlx_lm.models.__file__).parent
    return sorted(f.stem for f in folder.glob("*.py")
                  if any(mark in f.read_text() for mark in ("def shard(", "(PipelineMixin")))
