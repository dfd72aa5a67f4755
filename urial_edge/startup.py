"""Keeping process start-up short.

``import mlx_lm`` runs its package ``__init__``, which imports transformers
(about a second) even when only the model classes and the KV cache are needed.
:func:`light_mlx_lm` registers the ``mlx_lm`` package without running that
``__init__``; submodules such as ``mlx_lm.models.cache`` import as usual, and the
first access to a top-level attribute (``mlx_lm.load``) runs the real
``__init__`` then, so code that wants all of mlx-lm still gets it.
"""

import importlib.util
import sys
import types


def light_mlx_lm() -> None:
    """Make ``import mlx_lm.<submodule>`` skip mlx-lm's heavy package ``__init__``."""
    if "mlx_lm" in sys.modules:
        return
    spec = importlib.util.find_spec("mlx_lm")
    if spec is None:
        return
    module = types.ModuleType("mlx_lm")
    module.__spec__ = spec
    module.__file__ = spec.origin
    module.__path__ = list(spec.submodule_search_locations)
    module.__package__ = "mlx_lm"

    def load_full(name):
        del module.__getattr__
        spec.loader.exec_module(module)
        return getattr(module, name)

    module.__getattr__ = load_full
    sys.modules["mlx_lm"] = module


def prepare() -> None:
    """Process set-up for the command line: quiet libraries and light imports."""
    import os

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    light_mlx_lm()
