"""Text <-> token ids, with the `tokenizers` library directly.

mlx-lm wraps a transformers tokenizer, which costs seconds to import and build
for a 262k vocabulary. Generation only needs encode, decode and the BOS/EOS ids,
so urial-edge reads ``tokenizer.json`` itself and applies BOS explicitly.
"""

import hashlib
import json
from pathlib import Path
from typing import Iterable, List, Optional

from .store import UrialError


def _token_text(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Encode/decode with the model's vocabulary and its BOS/EOS conventions."""

    def __init__(self, model_path: Path):
        from tokenizers import Tokenizer as _Tokenizer

        path = Path(model_path) / "tokenizer.json"
        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:
            raise UrialError(f"cannot load tokenizer {path}: {e}") from None
        config = _read_json(Path(model_path) / "tokenizer_config.json")
        model_config = _read_json(Path(model_path) / "config.json")
        bos = _token_text(config.get("bos_token"))
        self.bos_id = config.get("bos_token_id")
        if self.bos_id is None and bos is not None:
            self.bos_id = self._tok.token_to_id(bos)
        add_bos = config.get("add_bos_token")
        if add_bos is None:  # many HF tokenizers add BOS in their post-processor instead
            add_bos = self.bos_id is not None and self._tok.encode("a").ids[:1] == [self.bos_id]
        self.add_bos = bool(add_bos) and self.bos_id is not None
        self.eos_ids = set(_as_list(config.get("eos_token_ids")))
        self.eos_ids |= set(_as_list(model_config.get("eos_token_id")))
        eos = _token_text(config.get("eos_token"))
        if eos is not None and self._tok.token_to_id(eos) is not None:
            self.eos_ids.add(self._tok.token_to_id(eos))
        self.fingerprint = hashlib.sha256(
            path.read_bytes() + json.dumps([self.add_bos, self.bos_id, sorted(self.eos_ids)]).encode()
        ).hexdigest()

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size()

    def encode(self, text: str, bos: bool = False) -> List[int]:
        """Token ids of ``text``; with ``bos``, the model's BOS is prepended if it uses one."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        return [self.bos_id] + ids if bos and self.add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=True)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


class StreamingDecoder:
    """Turns a growing list of token ids into text pieces, never splitting a UTF-8 character."""

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: List[int] = []
        self.text = ""

    def add(self, token: int) -> str:
        """Add a token; return the newly completed text (may be empty)."""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        piece, self.text = text[len(self.text):], text
        return piece
