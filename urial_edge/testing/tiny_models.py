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


def write_byte_tokenizer(path: Path, gpt2_split: bool = False) -> None:
    """A byte-level BPE tokenizer: 3 special tokens plus the 256 byte symbols, and no merges.

    ``gpt2_split``: pre-tokenize with GPT-2's pattern and merge a blank line into one token (id 259),
    as Llama 3, Qwen and SmolLM2 do: a blank line then tokenizes differently at the end of a text than
    before other text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<pad>": 0, "<eos>": 1, "<bos>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # (the library gives them in a random order)
        vocab[ch] = len(vocab)
    merges = []
    if gpt2_split:
        vocab["\u010a\u010a"] = len(vocab)  # "\n\n" in byte-level symbols
        merges = [("\u010a", "\u010a")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=gpt2_split)
    tok.decoder = decoders.ByteLevel()
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<bos>", "eos_token": "<eos>", "add_bos_token": True}))


def make_tiny_model(path: Path, arch: str = "gemma3", seed: int = 0, gpt2_split: bool = False,
                    **overrides) -> Path:
    """Write a random-weight MLX model directory for ``arch`` (config values overridable)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from ..model.loading import build_model

    path.mkdir(parents=True, exist_ok=True)
    config = {**TINY_CONFIGS[arch], **({"vocab_size": 260} if gpt2_split else {}), **overrides}
    mx.random.seed(seed)
    model = build_model(config)
    weights = dict(tree_flatten(model.parameters()))
    # scale up the random weights so the logits are far from ties
    weights = {k: (v * 4 if k.endswith("embed_tokens.weight") else v) for k, v in weights.items()}
    mx.save_safetensors(str(path / "model.safetensors"), weights)
    (path / "config.json").write_text(json.dumps(config))
    write_byte_tokenizer(path, gpt2_split)
    return path
