"""The prefix KV cache: token-exact resumption, integrity, keys and copies (tiny models)."""

import os
import subprocess
import sys

import pytest

from conftest import make_tiny_model
from urial_edge.runtime import kv_file, prefix_cache
from urial_edge.runtime.engine import Engine, Request
from urial_edge.model.loading import load_model
from urial_edge.model.store import model_fingerprint
from urial_edge.runtime.options import GenerationOptions
from urial_edge.model.tokenizer import Tokenizer

PREFIX = "# Instruction\n\nYou are a helpful assistant. " * 4 + "\n\n"
QUERIES = ["# Query:\n```\nWhat is two plus two?\n```\n\n# Answer:\n```\n",
           "# Query:\n```\nName a colour.\n```\n\n# Answer:\n```\n"]
OPTIONS = GenerationOptions(max_tokens=24, repetition_penalty=1.1)


def generate(model, tokens, cache, history, options=OPTIONS):
    tok = Tokenizer(model.path)
    seq = Engine(model, tok, tok.eos_ids, 2048).submit(Request(tokens, cache, history, options, framed=False))
    list(seq)
    return seq.token_ids


def full_prefill(model, ids, options=OPTIONS):
    return generate(model, ids, None, [])


def resumed(model, pc, ids, options=OPTIONS):
    return generate(model, ids, pc.fresh(), list(pc.tokens), options)


def setup(path, kv_bits=None, use_disk=True):
    model, _ = load_model(path)
    model.path = path
    tok = Tokenizer(path)
    prefix = tok.encode(PREFIX, bos=True)
    pc = prefix_cache.load_or_build(model, prefix, model_fingerprint(path), tok.fingerprint,
                                    {"model": str(path), "prompt": "test"}, kv_bits=kv_bits, use_disk=use_disk)
    return model, tok, prefix, pc


@pytest.mark.parametrize("arch,kv_bits", [("gemma3", None), ("llama", None), ("llama", 8), ("llama", 4)])
def test_resumed_from_disk_equals_full_prefill(home, tmp_path, arch, kv_bits):
    path = make_tiny_model(tmp_path / arch, arch)
    model, tok, prefix, built = setup(path, kv_bits)
    assert not built.hit and built.path.exists()
    _, _, _, loaded = setup(path, kv_bits)  # second time: from disk
    assert loaded.hit and loaded.key == built.key
    for query in QUERIES:
        rest = tok.encode(query)
        expected = resumed(model, built, rest)
        assert resumed(model, loaded, rest) == expected
        if kv_bits is None:  # a quantized prefix decodes from its dequantized copy, not from float KV
            assert expected == full_prefill(model, prefix + rest)


def test_rotating_cache_prefix_is_longer_than_window(home, tiny_gemma):
    model, tok, prefix, pc = setup(tiny_gemma)
    window = 16
    assert len(prefix) > 4 * window
    kinds = {type(c).__name__ for c in pc.state}
    assert kinds == {"RotatingKVCache", "KVCache"}


def test_each_request_starts_from_an_untouched_prefix(home, tiny_gemma):
    model, tok, prefix, pc = setup(tiny_gemma)
    first = [resumed(model, pc, tok.encode(q)) for q in QUERIES]
    again = [resumed(model, pc, tok.encode(q)) for q in reversed(QUERIES)][::-1]
    assert first == again
    assert first[0] != first[1]


def test_file_is_readable_by_mlx_lm(home, tiny_gemma):
    from mlx_lm.models.cache import load_prompt_cache

    _, _, prefix, pc = setup(tiny_gemma)
    cache, meta = load_prompt_cache(str(pc.path), return_metadata=True)
    assert cache[0].offset == len(prefix)
    assert meta["prompt"] == "test" and int(meta["prefix_tokens"]) == len(prefix)


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "garbage"])
def test_damaged_file_is_rebuilt_with_a_warning(home, tiny_gemma, capsys, damage):
    model, tok, prefix, pc = setup(tiny_gemma)
    rest = tok.encode(QUERIES[0])
    expected = resumed(model, pc, rest)
    data = bytearray(pc.path.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "bitflip":
        data[-100] ^= 0x10
    else:
        data = bytearray(b"not a safetensors file")
    pc.path.write_bytes(bytes(data))
    capsys.readouterr()
    _, _, _, rebuilt = setup(tiny_gemma)
    err = capsys.readouterr().err
    assert not rebuilt.hit
    assert "warning: prefix cache" in err and "rebuilding" in err and len(err.strip().splitlines()) == 1
    assert resumed(model, rebuilt, rest) == expected
    assert setup(tiny_gemma)[3].hit  # the rebuilt file is good again


def test_cache_from_another_model_is_not_used(home, tmp_path, capsys):
    a = make_tiny_model(tmp_path / "a", "llama", seed=1)
    b = make_tiny_model(tmp_path / "b", "llama", seed=2, num_hidden_layers=3)
    _, _, _, pa = setup(a)
    model_b, tok, prefix, pb = setup(b)
    assert pa.key != pb.key
    # a's file copied under b's key: its metadata names a's key
    pb.path.write_bytes(pa.path.read_bytes())
    _, _, _, again = setup(b)
    assert not again.hit and "is not this prompt's state" in capsys.readouterr().err
    # a's tensors with metadata forged to claim b's key and tokens: the layer check refuses them
    kv_file.save(pb.path, pa.state, {"key": pb.key, "tokens_sha256": kv_file.tokens_digest(prefix)})
    _, _, _, forged = setup(b)
    assert not forged.hit and "does not fit this model" in capsys.readouterr().err


def test_state_of_another_prompt_with_the_same_length_is_not_used(home, tiny_llama, capsys):
    """The fault-injection case: same token count, one word changed, file copied over the other's."""
    model, tok, prefix, pc = setup(tiny_llama)
    other = list(prefix)
    other[-3] = other[-3] + 1  # same length, one token different
    po = prefix_cache.load_or_build(model, other, model_fingerprint(tiny_llama), tok.fingerprint, {"prompt": "other"})
    pc.path.write_bytes(po.path.read_bytes())
    capsys.readouterr()
    _, _, _, again = setup(tiny_llama)
    assert not again.hit and "is not this prompt's state" in capsys.readouterr().err
    rest = tok.encode(QUERIES[0])
    assert resumed(model, again, rest) == full_prefill(model, prefix + rest)


def test_key_changes_with_everything_that_changes_kv(tiny_llama):
    base = dict(model_id="m", tokenizer_id="t", tokens=[1, 2, 3], kv_bits=None)
    key = prefix_cache.cache_key(**base)
    assert key == prefix_cache.cache_key(**base)
    for change in [dict(model_id="m2"), dict(tokenizer_id="t2"), dict(tokens=[1, 2, 4]), dict(kv_bits=8)]:
        assert prefix_cache.cache_key(**{**base, **change}) != key


def test_full_disk_still_answers_and_leaves_no_partial_file(home, tiny_llama, capsys, monkeypatch):
    import errno

    def disk_full(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(kv_file.mlx_cache, "save_prompt_cache", disk_full)
    model, tok, prefix, pc = setup(tiny_llama)
    err = capsys.readouterr().err
    assert "no space left on device" in err and len(err.strip().splitlines()) == 1
    assert not pc.path.exists() and not [p for p in (home / "cache").iterdir() if p.suffix != ".lock"]
    rest = tok.encode(QUERIES[0])
    assert resumed(model, pc, rest) == full_prefill(model, prefix + rest)


def test_unwritable_cache_location_still_answers(home, tiny_llama, capsys):
    home.mkdir(parents=True, exist_ok=True)
    (home / "cache").write_text("a file where the cache directory should be")
    model, tok, prefix, pc = setup(tiny_llama)
    assert not pc.hit and "not saved" in capsys.readouterr().err
    rest = tok.encode(QUERIES[0])
    assert resumed(model, pc, rest) == full_prefill(model, prefix + rest)


BUILD_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
from test_prefix_cache import setup
from pathlib import Path
pc = setup(Path({path!r}))[3]
print(pc.key)
"""


def test_concurrent_builders_do_not_corrupt(home, tiny_gemma):
    script = BUILD_SCRIPT.format(tests=os.path.dirname(__file__), path=str(tiny_gemma))
    env = {**os.environ, "URIAL_EDGE_HOME": str(home)}
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    keys = {o[0].strip() for o in outs}
    assert len(keys) == 1
    results = prefix_cache.verify_caches()
    assert len(results) == 1 and results[0][1] is None
    assert not list((home / "cache").glob(".*.tmp*"))


def test_clear_by_size_and_age(home, tmp_path):
    for seed in (1, 2):
        setup(make_tiny_model(tmp_path / f"m{seed}", "llama", seed=seed))
    files = sorted((home / "cache").glob("*.safetensors"))
    assert len(files) == 2
    assert prefix_cache.clear_caches(older_than=3600) == []
    size = files[0].stat().st_size
    assert len(prefix_cache.clear_caches(max_size=size + 1)) == 1
    assert len(prefix_cache.clear_caches()) == 1
    assert not list((home / "cache").glob("*.safetensors"))


def test_interrupted_build_leaves_nothing_and_next_run_works(home, tiny_llama, monkeypatch):
    real_save = kv_file.mlx_cache.save_prompt_cache

    def interrupted(path, *args, **kwargs):
        with open(path, "wb") as f:
            f.write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(kv_file.mlx_cache, "save_prompt_cache", interrupted)
    with pytest.raises(KeyboardInterrupt):
        setup(tiny_llama)
    assert not [p for p in (home / "cache").iterdir() if p.suffix != ".lock"]
    monkeypatch.setattr(kv_file.mlx_cache, "save_prompt_cache", real_save)
    assert not setup(tiny_llama)[3].hit and setup(tiny_llama)[3].hit
