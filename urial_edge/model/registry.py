"""The registry: models urial-edge knows by name (``models/registry.toml``, shipped in the wheel)."""

import sys
from dataclasses import dataclass
from typing import Optional, Tuple

from ..disk.paths import package_data

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


@dataclass
class ModelEntry:
    """One model the registry knows by name."""

    name: str
    source: str
    description: str = ""
    context_length: int = 0
    license: str = ""
    repo: Optional[str] = None
    package: Optional[str] = None


def load_registry() -> Tuple[str, dict]:
    """Return ``(default name, {name: ModelEntry})`` from the shipped manifest."""
    data = tomllib.loads(package_data("models", "registry.toml").read_text())
    entries = {name: ModelEntry(name=name, **fields) for name, fields in data["models"].items()}
    return data["default"], entries
