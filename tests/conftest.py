"""Shared fixtures: tiny random-weight MLX models, and the real bundled model.

The bundled model is converted once per test session into a session-wide store
(``URIAL_EDGE_HOME``); tests that need an empty or broken store use ``home``.
"""

import http.client
import json
import os
from pathlib import Path

import pytest

import urial_edge  # noqa: F401  (sets up BLAS and light imports before MLX loads)
import mlx.core as mx
from mlx.utils import tree_flatten

TINY_CONFIGS = {
    # 5 sliding-window layers (RotatingKVCache, window 16) and 1 global layer (KVCache)
    "gemma3": {
        "model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 6, "intermediate_size": 128,
        "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "rms_norm_eps": 1e-6,
        "vocab_size": 259, "rope_theta": 1e6, "rope_local_base_freq": 1e4, "query_pre_attn_scalar": 32,
        "sliding_window": 16, "sliding_window_pattern": 6, "max_position_embeddings": 2048,
    },
    # every layer a plain KVCache
    "llama": {
        "model_type": "llama", "hidden_size": 128, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 2, "num_key_value_heads": 1, "rms_norm_eps": 1e-5, "vocab_size": 259,
        "rope_theta": 1e4, "max_position_embeddings": 2048, "tie_word_embeddings": False,
    },
}


def write_byte_tokenizer(path: Path) -> None:
    """A byte-level BPE tokenizer with no merges: 3 special tokens plus the 256 byte symbols."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for ch in pre_tokenizers.ByteLevel.alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True}))


def make_tiny_model(path: Path, arch: str = "gemma3", seed: int = 0, **overrides) -> Path:
    """Write a random-weight MLX model directory for ``arch``."""
    from urial_edge.modeling import build_model

    path.mkdir(parents=True, exist_ok=True)
    config = {**TINY_CONFIGS[arch], **overrides}
    mx.random.seed(seed)
    model = build_model(config)
    weights = dict(tree_flatten(model.parameters()))
    # scale up the random weights so the logits are far from ties
    weights = {k: (v * 4 if k.endswith("embed_tokens.weight") else v) for k, v in weights.items()}
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(config))
    write_byte_tokenizer(path)
    return path


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
