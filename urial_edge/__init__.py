"""urial-edge: tuning-free alignment of base LLMs on a laptop, with a cached URIAL prefix.

Importing this package changes nothing in the process. The API classes import
MLX; they load on first use, after :func:`urial_edge.model.backend.prepare` has
set up a fast BLAS and light ``mlx_lm`` imports (see that module).
"""

__version__ = "0.1.0"

from .errors import UrialError

__all__ = ["Assistant", "Answer", "AnswerStream", "ChatSession", "UrialError", "__version__"]
_API = {"Assistant": "assistant", "Answer": "answer", "AnswerStream": "answer", "ChatSession": "chat"}


def __getattr__(name):
    if name in _API:
        from importlib import import_module

        from .model.backend import prepare

        prepare()
        return getattr(import_module(f".runtime.{_API[name]}", __name__), name)
    raise AttributeError(f"module 'urial_edge' has no attribute {name!r}")
