"""Text <-> token ids, with the `tokenizers` library directly, built lazily.

mlx-lm wraps a transformers tokenizer, which costs seconds to import and build
for a 262k vocabulary. Generation only needs encode, decode and the BOS/EOS ids,
so urial-edge reads ``tokenizer.json`` itself and applies BOS explicitly.

Even the bare `tokenizers` library needs about 1.5 s to build Gemma's BPE (262k
tokens, 515k merges), which dwarfs a cached answer's start-up. So the first load
writes an index of the vocabulary to the store, and later processes build a BPE
over only the tokens and merges the text at hand can use. BPE only ever merges
neighbouring symbols of one pre-tokenized piece, so every token it can produce
is a substring of a piece; the pieces come from running the model's own
added-token, normalizer and pre-tokenizer steps (a "probe" tokenizer whose
vocabulary is single characters). Token ids stay the original ones and are
checked against the full tokenizer in the tests.
"""

import array
import bisect
import hashlib
import io
import itertools
import json
import re
import threading
import zipfile
import zlib
from pathlib import Path
from typing import Iterable, List, Optional

import mlx.core as mx
import numpy as np

from ..disk.files import write_bytes_atomic, write_text_atomic
from ..disk.paths import tokenizers_dir
from ..errors import UrialError
from ..log import warn

INDEX_VERSION = 12
BPE_OPTIONS = ("unk_token", "continuing_subword_prefix", "end_of_word_suffix", "fuse_unk", "byte_fallback",
               "ignore_merges")
BYTE_TOKEN = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def _token_text(value) -> Optional[str]:
    if isinstance(value, dict):
        return value.get("content")
    return value


class TooManyTokens(UrialError):
    """A text has more tokens than its caller allows; ``least`` is a lower bound of how many."""

    def __init__(self, least: int):
        super().__init__(f"the text has at least {least} tokens")
        self.least = least


class Tokenizer:
    """Encode/decode with the model's vocabulary and its BOS/EOS conventions."""

    def __init__(self, model_path: Path):
        path = Path(model_path) / "tokenizer.json"
        config = _read_json(Path(model_path) / "tokenizer_config.json")
        model_config = _read_json(Path(model_path) / "config.json")
        digest = file_digest(path)
        key = hashlib.sha256(json.dumps([digest, config, model_config.get("eos_token_id")]).encode()).hexdigest()
        self._full = None
        self._path = path
        self.key = key
        index = load_index(tokenizers_dir() / f"{key}.npz")
        if index is None:
            raw = _read_bytes(path)
            self._full = _build_full(raw, path)
            index = make_index(json.loads(raw), self._full, config, model_config)
            save_index(tokenizers_dir() / f"{key}.npz", index)
        meta = index["meta"]
        self.bos_id, self.add_bos, self.eos_ids = meta["bos_id"], meta["add_bos"], set(meta["eos_ids"])
        self.vocab_size, self.longest = meta["vocab_size"], max(1, meta["longest"])
        self.fingerprint = hashlib.sha256(
            json.dumps([digest, self.add_bos, self.bos_id, sorted(self.eos_ids)]).encode()
        ).hexdigest()
        self.neighbours = Neighbours(index["pairs"]) if "pairs" in index else None
        self._lazy = None if self._full is not None or not meta["lazy"] else LazyBPE(index, self.neighbours)
        if self._full is None and self._lazy is None:
            self._full = _build_full(_read_bytes(path), path)

    @property
    def json_path(self) -> Path:
        """The model's ``tokenizer.json`` (what other tokenizer builders, such as llguidance's, read)."""
        return self._path

    def load_full(self) -> None:
        """Build the whole tokenizer now, for long-lived processes that will see many different texts."""
        if self._full is None:
            self._full = _build_full(_read_bytes(self._path), self._path)
            self._lazy = None

    def encode(self, text: str, bos: bool = False, remember: bool = False,
               at_most: Optional[int] = None) -> List[int]:
        """Token ids of ``text``; with ``bos``, the model's BOS is prepended if it uses one.

        ``remember`` keeps the ids in the store (checksummed) so that later
        processes skip tokenizing this text: meant for the fixed URIAL prefix.
        With ``at_most``, a text that surely has more tokens raises :class:`TooManyTokens`
        before the work of tokenizing it (see :meth:`fewest_tokens`).
        """
        extra = 1 if bos and self.add_bos else 0
        least = self.fewest_tokens(text, at_most - extra) + extra if at_most is not None else 0
        if at_most is not None and least > at_most:
            raise TooManyTokens(least)
        claim = {"tokenizer": self.key, "text_sha256": hashlib.sha256(text.encode()).hexdigest()}
        memo = tokenizers_dir() / f"{self.key}.{claim['text_sha256'][:32]}.json" if remember else None
        ids = _read_memo(memo, claim) if memo else None
        if ids is None:
            tok = self._full or self._lazy.tokenizer_for(text)
            ids = tok.encode(text, add_special_tokens=False).ids
            if memo:
                _write_memo(memo, claim, ids)
        return [self.bos_id] + ids if bos and self.add_bos else ids

    def fewest_tokens(self, text: str, at_most: int) -> int:
        """A lower bound of ``len(encode(text))``, found with little work, exact enough to tell whether it
        is above ``at_most``.

        No token spans more than ``longest`` characters (a byte-level symbol is at most one character):
        that settles a text far too long in constant time. A text that could still fit is cut where no
        token can span (:class:`Neighbours`) and its stretches counted, without building a tokenizer.
        For a normalizer that drops characters the first bound is one on the text's size.
        """
        least = len(text) // self.longest
        if least > at_most or len(text) <= at_most or self.neighbours is None:
            return least  # (a text of at most ``at_most`` characters has at most as many stretches)
        base = self._full or self._lazy.base
        normalized = base.normalizer.normalize_str(text) if base.normalizer is not None else text
        pieces = base.pre_tokenizer.pre_tokenize_str(normalized) if base.pre_tokenizer is not None else [(normalized,)]
        return max(least, sum(self.neighbours.count(piece[0]) for piece in pieces))

    def token_start(self, text: str, index: int) -> int:
        """Where in ``text`` its ``index``-th token begins (counting without BOS)."""
        tok = self._full or self._lazy.tokenizer_for(text)
        return tok.encode(text, add_special_tokens=False).offsets[index][0]

    def decode(self, ids: Iterable[int]) -> str:
        if self._full is not None:
            return self._full.decode(list(ids), skip_special_tokens=True)
        return self._lazy.decode(ids)


def _read_memo(path: Path, claim: dict) -> Optional[List[int]]:
    """The ids a memo holds, if it is intact and names this text and tokenizer (``claim``); else None.

    A memo of another text (a file copied over this one) is rebuilt with a warning: its ids would
    silently answer from another prompt's prefix.
    """
    try:
        record = json.loads(path.read_text())
        ids = record["ids"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if record.get("sha256") != hashlib.sha256(json.dumps(ids).encode()).hexdigest():
        return None
    if any(record.get(k) != v for k, v in claim.items()):
        if all(k in record for k in claim):  # (a memo of an older version names nothing: just rebuilt)
            warn(f"tokenizer memo {path.name} holds the ids of another text or tokenizer; rebuilding it")
        return None
    return ids


def _write_memo(path: Path, claim: dict, ids: List[int]) -> None:
    _remember(path, json.dumps({**claim, "sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(), "ids": ids}))


def _remember(path: Path, text: str) -> None:
    """Write a memo to the store atomically; a store that cannot be written only costs speed."""
    try:
        write_text_atomic(path, text)
    except UrialError:
        pass


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise UrialError(f"cannot load tokenizer {path}: {e.strerror or e}") from None


def file_digest(path: Path) -> str:
    """SHA-256 of a file, remembered in the store by its size, mtime and inode (as git's index does)."""
    try:
        st = path.stat()
    except OSError as e:
        raise UrialError(f"cannot load tokenizer {path}: {e.strerror or e}") from None
    stamp = [str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino]
    memo = tokenizers_dir() / f"{hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:32]}.digest"
    try:
        digest = memo.read_text()
        if re.fullmatch(r"[0-9a-f]{64}", digest):
            return digest
    except OSError:
        pass
    digest = hashlib.sha256(_read_bytes(path)).hexdigest()
    _remember(memo, digest)
    return digest


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
            "eos_ids": sorted(eos_ids), "vocab_size": full.get_vocab_size(), "lazy": False,
            "longest": max(map(len, full.get_vocab(with_added_tokens=True)))}
    arrays = _vocab_arrays(spec)
    if arrays is not None:
        meta["lazy"] = True
        meta["rest"] = {k: v for k, v in spec.items() if k != "model"}
        meta["bpe"] = {k: spec["model"].get(k) for k in BPE_OPTIONS}
    return {"meta": meta, **(arrays or {})}


def _vocab_arrays(spec: dict) -> Optional[dict]:
    """Tokens and merges as arrays; None if the model is not a BPE this module can subset exactly."""
    model = spec.get("model") or {}
    vocab, merges = model.get("vocab"), model.get("merges")
    if model.get("type") != "BPE" or not isinstance(vocab, dict) or merges is None or any(
            model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix")):
        return None
    if sorted(vocab.values()) != list(range(len(vocab))):
        return None
    tokens = [""] * len(vocab)
    for token, i in vocab.items():
        tokens[i] = token
    always = [i for i, t in enumerate(tokens)
              if (model.get("byte_fallback") and BYTE_TOKEN.fullmatch(t)) or t == model.get("unk_token")]
    pairs = [m.split(" ") if isinstance(m, str) else m for m in merges]
    special = {tokens[i] for i in always}
    if any(len(p) != 2 or p[0] not in vocab or p[1] not in vocab or p[0] + p[1] not in vocab
           or p[0] in special or p[1] in special for p in pairs):
        return None  # byte-fallback or unknown tokens that merge: not a substring of the text
    # added tokens outside the BPE vocabulary join it at their own ids; they are matched before BPE
    # runs, so the BPE cannot make them, but only if they always match (no word or strip rules)
    for t in sorted(spec.get("added_tokens") or [], key=lambda t: t["id"]):
        if vocab.get(t["content"]) == t["id"]:
            continue
        if t["content"] in vocab or t["id"] != len(tokens) or t.get("single_word") or t.get("lstrip") \
                or t.get("rstrip"):
            return None
        tokens.append(t["content"])
    result = [vocab[a + b] for a, b in pairs]
    by_result = sorted(range(len(pairs)), key=result.__getitem__)
    counts = [0] * (len(tokens) + 1)
    for r in result:
        counts[r + 1] += 1
    single = [i for i, t in enumerate(tokens[:len(vocab)]) if len(t) == 1]
    return {
        **_lookup_arrays(tokens),
        "pairs": mx.array(array.array("Q", sorted({ord(a) << 21 | ord(b) for t in tokens for a, b in zip(t, t[1:])}))),
        "always": _int_array(always),
        "single": _int_array(single),
        "single_chars": mx.array(array.array("I", [ord(tokens[i]) for i in single])),
        "bpe_size": _int_array([len(vocab), max(len(t) for t in tokens[:len(vocab)])]),
        "merge_left": _int_array([vocab[a] for a, _ in pairs]),
        "merge_right": _int_array([vocab[b] for _, b in pairs]),
        "by_result": _int_array(by_result),
        "result_ends": _int_array(list(itertools.accumulate(counts))),
    }


def _lookup_arrays(tokens: List[str]) -> dict:
    """Tokens as one UTF-8 buffer with offsets, and their CRC-32s sorted for lookups by text."""
    data = [t.encode("utf-8", "surrogatepass") for t in tokens]
    hashes = sorted((zlib.crc32(b), i) for i, b in enumerate(data))
    return {
        "text": mx.array(memoryview(b"".join(data)).cast("B")),
        "offsets": _int_array(list(itertools.accumulate(map(len, data), initial=0))),
        "hashes": mx.array(array.array("I", [h for h, _ in hashes])),
        "hash_ids": _int_array([i for _, i in hashes]),
    }


class Vocab:
    """Token text by id and id by text, read from the index arrays (building a 262k-entry dict costs 0.1 s)."""

    def __init__(self, index: dict):
        self.text, self.offsets = memoryview(index["text"]), memoryview(index["offsets"])
        self.hashes, self.hash_ids = memoryview(index["hashes"]), memoryview(index["hash_ids"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return bytes(self.text[self.offsets[i]:self.offsets[i + 1]]).decode("utf-8", "surrogatepass")

    def get(self, token: str) -> Optional[int]:
        data = token.encode("utf-8", "surrogatepass")
        h = zlib.crc32(data)
        j = bisect.bisect_left(self.hashes, h)
        while j < len(self.hashes) and self.hashes[j] == h:
            i = self.hash_ids[j]
            if self.text[self.offsets[i]:self.offsets[i + 1]] == data:
                return i
            j += 1
        return None


class Neighbours:
    """Which characters are neighbours in some token: a text cut between two that are not has no
    token across the cut, so it has at least as many tokens as stretches, and every token lies within
    one stretch (text repeats its words: the distinct stretches are few to scan for tokens, where
    scanning 400 KB of prose character by character took 26 s)."""

    def __init__(self, pairs):
        self.pairs = np.asarray(memoryview(pairs))  # sorted codes ``ord(a) << 21 | ord(b)``

    def _apart(self, run: str) -> np.ndarray:
        """For each position after the first, whether it is not the neighbour of the one before."""
        codes = np.frombuffer(run.encode("utf-32-le", "surrogatepass"), dtype=np.uint32).astype(np.uint64)
        pairs = (codes[:-1] << np.uint64(21)) | codes[1:]
        if not len(self.pairs):
            return np.ones(len(pairs), dtype=bool)
        return self.pairs[np.minimum(np.searchsorted(self.pairs, pairs), len(self.pairs) - 1)] != pairs

    def count(self, run: str) -> int:
        return int(np.count_nonzero(self._apart(run))) + 1 if run else 0

    def stretches(self, run: str) -> List[str]:
        cuts = (np.flatnonzero(self._apart(run)) + 1).tolist() if run else []
        return [run[a:b] for a, b in zip([0] + cuts, cuts + [len(run)]) if a < b]


def _int_array(values: list):
    return mx.array(array.array("i", values))


def save_index(path: Path, index: dict) -> None:
    """Write the index atomically; a store that cannot be written only costs speed.

    The zip is made in memory first: ``zipfile`` left on a full disk prints tracebacks when it is freed.
    """
    arrays = {k: v for k, v in index.items() if k != "meta"}
    data = io.BytesIO()
    mx.savez(data, meta=mx.array(memoryview(json.dumps(index["meta"]).encode()).cast("B")), **arrays)
    try:
        write_bytes_atomic(path, data.getvalue())
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
    """Builds `tokenizers` BPEs restricted to the substrings of the texts seen so far."""

    def __init__(self, index: dict, neighbours: "Neighbours"):
        from tokenizers import Tokenizer as _Tokenizer

        meta = index["meta"]
        self.tokens = Vocab(index)
        self.always = set(index["always"].tolist())
        self.single = dict(zip(map(chr, memoryview(index["single_chars"])), memoryview(index["single"])))
        self.bpe_size, self.max_len = index["bpe_size"].tolist()
        self.left, self.right = memoryview(index["merge_left"]), memoryview(index["merge_right"])
        self.by_result, self.result_ends = memoryview(index["by_result"]), memoryview(index["result_ends"])
        self.bpe = {k: v for k, v in meta["bpe"].items() if v is not None}
        self.added = meta["rest"].get("added_tokens") or []
        self.added_at = {t["content"]: k for k, t in enumerate(self.added)}
        self.added_lengths: dict = {}  # the first two characters -> the lengths of the added tokens they begin
        for t in self.added:
            self.added_lengths.setdefault(t["content"][:2], set()).add(len(t["content"]))
        self.special = {t["id"] for t in self.added if t.get("special")}
        self.neighbours = neighbours
        frame = {**meta["rest"], "added_tokens": [],
                 "model": {"type": "BPE", "vocab": {}, "merges": [], **meta["bpe"]}}
        self.base = _Tokenizer.from_str(json.dumps(frame))  # normalizer, pre-tokenizer and decoder only
        self.kept: set = set()
        self.added_in: list = []
        self.current = self.probe = None
        self._lock = threading.Lock()  # threads tokenize at once (an Assistant after start())

    def tokenizer_for(self, text: str):
        """A tokenizer that encodes ``text`` exactly as the full one does."""
        with self._lock:
            return self._tokenizer_for(text)

    def _tokenizer_for(self, text: str):
        normalized = self.base.normalizer.normalize_str(text) if self.base.normalizer is not None else text
        seen = {id(t) for t in self.added_in}
        added = [self.added[k] for k in sorted(self.added_found(text) | self.added_found(normalized))
                 if id(self.added[k]) not in seen]
        if added or self.probe is None:
            self.added_in += added
            # splits the text as the real tokenizer does, into characters
            self.probe = self.build({**self.single, **self.vocab(self.always)}, [])
        stream = self.probe.encode(text, add_special_tokens=False).tokens
        runs = "".join(t if len(t) == 1 else "\0" for t in stream).split("\0")
        kept = self.substrings({piece for run in runs for piece in self.neighbours.stretches(run)})
        kept |= {t["id"] for t in self.added_in}
        if self.current is None or added or not kept <= self.kept:
            self.kept |= kept
            self.current = self.build(self.vocab(self.kept), self.merges(self.kept))
        return self.current

    def added_found(self, text: str) -> set:
        """Which added tokens occur in ``text`` (their positions in ``self.added``): looked up where
        their first two characters occur, not searched for one by one (Gemma has 6,384 of them)."""
        found = set()
        for first in {key[:1] for key in self.added_lengths}:
            at = text.find(first)
            while at != -1:
                for key in {text[at:at + 2], first}:
                    for n in self.added_lengths.get(key, ()):
                        k = self.added_at.get(text[at:at + n])
                        if k is not None:
                            found.add(k)
                at = text.find(first, at + 1)
        return found

    def substrings(self, pieces: Iterable[str]) -> set:
        """Ids of the BPE tokens that are substrings of ``pieces``."""
        tokens, n, top = self.tokens, self.bpe_size, self.max_len
        kept = set(self.always)
        for piece in pieces:
            for i in range(len(piece)):
                for j in range(i + 1, min(len(piece), i + top) + 1):
                    k = tokens.get(piece[i:j])
                    if k is not None and k < n:
                        kept.add(k)
        return kept

    def merges(self, kept: set) -> List[int]:
        """Ranks of the merges whose two parts and result are all in ``kept``, in rank order."""
        left, right, order, ends = self.left, self.right, self.by_result, self.result_ends
        return sorted(r for k in kept if k < self.bpe_size for r in order[ends[k]:ends[k + 1]]
                      if left[r] in kept and right[r] in kept)

    def vocab(self, ids: Iterable[int]) -> dict:
        return {self.tokens[i]: i for i in ids}

    def build(self, vocab: dict, ranks: List[int]):
        from tokenizers import AddedToken, Tokenizer as _Tokenizer
        from tokenizers.models import BPE

        tokens = self.tokens
        merges = [(tokens[self.left[r]], tokens[self.right[r]]) for r in ranks]
        tok = _Tokenizer(BPE(vocab=vocab, merges=merges, **self.bpe))
        for part in ("normalizer", "pre_tokenizer", "decoder"):
            if getattr(self.base, part) is not None:
                setattr(tok, part, getattr(self.base, part))
        # added tokens are in the vocabulary or follow it (checked when indexing), so they keep their ids
        options = ("single_word", "lstrip", "rstrip", "normalized", "special")
        tok.add_tokens([AddedToken(t["content"], **{k: t[k] for k in options if k in t}) for t in self.added_in])
        return tok

    def decode(self, ids: Iterable[int]) -> str:
        """Same text as the full tokenizer's ``decode(ids, skip_special_tokens=True)``."""
        n = len(self.tokens)
        pieces = [self.tokens[i] for i in ids if 0 <= i < n and i not in self.special]
        decoder = self.base.decoder
        return decoder.decode(pieces) if decoder is not None else " ".join(pieces)
