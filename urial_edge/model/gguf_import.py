"""Convert a GGUF file (llama.cpp's format) into an MLX model directory.

The directory holds ``config.json`` for mlx-lm's model class, the weights as
``model.safetensors`` (dequantized to float32, optionally re-quantized with
MLX's own 4/8-bit scheme), ``tokenizer.json`` rebuilt from the GGUF vocabulary,
``tokenizer_config.json`` with the BOS/EOS behaviour (and the chat template, if
the file has one), and ``urial_edge.json`` describing where it came from.
"""

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import numpy as np

from ..errors import UrialError, one_line
from ..disk.files import atomic_dir
from ..progress import Progress, optional

SUPPORTED_ARCHITECTURES = ("gemma3", "llama")
FORMAT_VERSION = 3  # 2: digit-splitting byte-level vocabularies (SmolLM2) tokenize as llama.cpp does;
# 3: tokenizer_config.json keeps the GGUF's chat template (tokenizer.chat_template)

# llama.cpp's pre-tokenizer types that cut digits one by one, then apply GPT-2's regex (StarCoder's
# tokenizer.json layout). transformers' GGUF converter leaves the digit step out, which changes how a run of
# newlines before a digit is cut; the llama.cpp oracle test caught it on SmolLM2 ("smollm").
DIGIT_SPLIT_PRE_TOKENIZERS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")


@dataclass
class Architecture:
    model_type: str
    config: Callable[[dict, dict], dict]
    names: Dict[str, str]
    transform: Callable[[str, np.ndarray, dict], np.ndarray]


def _meta(reader, key: str, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _gemma3_config(meta: dict, tensors: dict) -> dict:
    a = meta["arch"]
    return {
        "model_type": "gemma3_text",
        "hidden_size": meta[f"{a}.embedding_length"],
        "num_hidden_layers": meta[f"{a}.block_count"],
        "intermediate_size": meta[f"{a}.feed_forward_length"],
        "num_attention_heads": meta[f"{a}.attention.head_count"],
        "num_key_value_heads": meta[f"{a}.attention.head_count_kv"],
        "head_dim": meta[f"{a}.attention.key_length"],
        "rms_norm_eps": meta[f"{a}.attention.layer_norm_rms_epsilon"],
        "vocab_size": meta["vocab_size"],
        "rope_theta": meta.get(f"{a}.rope.freq_base", 1_000_000.0),
        # Constants of the Gemma 3 family that GGUF files do not record.
        "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": meta[f"{a}.attention.key_length"],
        "sliding_window": meta[f"{a}.attention.sliding_window"],
        "sliding_window_pattern": 6,
        "max_position_embeddings": meta[f"{a}.context_length"],
    }


def _llama_config(meta: dict, tensors: dict) -> dict:
    a = meta["arch"]
    heads = meta[f"{a}.attention.head_count"]
    hidden = meta[f"{a}.embedding_length"]
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": meta[f"{a}.block_count"],
        "intermediate_size": meta[f"{a}.feed_forward_length"],
        "num_attention_heads": heads,
        "num_key_value_heads": meta.get(f"{a}.attention.head_count_kv", heads),
        "head_dim": meta.get(f"{a}.attention.key_length", hidden // heads),
        "rms_norm_eps": meta[f"{a}.attention.layer_norm_rms_epsilon"],
        "vocab_size": meta["vocab_size"],
        "rope_theta": meta.get(f"{a}.rope.freq_base", 10_000.0),
        "max_position_embeddings": meta[f"{a}.context_length"],
        "tie_word_embeddings": "output.weight" not in tensors,
    }


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
_GEMMA3_NAMES = {
    **_LAYER_NAMES,
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_LLAMA_NAMES = {**_LAYER_NAMES, "ffn_norm": "post_attention_layernorm"}


def _gemma3_transform(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    # llama.cpp stores Gemma's RMSNorm scales with 1 added; mlx-lm adds the 1 itself.
    return w - 1.0 if name.endswith("norm.weight") else w


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's reordering of Q/K rows (it interleaves each head's halves)."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _llama_transform(name: str, w: np.ndarray, config: dict) -> np.ndarray:
    if name.endswith("q_proj.weight"):
        return _unpermute(w, config["num_attention_heads"])
    if name.endswith("k_proj.weight"):
        return _unpermute(w, config["num_key_value_heads"])
    return w


ARCHITECTURES = {
    "gemma3": Architecture("gemma3_text", _gemma3_config, _GEMMA3_NAMES, _gemma3_transform),
    "llama": Architecture("llama", _llama_config, _LLAMA_NAMES, _llama_transform),
}


def mlx_name(gguf_name: str, names: Dict[str, str]) -> Optional[str]:
    """Map a GGUF tensor name to mlx-lm's parameter name (None if unused)."""
    fixed = {
        "token_embd.weight": "model.embed_tokens.weight",
        "output_norm.weight": "model.norm.weight",
        "output.weight": "lm_head.weight",
    }
    if gguf_name in fixed:
        return fixed[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in names:
        return f"model.layers.{parts[1]}.{names[parts[2]]}.{parts[3]}"
    return None


def open_gguf(path: Path):
    """Open a GGUF file, turning every way it can be broken into a one-line error."""
    import gguf

    if not path.exists():
        raise UrialError(f"no such file: {path}")
    if not path.is_file():
        raise UrialError(f"not a file: {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UrialError(f"{path} is not a GGUF file (bad magic bytes)")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises many kinds on damaged files
        raise UrialError(f"{path} is damaged or truncated: {one_line(e)}") from None
    return reader


def read_metadata(reader) -> dict:
    arch = _meta(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UrialError(
            f"unsupported architecture {arch!r}; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    meta = {"arch": arch}
    for key in reader.fields:
        if key.startswith(arch + ".") or key.startswith("general."):
            meta[key] = _meta(reader, key)
    tokens = _meta(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise UrialError("the GGUF file has no tokenizer vocabulary (tokenizer.ggml.tokens)")
    meta["vocab_size"] = len(tokens)
    return meta


def build_tokenizer(reader, arch: str):
    """Rebuild a ``tokenizers.Tokenizer`` and its BOS/EOS settings from GGUF metadata."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # no "PyTorch was not found" notice
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer

    fields = {
        "tokenizer_type": "tokenizer.ggml.model",
        "pre_tokenizer_type": "tokenizer.ggml.pre",
        "tokens": "tokenizer.ggml.tokens",
        "scores": "tokenizer.ggml.scores",
        "token_type": "tokenizer.ggml.token_type",
        "merges": "tokenizer.ggml.merges",
        "bos_token_id": "tokenizer.ggml.bos_token_id",
        "eos_token_id": "tokenizer.ggml.eos_token_id",
        "unk_token_id": "tokenizer.ggml.unknown_token_id",
        "pad_token_id": "tokenizer.ggml.padding_token_id",
        "add_prefix_space": "tokenizer.ggml.add_space_prefix",
    }
    d = {name: _meta(reader, key) for name, key in fields.items()}
    d = {k: v for k, v in d.items() if v is not None}
    try:
        backend, _ = convert_gguf_tokenizer(arch, d)
    except Exception as e:
        raise UrialError(f"cannot rebuild the tokenizer from this GGUF file: {e}") from None
    if d.get("tokenizer_type") == "gpt2" and d.get("pre_tokenizer_type") in DIGIT_SPLIT_PRE_TOKENIZERS:
        from tokenizers import pre_tokenizers

        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokens = d["tokens"]
    add_bos = _meta(reader, "tokenizer.ggml.add_bos_token")
    if add_bos is None:
        # llama.cpp adds BOS to sentencepiece vocabularies unless told otherwise.
        add_bos = d.get("tokenizer_type") == "llama"

    def token(key):
        i = d.get(key)
        return tokens[i] if i is not None else None

    eos_ids = [d["eos_token_id"]] if "eos_token_id" in d else []
    if arch == "gemma3" and "<end_of_turn>" in tokens:
        eos_ids.append(tokens.index("<end_of_turn>"))
    config = {
        "add_bos_token": bool(add_bos) and d.get("bos_token_id") is not None,
        "add_eos_token": bool(_meta(reader, "tokenizer.ggml.add_eos_token") or False),
        "bos_token": token("bos_token_id"),
        "eos_token": token("eos_token_id"),
        "unk_token": token("unk_token_id"),
        "pad_token": token("pad_token_id"),
        "bos_token_id": d.get("bos_token_id"),
        "eos_token_ids": eos_ids,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    template = _meta(reader, "tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        config["chat_template"] = template  # an instruction-tuned model's own prompt format (runtime/chat_template.py)
    return backend, config


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def convert_tensors(reader, spec: Architecture, config: dict, progress: Progress) -> dict:
    """Dequantize every GGUF tensor to float32 and map it to mlx-lm's names."""
    import mlx.core as mx
    from gguf.quants import dequantize

    weights = {}
    total = len(reader.tensors)
    for i, t in enumerate(reader.tensors):
        name = mlx_name(t.name, spec.names)
        if name is not None:
            try:
                w = dequantize(t.data, t.tensor_type).astype(np.float32)
            except Exception as e:
                raise UrialError(f"cannot read tensor {t.name} ({t.tensor_type.name}): {e}") from None
            w = w.reshape([int(n) for n in reversed(t.shape)]) if w.ndim != len(t.shape) else w
            weights[name] = mx.array(spec.transform(name, w, config))
        progress(i + 1, total)
    return weights


def quantize_weights(weights: dict, config: dict, bits: int) -> dict:
    """Quantize the linear and embedding layers with MLX's affine 4/8-bit scheme."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    from .loading import build_model

    model = build_model(config)
    model.load_weights(list(weights.items()), strict=True)
    nn.quantize(model, group_size=64, bits=bits)
    config["quantization"] = {"group_size": 64, "bits": bits}
    return dict(tree_flatten(model.parameters()))


def import_gguf(
    path: Path,
    target: Path,
    quantize: Optional[int] = None,
    progress: Optional[Progress] = None,
) -> dict:
    """Convert the GGUF at ``path`` into an MLX model directory at ``target``.

    The directory is built in a temporary location and renamed into place, so a
    failure leaves nothing behind. Returns the metadata written to ``urial_edge.json``.
    """
    import mlx.core as mx

    if quantize not in (None, 4, 8):
        raise UrialError(f"invalid quantization {quantize!r}: use 4, 8 or none")
    started = time.monotonic()
    path = Path(path)
    reader = open_gguf(path)
    meta = read_metadata(reader)
    spec = ARCHITECTURES[meta["arch"]]
    tensors = {t.name for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise UrialError(f"{path} has no token embedding tensor; is it a complete model?")
    config = spec.config(meta, tensors)
    backend, tok_config = build_tokenizer(reader, meta["arch"])
    weights = convert_tensors(reader, spec, config, optional(progress))
    if quantize:
        weights = quantize_weights(weights, config, quantize)
    config["eos_token_id"] = tok_config["eos_token_ids"]
    info = {
        "format_version": FORMAT_VERSION,
        "source": str(path),
        "source_sha256": file_sha256(path),
        "architecture": meta["arch"],
        "name": meta.get("general.name"),
        "license": meta.get("general.license"),
        "precision": f"q{quantize}" if quantize else "float32",
        "context_length": config["max_position_embeddings"],
    }
    with atomic_dir(target) as tmp:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, {"format": "mlx"})
        backend.save(str(tmp / "tokenizer.json"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))
        info["weights_sha256"] = file_sha256(tmp / "model.safetensors")
        info["conversion_seconds"] = round(time.monotonic() - started, 2)
        (tmp / "urial_edge.json").write_text(json.dumps(info, indent=2))
    return info
