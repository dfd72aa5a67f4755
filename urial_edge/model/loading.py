"""Building mlx-lm model objects and loading MLX weights into them.

Both the model store (loading a model directory) and the GGUF importer
(re-quantizing converted weights) need this; it depends on neither.
"""

import importlib
import json
from pathlib import Path

from ..errors import UrialError, one_line
from .backend import prepare, warn_if_slow_blas


def read_config(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise UrialError(f"cannot read {path / 'config.json'}: {e}") from None


def weight_files(path: Path) -> list:
    return sorted(path.glob("model*.safetensors")) or sorted(path.glob("*.safetensors"))


def _model_classes(model_type: str):
    try:
        arch = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        from mlx_lm.utils import MODEL_REMAPPING

        remapped = MODEL_REMAPPING.get(model_type)
        try:
            arch = importlib.import_module(f"mlx_lm.models.{remapped}")
        except (ImportError, ValueError):
            raise UrialError(f"model type {model_type!r} is not supported by mlx-lm") from None
    return arch.Model, arch.ModelArgs


def build_model(config: dict):
    """Instantiate mlx-lm's model class for ``config`` (weights uninitialised)."""
    model_class, args_class = _model_classes(config["model_type"])
    return model_class(args_class.from_dict(config))


def load_weights(path: Path) -> dict:
    import mlx.core as mx

    files = weight_files(path)
    if not files:
        raise UrialError(f"no weights (*.safetensors) in {path}")
    weights = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except Exception as e:
            raise UrialError(f"cannot read weights {f}: {e}") from None
    return weights


def load_model(path: Path, lazy: bool = False):
    """Load an MLX model directory. Returns ``(model, config)``.

    ``lazy`` leaves the weights unread until first used, so that a model split
    over several processes (``distributed.sharding``) reads only this process's part.
    """
    prepare()  # before MLX is first imported here (see backend.py)
    warn_if_slow_blas()
    import mlx.core as mx
    import mlx.nn as nn

    config = read_config(path)
    weights = load_weights(path)
    model = build_model(config)
    if hasattr(model, "sanitize"):
        weights = model.sanitize(weights)
    quant = config.get("quantization")
    if quant:
        nn.quantize(
            model,
            group_size=quant["group_size"],
            bits=quant["bits"],
            class_predicate=lambda p, m: hasattr(m, "to_quantized") and f"{p}.scales" in weights,
        )
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise UrialError(f"weights in {path} do not match the model: {one_line(e)}") from None
    model.eval()
    if not lazy:
        mx.eval(model.parameters())
    return model, config


def model_dtype(model):
    """The dtype activations (and so the KV cache) have: that of the norm weights."""
    from mlx.utils import tree_flatten

    params = tree_flatten(model.parameters())
    return next((v.dtype for k, v in params if k.endswith("norm.weight")), params[0][1].dtype)


DEFAULT_CONTEXT = 4096  # for configs that do not say


def context_length(config: dict) -> int:
    """How many tokens the model attends to, from its config."""
    return int(config.get("max_position_embeddings") or DEFAULT_CONTEXT)
