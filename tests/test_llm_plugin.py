"""The ``llm`` plugin, driven through the real ``llm`` command line on a tiny model in the store.

llm finds plugins by entry point. Where urial-edge is installed from this
checkout (CI: ``pip install -e ".[test]"``) the installed metadata declares
it; in a venv whose urial-edge was installed from elsewhere, the fixture
declares the same entry point (read from pyproject.toml) in a small dist-info
on PYTHONPATH, so llm's own discovery still loads it.
"""

import json
import os
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from conftest import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
PROMPT = "urial-k0"  # the shortest prompt keeps the tiny model's runs quick

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib


def plugin_path(folder: Path) -> list:
    """Extra sys.path entries that make llm see our entry point (none when it is installed)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["llm"]
    installed = {ep.name: ep.value for ep in entry_points(group="llm")}
    if all(installed.get(name) == value for name, value in declared.items()):
        return []
    info = folder / "urial_edge_checkout-0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: urial-edge-checkout\nVersion: 0\n")
    (info / "entry_points.txt").write_text("[llm]\n" + "".join(f"{k} = {v}\n" for k, v in declared.items()))
    return [str(folder)]


@pytest.fixture
def llm_cli(home, tmp_path, monkeypatch):
    """Run ``llm`` in a fresh process against a store holding the tiny model ``tiny``."""
    make_tiny_model(home / "models" / "tiny", "llama")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    env = {**os.environ, "LLM_USER_PATH": str(tmp_path / "llm"),
           "PYTHONPATH": os.pathsep.join([str(ROOT), *plugin_path(tmp_path / "plugin")])}

    def run(*args, stdin=None, check=True):
        proc = subprocess.run([sys.executable, "-m", "llm", *args], input=stdin, capture_output=True, text=True,
                              env=env, cwd=ROOT, timeout=300)
        if check:
            assert proc.returncode == 0, proc.stderr
        return proc

    return run


def logged(llm_cli, n: int) -> list:
    """The last ``n`` responses in llm's log, oldest first."""
    return json.loads(llm_cli("logs", "-n", str(n), "--json").stdout)


def tiny_assistant(home, **options):
    from urial_edge.runtime.assistant import Assistant

    return Assistant.load(str(home / "models" / "tiny"), PROMPT, **options)


def test_store_models_are_listed(llm_cli):
    out = llm_cli("models").stdout
    assert "urial-edge/tiny" in out
    assert "urial-edge/gemma-3-270m" in out  # the bundled model: converts on first use
    assert "urial-edge/mistral-7b" not in out  # a registry model that is not downloaded


def test_options_are_checked_by_our_rules(llm_cli):
    cases = {("-o", "temperature", "9"): "temperature must be in [0, 5], got 9.0",
             ("-o", "kv_bits", "3"): "kv_bits must be 4 or 8",
             ("-o", "preset", "fast"): "unknown preset 'fast'",
             ("-o", "max_tokens", "many"): "max_tokens"}
    for args, message in cases.items():
        proc = llm_cli("-m", "urial-edge/tiny", *args, "hello", check=False)
        assert proc.returncode == 1 and message in proc.stderr, (args, proc.stderr)
    options = llm_cli("models", "--options", "-m", "urial-edge/tiny").stdout
    for name in ("urial_prompt", "kv_bits", "max_tokens", "temperature", "top_p", "repetition_penalty", "seed"):
        assert f"{name}:" in options


@pytest.mark.slow
def test_prompt_answers_from_the_cached_prefix_and_logs_usage(llm_cli, home):
    args = ["-m", "urial-edge/tiny", "-o", "urial_prompt", PROMPT, "-o", "max_tokens", "8"]
    first = llm_cli(*args, "Name three rivers.")
    assert "caching prefix tokens" in first.stderr  # built once, on disk
    again = llm_cli(*args, "Name three mountains.")
    assert "caching prefix tokens" not in again.stderr  # a new process starts from the stored prefix
    bot = tiny_assistant(home, max_tokens=8)
    rows = logged(llm_cli, 2)
    assert [r["prompt"] for r in rows] == ["Name three rivers.", "Name three mountains."]
    for row in rows:
        expected = bot.ask(row["prompt"])
        assert row["response"].strip() == expected.text
        assert (row["input_tokens"], row["output_tokens"]) == (expected.stats.prompt_tokens, expected.tokens)
        assert json.loads(row["token_details"]) == {"cached_tokens": len(bot.prefix_ids)}


@pytest.mark.slow
def test_chat_keeps_the_conversation_state_and_continue_rebuilds_it(llm_cli, home):
    options = ["-o", "urial_prompt", PROMPT, "-o", "max_tokens", "6"]
    llm_cli("chat", "-m", "urial-edge/tiny", *options, stdin="first question\nsecond question\nquit\n")
    llm_cli("-c", *options, "third question")  # a new process: the conversation comes from llm's log
    rows = logged(llm_cli, 3)
    assert len({r["conversation_id"] for r in rows}) == 1
    bot = tiny_assistant(home, max_tokens=6)
    prefix = len(bot.prefix_ids)
    history = []
    for row in rows:
        expected = bot.ask(row["prompt"], history=history)  # a fresh render of the whole conversation
        assert row["response"].strip() == expected.text
        assert row["input_tokens"] == expected.stats.prompt_tokens
        history.append((row["prompt"], expected.text))
    cached = [json.loads(r["token_details"])["cached_tokens"] for r in rows]
    # turn 2 starts from the state turn 1 left (its whole prompt at least); turn 3 was rebuilt in its process
    assert cached[0] == prefix and cached[1] >= rows[0]["input_tokens"] and cached[2] == prefix


@pytest.mark.slow
def test_system_text_and_kv_bits(llm_cli, home):
    llm_cli("-m", "urial-edge/tiny", "-o", "urial_prompt", PROMPT, "-o", "kv_bits", "8", "-o", "max_tokens", "6",
            "-s", "Answer in French.", "Where is Lyon?")
    row = logged(llm_cli, 1)[0]
    expected = tiny_assistant(home, kv_bits=8, max_tokens=6).ask("Where is Lyon?", system="Answer in French.")
    assert row["system"] == "Answer in French." and row["response"].strip() == expected.text


def test_schema_support_gives_json_that_validates(llm_cli):
    import jsonschema

    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 5},
                                               "age": {"type": "integer", "minimum": 0, "maximum": 99}},
              "required": ["name", "age"], "additionalProperties": False}
    out = llm_cli("-m", "urial-edge/tiny", "-o", "urial_prompt", PROMPT, "-o", "max_tokens", "100",
                  "--schema", json.dumps(schema), "Who is it?")
    jsonschema.validate(json.loads(out.stdout), schema)
    assert json.loads(logged(llm_cli, 1)[0]["response"]) == json.loads(out.stdout)
    bad = llm_cli("-m", "urial-edge/tiny", "-o", "urial_prompt", PROMPT, "--schema", '{"type": "strin"}', "x",
                  check=False)
    assert bad.returncode == 1 and "invalid schema: Invalid type: strin" in bad.stderr
