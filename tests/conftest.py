"""Shared fixtures: tiny random-weight MLX models, and the real bundled model.

The bundled model is converted once per test session into a session-wide store
(``URIAL_EDGE_HOME``); tests that need an empty or broken store use ``home``.
"""

import contextlib
import http.client
import json
import os
from pathlib import Path

import pytest

import urial_edge  # noqa: F401  (sets up BLAS and light imports before MLX loads)
from urial_edge.tiny_models import TINY_CONFIGS, make_tiny_model  # noqa: F401  (used by the tests)

@pytest.fixture
def home(tmp_path, monkeypatch):
    """An empty, private urial-edge home."""
    h = tmp_path / "home"
    monkeypatch.setenv("URIAL_EDGE_HOME", str(h))
    return h


@pytest.fixture(scope="session")
def tiny_gemma(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "gemma3", "gemma3")


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama", "llama")


@pytest.fixture(scope="session")
def bundled_home(tmp_path_factory):
    """A store holding the converted bundled model, shared by the whole session.

    ``URIAL_EDGE_TEST_HOME`` points it at a persistent directory to skip the
    one-minute conversion on repeated local runs.
    """
    h = Path(os.environ.get("URIAL_EDGE_TEST_HOME") or tmp_path_factory.mktemp("bundled-home"))
    old = os.environ.get("URIAL_EDGE_HOME")
    os.environ["URIAL_EDGE_HOME"] = str(h)
    from urial_edge.models import resolve_model

    resolve_model(None)
    if old is None:
        del os.environ["URIAL_EDGE_HOME"]
    else:
        os.environ["URIAL_EDGE_HOME"] = old
    return h


@pytest.fixture
def bundled(bundled_home, monkeypatch):
    """Use the shared store with the converted bundled model."""
    monkeypatch.setenv("URIAL_EDGE_HOME", str(bundled_home))
    return bundled_home / "models" / "gemma-3-270m"


TINY_PROMPT = '''name = "tiny"
system = "You are a helpful assistant. Answer briefly and clearly."
[[examples]]
query = "What is one plus one?"
answer = "One plus one is two."
'''


@pytest.fixture
def prompt_file(tmp_path):
    f = tmp_path / "tiny.toml"
    f.write_text(TINY_PROMPT)
    return str(f)


def start_server(home, model, prompt_file, *extra):
    """``urial-edge serve`` in a subprocess on a free port; returns (process, host, port)."""
    from urial_edge.servers import launch

    proc, info = launch(["--model", str(model), "--prompt", str(prompt_file), *extra],
                        env={**os.environ, "URIAL_EDGE_HOME": str(home)}, timeout=120)
    return proc, info["host"], info["port"]


@contextlib.contextmanager
def running_server(home, model, *extra):
    """A server on ``model`` with the tiny prompt in ``home``; on leaving, it must stop cleanly and its
    log must hold no traceback (clients that misbehaved leave none)."""
    prompt = home / "tiny.toml"
    prompt.write_text(TINY_PROMPT)
    proc, host, port = start_server(home, model, prompt, *extra)
    try:
        yield {"proc": proc, "host": host, "port": port, "home": home, "prompt": prompt, "model": model}
    finally:
        assert "Traceback" not in stop_server(proc)


def stop_server(proc) -> str:
    """SIGTERM the server; it must exit cleanly. Returns what it wrote on stderr after starting."""
    import signal

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    return err


def raw(server, method, path, body=None, headers=None):
    """One HTTP request; returns (status, JSON body)."""
    conn = http.client.HTTPConnection(server["host"], server["port"], timeout=60)
    conn.request(method, path, body, headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)
