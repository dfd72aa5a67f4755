"""Text <-> token ids, with the `tokenizers` library directly, built lazily.

mlx-lm wraps a transformers tokenizer, which costs seconds to import and build
for a 262k vocabulary. Generation only needs encode, decode and the BOS/EOS ids,
so urial-edge reads ``tokenizer.json`` itself and applies BOS explicitly.

Even the bare `tokenizers` library needs about 1.5 s to build Gemma's BPE (262k
tokens, 515k merges), which dwarfs a cached answer's start-up. So the first load
writes an index of the vocabulary to the store, and later processes build a BPE
over only the tokens and merges that can occur in the text at hand: a BPE merge
only ever joins symbols made of characters of the (normalized) input, so
dropping every token with another character changes no output. Token ids stay
the original ones and are checked against the full tokenizer in the tests.
"""

import array
import hashlib
import itertools
import json
import re
import zipfile
from pathlib import Path
from typing import Iterable, List, Optional

import mlx.core as mx

from .store import UrialError, atomic_file, home, write_text_atomic

INDEX_VERSION = 7
BPE_OPTIONS = ("unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback",
               "ignore_merges")
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")
COMMON_CHARS = 62  # characters with a bit of their own in each token's mask; the rest share RARE_BIT
RARE_BIT = 1 << 62
ALL_COMMON = RARE_BIT - 1


def _token_text(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value


def index_dir() -> Path:
    return home() / "tokenizers"


class Tokenizer:
    """Encode/decode with the model's vocabulary and its BOS/EOS conventions."""

    def __init__(self, model_path: Path):
        path = Path(model_path) / "tokenizer.json"
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise UrialError(f"cannot load tokenizer {path}: {e.strerror or e}") from None
        config = _read_json(Path(model_path) / "tokenizer_config.json")
        model_config = _read_json(Path(model_path) / "config.json")
        digest = hashlib.sha256(raw).hexdigest()
        key = hashlib.sha256(json.dumps([digest, config, model_config.get("eos_token_id")]).encode()).hexdigest()
        self._full = None
        self._path = path
        self.key = key
        index = load_index(index_dir() / f"{key}.npz")
        if index is None:
            self._full = _build_full(raw, path)
            index = make_index(json.loads(raw), self._full, config, model_config)
            save_index(index_dir() / f"{key}.npz", index)
        meta = index["meta"]
        self.bos_id, self.add_bos, self.eos_ids = meta["bos_id"], meta["add_bos"], set(meta["eos_ids"])
        self.vocab_size = meta["vocab_size"]
        self.fingerprint = hashlib.sha256(
            json.dumps([digest, self.add_bos, self.bos_id, sorted(self.eos_ids)]).encode()
        ).hexdigest()
        self._lazy = None if self._full is not None or not meta["lazy"] else LazyBPE(index)
        if self._full is None and self._lazy is None:
            self._full = _build_full(raw, path)

    def load_full(self) -> None:
        """Build the whole tokenizer now, for long-lived processes that will see many different texts."""
        if self._full is None:
            self._full = _build_full(self._path.read_bytes(), self._path)
            self._lazy = None

    def encode(self, text: str, bos: bool = False, remember: bool = False) -> List[int]:
        """Token ids of ``text``; with ``bos``, the model's BOS is prepended if it uses one.

        ``remember`` keeps the ids in the store (checksummed) so that later
        processes skip tokenizing this text: meant for the fixed URIAL prefix.
        """
        memo = index_dir() / f"{self.key}.{hashlib.sha256(text.encode()).hexdigest()[:32]}.json" if remember else None
        ids = _read_memo(memo) if memo else None
        if ids is None:
            tok = self._full or self._lazy.tokenizer_for(text)
            ids = tok.encode(text, add_special_tokens=False).ids
            if memo:
                _write_memo(memo, ids)
        return [self.bos_id] + ids if bos and self.add_bos else ids

    def decode(self, ids: Iterable[int]) -> str:
        if self._full is not None:
            return self._full.decode(list(ids), skip_special_tokens=True)
        return self._lazy.decode(ids)


def _read_memo(path: Path) -> Optional[List[int]]:
    try:
        record = json.loads(path.read_text())
        ids = record["ids"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return ids if record.get("sha256") == hashlib.sha256(json.dumps(ids).encode()).hexdigest() else None


def _write_memo(path: Path, ids: List[int]) -> None:
    try:
        write_text_atomic(path, json.dumps({"sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
                                            "ids": ids}))
    except UrialError:
        pass  # a read-only store only costs speed


def _build_full(raw: bytes, path: Path):
    from tokenizers import Tokenizer as _Tokenizer

    try:
        return _Tokenizer.from_str(raw.decode())
    except Exception as e:
        raise UrialError(f"cannot load tokenizer {path}: {e}") from None


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


# -- the vocabulary index -------------------------------------------------------------------------


def make_index(spec: dict, full, config: dict, model_config: dict) -> dict:
    """Everything a later process needs: BOS/EOS facts and, for BPE models, the vocabulary as arrays."""
    bos = _token_text(config.get("bos_token"))
    bos_id = config.get("bos_token_id")
    if bos_id is None and bos is not None:
        bos_id = full.token_to_id(bos)
    add_bos = config.get("add_bos_token")
    if add_bos is None:  # many HF tokenizers add BOS in their post-processor instead
        add_bos = bos_id is not None and full.encode("a").ids[:1] == [bos_id]
    eos_ids = set(_as_list(config.get("eos_token_ids"))) | set(_as_list(model_config.get("eos_token_id")))
    eos = _token_text(config.get("eos_token"))
    if eos is not None and full.token_to_id(eos) is not None:
        eos_ids.add(full.token_to_id(eos))
    meta = {"version": INDEX_VERSION, "bos_id": bos_id, "add_bos": bool(add_bos) and bos_id is not None,
            "eos_ids": sorted(eos_ids), "vocab_size": full.get_vocab_size(), "lazy": False}
    arrays = _vocab_arrays(spec)
    if arrays is not None:
        meta["lazy"] = True
        meta["rest"] = {k: v for k, v in spec.items() if k != "model"}
        meta["bpe"] = {k: spec["model"].get(k) for k in BPE_OPTIONS}
    return {"meta": meta, **(arrays or {})}


def _vocab_arrays(spec: dict) -> Optional[dict]:
    """Tokens, their characters and the merges as arrays; None if the model is not a plain BPE."""
    model = spec.get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or model.get("dropout") or not isinstance(vocab, dict) or merges is None:
        return None
    if sorted(vocab.values()) != list(range(len(vocab))):
        return None
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    if any(len(p) != 2 or p[0] not in vocab or p[1] not in vocab for p in pairs):
        return None
    # added tokens outside the BPE vocabulary join it at their own ids; they are matched before BPE
    # runs, so the BPE cannot make them, but only if they always match (no word or strip rules)
    for t in sorted(spec.get("added_tokens") or [], key=lambda t: t["id"]):
        if vocab.get(t["content"]) == t["id"]:
            continue
        if t["content"] in vocab or t["id"] != len(tokens) or t.get("single_word") or t.get("lstrip") \
                or t.get("rstrip"):
            return None
        tokens.append(t["content"])
    counts: dict = {}
    for token in tokens:
        for ch in set(token):
            counts[ch] = counts.get(ch, 0) + 1
    common = sorted(counts, key=lambda ch: -counts[ch])[:COMMON_CHARS]
    bit = {ch: 1 << i for i, ch in enumerate(common)}
    masks, rare = [], {}
    for i, token in enumerate(tokens):
        mask = 0
        for ch in set(token):
            if ch in bit:
                mask |= bit[ch]
            else:
                mask |= RARE_BIT
                rare.setdefault(ch, []).append(i)
        masks.append(mask)
    sep = next(chr(c) for c in range(0xE000, 0x110000) if chr(c) not in counts)
    always = [i for i, t in enumerate(tokens)
              if (model.get("byte_fallback") and BYTE_TOKEN.fullmatch(t)) or t == model.get("unk_token")]
    rare_chars = sorted(rare)
    return {
        "tokens": _text_array(sep.join(tokens)),
        "separator": _text_array(sep),
        "always": _int_array(always),
        "bpe_size": _int_array([len(vocab)]),
        "common_chars": _text_array("".join(common)),
        "masks": mx.array(array.array("q", masks)),
        "rare_chars": _text_array("".join(rare_chars)),
        "rare_ids": _int_array([i for ch in rare_chars for i in rare[ch]]),
        "rare_ends": _int_array(list(itertools.accumulate(len(rare[ch]) for ch in rare_chars))),
        "merge_left": _int_array([vocab[a] for a, _ in pairs]),
        "merge_right": _int_array([vocab[b] for _, b in pairs]),
        "merge_result": _int_array([vocab.get(a + b, len(tokens)) for a, b in pairs]),
    }


def _text_array(text: str):
    return mx.array(memoryview(text.encode("utf-32-le", "surrogatepass")).cast("I"))


def _array_text(a) -> str:
    return bytes(memoryview(a)).decode("utf-32-le", "surrogatepass")


def _int_array(values: list):
    return mx.array(array.array("i", values))


def _nonzero(mask):
    """Indexes of the true entries of a 1-D bool array, in order (MLX has no ``nonzero``)."""
    n = mask.size
    slots = mx.where(mask, mx.cumsum(mask.astype(mx.int32)) - 1, n)
    out = mx.zeros(n + 1, dtype=mx.int32)
    out[slots] = mx.arange(n, dtype=mx.int32)  # every false entry lands in the spare last slot
    return out[:mask.astype(mx.int32).sum().item()]


def save_index(path: Path, index: dict) -> None:
    """Write the index atomically; a store that cannot be written only costs speed."""
    arrays = {k: v for k, v in index.items() if k != "meta"}
    meta = index["meta"]
    try:
        with atomic_file(path) as tmp:
            with open(tmp, "wb") as f:
                mx.savez(f, meta=mx.array(memoryview(json.dumps(meta).encode()).cast("B")), **arrays)
    except UrialError:
        pass


def load_index(path: Path) -> Optional[dict]:
    """The saved index, or None if it is missing, damaged or from another version.

    The file is a zip (``.npz``) whose members carry CRC-32s, checked as they are read.
    """
    try:
        index = mx.load(str(path))
        mx.eval(index)
        meta = json.loads(bytes(memoryview(index.pop("meta"))))
    except (OSError, ValueError, RuntimeError, KeyError, zipfile.BadZipFile):
        return None
    return {"meta": meta, **index} if meta.get("version") == INDEX_VERSION else None


class LazyBPE:
    """Builds `tokenizers` BPEs restricted to the characters of the texts seen so far."""

    def __init__(self, index: dict):
        from tokenizers import Tokenizer as _Tokenizer

        meta = index["meta"]
        self.tokens = _array_text(index["tokens"]).split(_array_text(index["separator"]))
        self.common = {ch: 1 << i for i, ch in enumerate(_array_text(index["common_chars"]))}
        self.masks = index["masks"]
        ends = index["rare_ends"].tolist()
        self.rare = dict(zip(_array_text(index["rare_chars"]), zip([0] + ends[:-1], ends)))
        self.rare_ids = index["rare_ids"]
        self.left, self.right, self.result = index["merge_left"], index["merge_right"], index["merge_result"]
        self.always, self.bpe_size = index["always"], index["bpe_size"].item()
        self.bpe = meta["bpe"]
        self.added = meta["rest"].get("added_tokens") or []
        self.special = {t["id"] for t in self.added if t.get("special")}
        frame = {**meta["rest"], "added_tokens": [],
                 "model": {"type": "BPE", "vocab": {}, "merges": [], **self.bpe}}
        self.base = _Tokenizer.from_str(json.dumps(frame))  # normalizer, pre-tokenizer and decoder only
        self.chars: set = set()
        self.added_in: list = []
        self.current = None

    def symbols(self, text: str) -> set:
        """The characters BPE will see for ``text``: after normalizing and pre-tokenizing."""
        if self.base.normalizer is not None:
            text = self.base.normalizer.normalize_str(text)
        if self.base.pre_tokenizer is not None:
            return {ch for piece, _ in self.base.pre_tokenizer.pre_tokenize_str(text) for ch in piece}
        return set(text)

    def tokenizer_for(self, text: str):
        """A tokenizer that encodes ``text`` exactly as the full one does."""
        chars = self.symbols(text)
        added = [t for t in self.added if t["content"] in text and t not in self.added_in]
        if self.current is None or not chars <= self.chars or added:
            self.chars |= chars
            self.added_in += added
            self.current = self.build()
        return self.current

    def kept(self):
        """Ids of the tokens, and the merges (left and right ids), that can occur in text of ``self.chars``."""
        outside = RARE_BIT | (ALL_COMMON & ~sum(self.common.get(ch, 0) for ch in self.chars))
        keep = (self.masks & mx.array(outside, dtype=mx.int64)) == 0  # only common characters of the text
        keep = keep & (mx.arange(keep.size) < self.bpe_size)  # added tokens only when in the text
        spans = [self.rare[ch] for ch in self.chars if ch in self.rare]
        candidates = set(mx.concatenate([self.rare_ids[a:b] for a, b in spans]).tolist()) if spans else ()
        forced = self.always.tolist() + [t["id"] for t in self.added_in]
        forced += [i for i in candidates if i < self.bpe_size and set(self.tokens[i]) <= self.chars]
        if forced:
            keep[mx.array(forced)] = True
        keep = mx.concatenate([keep, mx.array([False])])  # the last index: a merge result that is no token
        ranks = _nonzero(keep[self.left] & keep[self.right] & keep[self.result])
        return _nonzero(keep).tolist(), self.left[ranks].tolist(), self.right[ranks].tolist()

    def build(self):
        from tokenizers import AddedToken, Tokenizer as _Tokenizer
        from tokenizers.models import BPE

        ids, left, right = self.kept()
        tokens = self.tokens
        vocab = dict(zip(map(tokens.__getitem__, ids), ids))
        merges = list(zip(map(tokens.__getitem__, left), map(tokens.__getitem__, right)))
        tok = _Tokenizer(BPE(vocab=vocab, merges=merges, **{k: v for k, v in self.bpe.items() if v is not None}))
        for part in ("normalizer", "pre_tokenizer", "decoder"):
            if getattr(self.base, part) is not None:
                setattr(tok, part, getattr(self.base, part))
        # added tokens are in the vocabulary (checked when indexing), so they keep their ids
        options = ("single_word", "lstrip", "rstrip", "normalized", "special")
        tok.add_tokens([AddedToken(t["content"], **{k: t[k] for k in options if k in t}) for t in self.added_in])
        return tok

    def decode(self, ids: Iterable[int]) -> str:
        """Same text as the full tokenizer's ``decode(ids, skip_special_tokens=True)``."""
        n = len(self.tokens)
        pieces = [self.tokens[i] for i in ids if 0 <= i < n and i not in self.special]
        decoder = self.base.decoder
        return decoder.decode(pieces) if decoder is not None else " ".join(pieces)


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
