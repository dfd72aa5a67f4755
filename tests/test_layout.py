"""The package's layout rules (ARCHITECTURE.md): no import cycle, no floor reaching up, no import-time effects.

Imports are read from the source with ``ast``, function-level ones included, so
a cycle cannot hide behind a lazy import.
"""

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "urial_edge"
# The floors, lowest first: a module imports only from its own floor or below.
FLOORS = {
    "errors": 0, "log": 0, "progress": 0, "units": 0,
    "disk": 1,
    "model": 2,
    "distributed": 3,
    "runtime": 4,
    "eval": 5, "serve": 5, "plugins": 5, "testing": 5,
    "bench": 6,
    "cli": 7,
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict:
    return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports(name: str, path: Path, known: set) -> set:
    """The package modules ``name`` imports anywhere in its source (relative imports resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("urial_edge")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            if not base.startswith("urial_edge"):
                continue
            for alias in node.names:  # ``from pkg import module`` names a module; ``from mod import x`` does not
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base)
    return {m for m in found if m in known and m != name}


def graph() -> dict:
    known = modules()
    return {name: imports(name, path, set(known)) for name, path in known.items()}


def floor(name: str):
    parts = name.split(".")
    return FLOORS.get(parts[1]) if len(parts) > 1 else None  # the package itself is the API, above all


def test_every_module_has_a_floor():
    assert [m for m in modules() if m != "urial_edge" and floor(m) is None] == []


def test_no_import_cycle_function_level_imports_included():
    edges = graph()
    state, stack, cycles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == "open":
                cycles.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node)
    assert cycles == []


def test_no_module_imports_from_a_floor_above_its_own():
    edges = graph()
    upward = [(a, b) for a, targets in edges.items() for b in targets
              if a != "urial_edge" and b != "urial_edge" and floor(b) > floor(a)]
    assert upward == []


def test_the_runtime_never_imports_test_or_benchmark_support():
    edges = graph()
    below = [m for m in edges if floor(m) is not None and floor(m) <= FLOORS["runtime"]]
    assert [(m, t) for m in below for t in edges[m] if t.split(".")[1] in ("testing", "bench")] == []


PROBE = r"""
import json, os, sys
env, before = dict(os.environ), set(sys.modules)
import urial_edge
from urial_edge.cli import main  # the entry point's module: --help and --version must stay light
maps = open("/proc/self/maps").read() if os.path.exists("/proc/self/maps") else ""
print(json.dumps({"env_changed": sorted(set(os.environ.items()) ^ set(env.items())),
                  "mlx_loaded": sorted(m for m in sys.modules
                                       if m.split(".")[0] in ("mlx", "mlx_lm", "transformers", "llguidance")),
                  "blas_loaded": "libmkl" in maps or "libopenblas" in maps,
                  "server_loaded": sorted(m for m in sys.modules if m in ("urial_edge.serve.run", "urial_edge.serve.static"))}))
"""


def test_importing_the_package_changes_nothing_in_the_process():
    """Nor does the CLI's entry module: MLX, its BLAS and the server (with the chat page) load only when used."""
    out = json.loads(subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True).stdout)
    assert out == {"env_changed": [], "mlx_loaded": [], "blas_loaded": False, "server_loaded": []}


@pytest.mark.parametrize("module", ["urial_edge.plugins.llm", "urial_edge.serve.discovery", "urial_edge.cli.answer"])
def test_faces_import_without_mlx(module):
    """llm lists our models, and ask finds a server, without MLX (or its BLAS) or the constraint library loaded."""
    code = (f"import sys, {module}; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm', 'llguidance')))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "[]"
