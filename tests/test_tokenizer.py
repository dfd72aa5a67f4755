"""The lazily built tokenizer gives exactly the ids and text of the full `tokenizers` one."""

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from urial_edge.disk.paths import tokenizers_dir
from urial_edge.model.tokenizer import Tokenizer, load_index

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "def add(a, b):\n    return a + b\n\n# Query:\n```\nprint(add(1, 2))\n```",
    "Café, naïve, façade; Straße; Ελληνικά; русский текст; 日本語のテキスト; 🙂🚀",
    "   spaces   and\ttabs\t\tand\n\n\nnewlines  ",
    "<eos> in the middle, <bos><bos> twice, and <start_of_turn>user",
]
SPECIAL = ["<pad>", "<eos>", "<bos>", "<start_of_turn>"]
STRINGS = CORPUS + ["", " ", "a", "\n", "<eos>", "ünïcödé ß", "x" * 300, "🙂", "\x00\x01\u200b", "<0x41>"]


def train(path: Path, kind: str) -> Path:
    """Train a small real BPE (with merges and added tokens) in the style of Gemma or of GPT-2."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers
    from tokenizers.trainers import BpeTrainer

    path.mkdir(parents=True, exist_ok=True)
    if kind == "sentencepiece":  # spaces become ▁, unknown characters fall back to byte tokens
        tok = HFTokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
        initial = [f"<0x{b:02X}>" for b in range(256)]
        special = ["<unk>"] + SPECIAL
    else:  # byte-level, with the GPT-2 split regex
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        initial = pre_tokenizers.ByteLevel.alphabet()
        special = SPECIAL
    trainer = BpeTrainer(vocab_size=700, special_tokens=special + initial, show_progress=False)
    tok.train_from_iterator(CORPUS * 20 + ["hello world, tokens and merges"] * 5, trainer)
    tok.add_tokens([AddedToken("\n\n", normalized=False), AddedToken("    ", normalized=False)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<bos>", "eos_token": "<eos>",
                                                             "add_bos_token": True}))
    return path


@pytest.fixture(scope="module", params=["sentencepiece", "bytelevel"])
def pair(request, tmp_path_factory):
    """(full, lazy): the first load indexes the vocabulary, the second builds from the index."""
    import os

    home = tmp_path_factory.mktemp("tokhome")
    old = os.environ.get("URIAL_EDGE_HOME")
    os.environ["URIAL_EDGE_HOME"] = str(home)
    model = train(tmp_path_factory.mktemp("tok") / request.param, request.param)
    full, lazy = Tokenizer(model), Tokenizer(model)
    yield full, lazy
    if old is None:
        del os.environ["URIAL_EDGE_HOME"]
    else:
        os.environ["URIAL_EDGE_HOME"] = old


def test_first_load_indexes_later_loads_are_lazy(pair):
    full, lazy = pair
    assert full._full is not None and lazy._full is None and lazy._lazy is not None
    assert (lazy.bos_id, lazy.add_bos, lazy.eos_ids, lazy.vocab_size, lazy.fingerprint) == \
        (full.bos_id, full.add_bos, full.eos_ids, full.vocab_size, full.fingerprint)
    assert len(json.loads(full._full.to_str())["model"]["merges"]) > 100  # a real BPE, with merges


@pytest.mark.parametrize("text", STRINGS)
def test_same_ids_and_text_on_fixed_strings(pair, text):
    full, lazy = pair
    ids = full.encode(text, bos=True)
    assert lazy.encode(text, bos=True) == ids
    assert lazy.decode(ids) == full.decode(ids)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.text(max_size=20), st.sampled_from(SPECIAL + ["\n\n", "    ", "▁", " the "])),
                max_size=8))
def test_same_ids_for_any_text(pair, parts):
    full, lazy = pair
    text = "".join(parts)
    assert lazy.encode(text) == full.encode(text)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(min_value=0, max_value=800), max_size=30))
def test_same_text_for_any_ids(pair, ids):
    full, lazy = pair
    assert lazy.decode(ids) == full.decode(ids)


def test_damaged_index_is_rebuilt(tmp_path, home):
    model = train(tmp_path / "tok", "sentencepiece")
    expected = Tokenizer(model).encode(CORPUS[2])
    index = next(tokenizers_dir().glob("*.npz"))
    data = bytearray(index.read_bytes())
    data[len(data) // 2] ^= 0x10
    index.write_bytes(bytes(data))
    assert load_index(index) is None
    again = Tokenizer(model)  # falls back to the full tokenizer and rewrites the index
    assert again._full is not None and again.encode(CORPUS[2]) == expected
    assert load_index(index) is not None and Tokenizer(model).encode(CORPUS[2]) == expected


def test_remembered_ids_are_checked(tmp_path, home):
    model = train(tmp_path / "tok", "bytelevel")
    text = CORPUS[1]
    expected = Tokenizer(model).encode(text, bos=True)
    assert Tokenizer(model).encode(text, bos=True, remember=True) == expected
    memo = next(tokenizers_dir().glob("*.json"))
    record = json.loads(memo.read_text())
    assert record["ids"] == expected[1:]
    record["ids"][0] += 1  # tampered ids fail their checksum and are recomputed
    memo.write_text(json.dumps(record))
    assert Tokenizer(model).encode(text, bos=True, remember=True) == expected
    memo.write_text("{not json")
    assert Tokenizer(model).encode(text, bos=True, remember=True) == expected


@pytest.mark.slow
def test_bundled_lazy_tokenizer_is_exact(bundled):
    """Gemma's 262k vocabulary: the lazy path matches the full tokenizer on prompts and varied text."""
    from urial_edge.runtime.prompt import load_prompt, render_prefix
    from urial_edge.model.tokenizer import _build_full

    raw = (bundled / "tokenizer.json").read_bytes()
    full = _build_full(raw, bundled)
    Tokenizer(bundled)  # make sure the index exists
    lazy = Tokenizer(bundled)
    assert lazy._lazy is not None
    data = json.loads((Path(__file__).parent / "data" / "gemma3_token_ids.json").read_text())
    prompts = ("urial-k0", "urial-k3", "urial-k8", "urial-k4-direct")
    texts = STRINGS + data["strings"] + [render_prefix(load_prompt(n)) for n in prompts]
    for text in texts:
        ids = full.encode(text, add_special_tokens=False).ids
        assert lazy.encode(text) == ids, text[:60]
        assert lazy.decode(ids) == full.decode(ids, skip_special_tokens=True)


def test_lazy_tokenizer_works_from_another_thread(pair):
    """The server tokenizes on its model thread; MLX streams are per thread."""
    import threading

    full, lazy = pair
    text = "A fresh text with new characters: ÆØÅ §§ {braces}"
    out = {}
    worker = threading.Thread(target=lambda: out.update(ids=lazy.encode(text), text=lazy.decode(full.encode(text))))
    worker.start()
    worker.join()
    assert out["ids"] == full.encode(text) and out["text"] == full.decode(full.encode(text))


def test_lazy_tokenizer_is_exact_from_many_threads_at_once(pair, tmp_path):
    """Threads that stream from one Assistant (a server's) tokenize at once; the lazy tokenizer grows its
    vocabulary as new texts come, under a lock."""
    import threading

    full, _ = pair
    lazy = Tokenizer(full._path.parent)  # a fresh lazy one: nothing kept yet
    texts = [f"{word} {i} {chr(0x400 + i)}{chr(0x4e00 + i)} ünï {i * 7}" for i, word in
             enumerate(STRINGS * 8)]
    got, errors = {}, []

    def work(k):
        try:
            got[k] = [lazy.encode(t) for t in texts[k::6]]
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and all(got[k] == [full.encode(t) for t in texts[k::6]] for k in range(6))


def test_load_full_keeps_ids(pair, tmp_path):
    full, lazy = pair
    import copy

    switched = copy.copy(lazy)
    switched.load_full()
    assert switched._full is not None and switched._lazy is None
    for text in STRINGS:
        assert switched.encode(text) == full.encode(text)


def test_replaced_tokenizer_file_is_noticed(tmp_path, home):
    """The tokenizer's digest is remembered by file size, mtime and inode; a new file is hashed again."""
    from tokenizers import Tokenizer as HFTokenizer

    model = train(tmp_path / "tok", "sentencepiece")
    Tokenizer(model)
    before = Tokenizer(model)
    assert before._lazy is not None and list(tokenizers_dir().glob("*.digest"))
    train(model, "bytelevel")  # same path, other vocabulary
    after = Tokenizer(model)
    assert after.fingerprint != before.fingerprint
    expected = HFTokenizer.from_file(str(model / "tokenizer.json")).encode(CORPUS[0], add_special_tokens=False).ids
    assert after.encode(CORPUS[0]) == Tokenizer(model).encode(CORPUS[0]) == expected
    for memo in tokenizers_dir().glob("*.digest"):
        memo.write_text("garbage")  # a damaged memo is ignored
    assert Tokenizer(model).fingerprint == after.fingerprint


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.lists(st.integers(min_value=0, max_value=800), max_size=40),
                 st.text(max_size=40).map(lambda t: ["text", t])))
def test_streaming_detokenizer_equals_full_decode(pair, ids):
    """Token by token (byte fallback, split characters, leading spaces) the pieces join to decode(ids)."""
    from urial_edge.runtime.detokenizer import StreamingDetokenizer

    for tok in pair:
        token_ids = tok.encode(ids[1]) if ids[:1] == ["text"] else ids
        d = StreamingDetokenizer(tok)
        pieces = [d.add(t) for t in token_ids]
        assert "".join(pieces) + d.flush() == tok.decode(token_ids)
        assert all("\ufffd" not in p for p in pieces) or "\ufffd" in tok.decode(token_ids)


def test_bytes_that_never_make_a_character_are_not_held_forever(pair):
    """Output that is not text (a run of stray continuation bytes) still streams, bounded by MAX_HELD."""
    from urial_edge.runtime.detokenizer import MAX_HELD, StreamingDetokenizer

    for tok in pair:
        stray = [i for i in range(tok.vocab_size) if tok.decode([i]) == "\ufffd"][:1] * (3 * MAX_HELD)
        if not stray:  # the trained sentencepiece vocabulary marks its byte tokens special (decoded as "")
            pytest.skip("no byte token that decodes to U+FFFD in this vocabulary")
        d = StreamingDetokenizer(tok)
        pieces = [d.add(t) for t in stray]
        assert sum(1 for p in pieces if p) >= 2  # shown along the way, not only at the end
        assert "".join(pieces) + d.flush() == tok.decode(stray)
