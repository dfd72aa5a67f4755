"""urial-edge: tuning-free alignment of base LLMs on a laptop, with a cached URIAL prefix."""

__version__ = "0.1.0"

from .startup import prepare
from .errors import UrialError

prepare()  # before anything imports MLX: light mlx_lm imports and an optimised BLAS

__all__ = ["Assistant", "Answer", "ChatSession", "UrialError", "__version__"]


def __getattr__(name):
    # the API classes import MLX; load them on first use so `--version` and `--help` stay instant
    if name in ("Assistant", "Answer", "ChatSession", "AnswerStream"):
        from . import assistant

        return getattr(assistant, name)
    raise AttributeError(f"module 'urial_edge' has no attribute {name!r}")
