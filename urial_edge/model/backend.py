"""Preparing the process for MLX: a short start-up, and fast CPU matmuls.

:func:`prepare` does two things, and must run before MLX (or ``mlx_lm``) is
first imported. Importing ``urial_edge`` does not run it: the command line's
entry point does (``cli.main``), and so does the first use of the Python API
(``urial_edge.Assistant``) and of the ``llm`` plugin's models. A process that
imported MLX earlier keeps its BLAS, and loading a model says so once.

- ``mlx_lm``'s package ``__init__`` imports transformers (about a second) even
  when only the model classes and the KV cache are needed. :func:`light_mlx_lm`
  registers the package without running it; submodules such as
  ``mlx_lm.models.cache`` import as usual, and the first access to a top-level
  attribute (``mlx_lm.load``) runs the real ``__init__`` then.
- The Linux ``mlx[cpu]`` wheel links the reference BLAS, about 20x slower than
  an optimised one for float32 matmuls. :func:`preload_blas` loads an optimised
  BLAS (Intel MKL from PyPI, else a system OpenBLAS) into the global symbol
  scope first, so MLX's ``cblas_*`` calls resolve to it. ``URIAL_EDGE_BLAS=off``
  keeps the stock library; ``URIAL_EDGE_BLAS=/path/libX.so`` picks one.
"""

import ctypes
import glob
import importlib.util
import os
import sys
import types
from pathlib import Path
from typing import List, Optional

_BLAS: Optional[str] = None
_WARNED = False
SYSTEM_OPENBLAS = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
]


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


def blas_candidates() -> List[str]:
    """Optimised BLAS libraries found on this machine, best first."""
    prefixes = {sys.prefix, sys.base_prefix, os.path.dirname(os.path.dirname(sys.executable))}
    mkl = [p for prefix in prefixes for p in sorted(glob.glob(os.path.join(prefix, "lib", "libmkl_rt.so*")))]
    return mkl + [p for p in SYSTEM_OPENBLAS if os.path.exists(p)]


def preload_blas() -> Optional[str]:
    """Load an optimised BLAS globally before MLX (Linux only). Returns its path, if any."""
    global _BLAS
    if _BLAS is not None or not sys.platform.startswith("linux"):
        return _BLAS
    choice = os.environ.get("URIAL_EDGE_BLAS", "auto").strip()
    if choice.lower() in ("off", "stock", "0", "none"):
        return None
    if "mlx.core" in sys.modules:
        return None  # too late: MLX already bound its BLAS symbols
    for path in [choice] if choice.lower() != "auto" else blas_candidates():
        try:
            ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _BLAS = path
        return path
    return None


def blas_in_use() -> str:
    """Which BLAS MLX's float32 matmuls go through in this process."""
    if sys.platform == "darwin":
        return "Accelerate (macOS)"
    if _BLAS:
        return Path(_BLAS).name
    maps = Path("/proc/self/maps")
    if maps.exists():
        for line in maps.read_text().splitlines():
            if "openblas" in line or "libmkl" in line:
                return Path(line.split()[-1]).name
    return "reference BLAS bundled with mlx[cpu] (slow)"


def warn_if_slow_blas() -> None:
    """Say so once if MLX was imported before urial_edge and kept the slow reference BLAS."""
    global _WARNED
    if _WARNED or not sys.platform.startswith("linux") or _BLAS or not blas_candidates():
        return
    if os.environ.get("URIAL_EDGE_BLAS", "auto").lower() in ("off", "stock", "0", "none"):
        return
    _WARNED = True
    sys.stderr.write("warning: mlx was imported before urial_edge, so matmuls use the slow reference BLAS; "
                     "import urial_edge first\n")


def prepare() -> None:
    """Light ``mlx_lm`` imports and an optimised BLAS, before MLX loads (idempotent)."""
    light_mlx_lm()
    preload_blas()
