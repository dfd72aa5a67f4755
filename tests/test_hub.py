"""``models pull`` and ``models info`` for Hub models, offline: errors, the Hugging Face cache, GGUF conversion.

Nothing here reaches the network: HF_HUB_OFFLINE is set and the Hugging Face
cache is a temporary directory laid out as huggingface-hub lays it out
(``models--org--name/{blobs,snapshots/<revision>,refs/main}``). The commands run
in fresh processes, as users run them (huggingface-hub reads HF_HUB_OFFLINE
when it is first imported).
"""

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_gguf, make_tiny_model
from urial_edge.model import hub
from urial_edge.errors import UrialError
from urial_edge.units import format_size

REVISION = "5f0c4b1e9a7d3c2b8e6f4a1d0c9b8a7e6d5c4b3a"


def cache_repo(hf_cache: Path, repo: str, files: dict) -> Path:
    """Put ``files`` ({name in repo: local file}) in a Hugging Face cache as a download of ``repo`` would."""
    folder = hf_cache / ("models--" + repo.replace("/", "--"))
    snapshot = folder / "snapshots" / REVISION
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    return snapshot


@pytest.fixture
def cli(home, tmp_path):
    """Run ``urial-edge`` in a fresh process, offline, with an empty Hugging Face cache at ``cli.hf_cache``."""
    hf_cache = tmp_path / "hf-cache"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hf_cache), "URIAL_EDGE_HOME": str(home)}

    def run(*argv):
        return subprocess.run([sys.executable, "-m", "urial_edge.cli", *argv], capture_output=True, text=True,
                              env=env, timeout=300)

    run.hf_cache = hf_cache
    return run


def one_line_error(proc) -> str:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    return lines[0]


def test_offline_errors_name_the_pull_command(cli):
    for argv, name in [(["models", "pull", "mistral-7b"], "mistral-7b"),
                       (["ask", "-m", "mistral-7b", "hello"], "mistral-7b"),
                       (["models", "pull", "some-org/some-model"], "some-org/some-model")]:
        line = one_line_error(cli(*argv))
        assert f"`urial-edge models pull {name}`" in line and "offline" in line, line
        assert "huggingface-cli" not in line
    line = one_line_error(cli("models", "info", "mistral-7b", "--path"))
    assert "not downloaded: run `urial-edge models pull mistral-7b`" in line
    assert "not a registry name" in one_line_error(cli("models", "pull", "no-such-model"))


def test_info_describes_a_registry_model_before_download(cli):
    info = cli("models", "info", "qwen2.5-0.5b")
    assert info.returncode == 0, info.stderr
    assert "repo: mlx-community/Qwen2.5-0.5B-4bit" in info.stdout
    assert "license: Apache-2.0" in info.stdout and "description: Qwen2.5 0.5B base" in info.stdout
    assert "status: not downloaded: run `urial-edge models pull qwen2.5-0.5b`" in info.stdout
    assert "size_bytes" not in info.stdout  # unknown while the Hub cannot be asked
    listing = cli("models", "list").stdout
    assert "qwen2.5-0.5b" in listing and "not downloaded" in listing


def test_a_model_in_the_hugging_face_cache_is_found_offline(cli, tmp_path):
    tiny = make_tiny_model(tmp_path / "tiny", "llama")
    snapshot = cache_repo(cli.hf_cache, "mlx-community/Qwen2.5-0.5B-4bit",
                          {p.name: p for p in tiny.iterdir()})
    pulled = cli("models", "pull", "qwen2.5-0.5b")
    assert pulled.returncode == 0, pulled.stderr
    assert pulled.stdout.strip() == str(snapshot)
    size = format_size(sum(p.stat().st_size for p in tiny.iterdir()))
    assert f"qwen2.5-0.5b: {size} in {snapshot}" in pulled.stderr
    listing = [line for line in cli("models", "list").stdout.splitlines() if "qwen2.5-0.5b" in line]
    assert "downloaded" in listing[0] and "not downloaded" not in listing[0]
    answer = cli("ask", "-m", "qwen2.5-0.5b", "-p", "urial-k0", "--max-tokens", "4", "--json", "Hello?")
    assert answer.returncode == 0 and json.loads(answer.stdout)["tokens"] >= 1, answer.stderr


def test_a_cached_gguf_repo_is_converted_once(cli, home, tmp_path):
    q4, q8 = make_tiny_gguf(tmp_path / "a.gguf", seed=1), make_tiny_gguf(tmp_path / "b.gguf", seed=2)
    snapshot = cache_repo(cli.hf_cache, "some-org/Tiny-GGUF", {"tiny-Q4_K_M.gguf": q4, "tiny-Q8_0.gguf": q8,
                                                               "README.md": q4})
    first = cli("models", "pull", "some-org/Tiny-GGUF")
    assert first.returncode == 0, first.stderr
    target = home / "models" / "tiny-Q4_K_M"  # the Q4_K_M file is the default pick
    assert first.stdout.strip() == str(target) and "Importing" in first.stderr
    info = json.loads((target / "urial_edge.json").read_text())
    assert info["source"] == str((snapshot / "tiny-Q4_K_M.gguf").resolve()) and info["architecture"] == "llama"
    again = cli("models", "pull", "some-org/Tiny-GGUF")
    assert again.returncode == 0 and again.stdout == first.stdout and "Importing" not in again.stderr
    chosen = cli("models", "pull", "some-org/Tiny-GGUF", "--file", "tiny-Q8_0.gguf")
    assert chosen.returncode == 0 and chosen.stdout.strip() == str(home / "models" / "tiny-Q8_0"), chosen.stderr
    assert "has no file 'nope.gguf'" in one_line_error(cli("models", "pull", "some-org/Tiny-GGUF", "--file",
                                                           "nope.gguf"))


def test_which_files_a_repo_needs():
    mlx = ["config.json", "model.safetensors", "tokenizer.json", "README.md"]
    assert hub.choose(mlx, "o/m") == hub.MODEL_FILES
    assert hub.choose(["m.Q2_K.gguf", "m.Q4_K_M.gguf", "m.Q8_0.gguf"], "o/m")[0] == "m.Q4_K_M.gguf"
    assert hub.choose(["only.gguf", "README.md"], "o/m")[0] == "only.gguf"
    assert hub.choose(["README.md"], "o/m") is None
    with pytest.raises(UrialError, match="has 2 GGUF files .*pick one with --file"):
        hub.choose(["m.Q5_K.gguf", "m.Q8_0.gguf"], "o/m")
    with pytest.raises(UrialError, match="not a Hugging Face repo id"):
        hub.check_repo_id("a/b/c")
