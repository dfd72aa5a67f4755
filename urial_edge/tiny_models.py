"""Tiny random-weight models with a byte-level tokenizer.

The tests, the host-time benchmark and the multi-process checks run on these: a real
architecture (mlx-lm's model classes) small enough that a forward pass takes a
millisecond, so that what is measured or checked is urial-edge's own work.
"""

import json
from pathlib import Path

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
    """Write a random-weight MLX model directory for ``arch`` (config values overridable)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from .modeling import build_model

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
