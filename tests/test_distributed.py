"""A model split over several local ranks (mlx.launch, ring backend) answers as one process does.

The launched tests start 2 or 3 real processes on this machine; the ranks import
this checkout (PYTHONPATH) and share the test's store. mlx.launch exits 0 even
when a rank fails, so the tests read what the ranks wrote and printed.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

import ranks
from conftest import make_tiny_model, wait_until
from ranks import LAUNCH_TIMEOUT, launch_command
from urial_edge.distributed import lockstep, sharding
from urial_edge.distributed import world as distributed
from urial_edge.errors import UrialError

REPO = Path(__file__).resolve().parents[1]
PROMPT = '''name = "tiny"
system = "You are a helpful assistant."
[[examples]]
query = "What is one plus one?"
answer = "One plus one is two."
'''
QUERIES = ["What is the capital of France?", "Name a colour."]
MAX_TOKENS = 16


def launch_env(home: Path, **extra: str) -> dict:
    """The ranks import this checkout and use the test's store; one BLAS thread each, as they share the cores."""
    return {**os.environ, "URIAL_EDGE_HOME": str(home), "PYTHONPATH": str(REPO), "MKL_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1", **extra}


def launch(n: int, home: Path, *command: str, stdin: str = "", **env: str) -> subprocess.CompletedProcess:
    """Run on n ranks; output is decoded without newline translation, as random models do write a bare CR."""
    run = subprocess.run(launch_command(n, *command), env=launch_env(home, **env), cwd=REPO, input=stdin.encode(),
                         capture_output=True, timeout=LAUNCH_TIMEOUT)
    run.stdout, run.stderr = run.stdout.decode(errors="replace"), run.stderr.decode(errors="replace")
    return run


def probe(n: int, home: Path, out: Path, model: Path, prompt, queries=QUERIES, max_tokens=MAX_TOKENS, env=None,
          **options):
    return ranks.probe(n, launch_env(home, **(env or {})), out, model, prompt, {"max_tokens": max_tokens, **options},
                       queries, cwd=REPO)


def single_answers(model: Path, prompt, queries=QUERIES, max_tokens=MAX_TOKENS):
    from urial_edge.runtime.assistant import Assistant

    bot = Assistant.load(str(model), str(prompt), max_tokens=max_tokens)
    return [bot.ask(q) for q in queries]


def cli(*args: str) -> list:
    """A urial-edge command line for the ranks (mlx.launch puts the Python interpreter first)."""
    return ["-m", "urial_edge.cli", *args]


@pytest.fixture
def prompt_file(tmp_path):
    path = tmp_path / "tiny.toml"
    path.write_text(PROMPT)
    return path


@pytest.fixture(scope="module")
def llama6(tmp_path_factory):
    """A tiny llama whose 6 query and 2 key/value heads split over 2 ranks, not 3."""
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "llama6", "llama", hidden_size=96,
                           num_attention_heads=6, num_key_value_heads=2, intermediate_size=192, num_hidden_layers=3)


# -- in one process --------------------------------------------------------------------------------


def test_one_process_is_rank_zero_of_one(monkeypatch, tmp_path):
    for var, _ in distributed.LAUNCH_ENV:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "_WORLD", None)
    assert distributed.world() == distributed.World()
    (tmp_path / "hosts").write_text("\n")  # what `mlx.launch -n 1` writes
    monkeypatch.setenv("MLX_HOSTFILE", str(tmp_path / "hosts"))
    monkeypatch.setattr(distributed, "_WORLD", None)
    assert distributed.world() == distributed.World()
    assert not distributed.active() and distributed.is_leader()
    assert distributed.leader_input(lambda: [1, "a"]) == [1, "a"]
    assert distributed.all_ranks_have(False, "x") is False
    assert "one process" in distributed.describe()


def test_sharding_mode_errors_name_the_architecture(tiny_gemma, llama6, tmp_path, monkeypatch):
    from urial_edge.model.loading import load_model

    gemma, config = load_model(tiny_gemma, lazy=True)
    with pytest.raises(UrialError, match=r"'gemma3_text' cannot be split over 2 ranks.*: .*\bllama\b.*\bqwen2\b"):
        sharding.sharding_mode(gemma, config, 2)
    llama, config = load_model(llama6, lazy=True)
    assert sharding.sharding_mode(llama, config, 2) == "tensor"
    with pytest.raises(UrialError, match=r"6 query heads and 2 key/value heads do not divide by 3 \(it splits "
                                         r"over 2 ranks\)"):
        sharding.sharding_mode(llama, config, 3)
    monkeypatch.setenv(sharding.SHARDING_ENV, "pipeline")
    with pytest.raises(UrialError, match="in pipeline mode"):
        sharding.sharding_mode(llama, config, 2)
    monkeypatch.delenv(sharding.SHARDING_ENV)
    qwen, config = load_model(make_tiny_model(tmp_path / "qwen2", "llama", model_type="qwen2"), lazy=True)
    assert sharding.sharding_mode(qwen, config, 2) == "pipeline"  # its one key/value head cannot be split
    with pytest.raises(UrialError, match="it has 2 layers, fewer than the ranks"):
        sharding.sharding_mode(qwen, config, 3)
    monkeypatch.setenv(sharding.SHARDING_ENV, "rows")
    with pytest.raises(UrialError, match="must be 'tensor' or 'pipeline'"):
        sharding.sharding_mode(qwen, config, 2)


def test_lockstep_in_one_process_answers_cancels_and_stops(home, llama6, prompt_file):
    """The lock-step protocol's bookkeeping (calls, errors, cancellations, stop) without a second rank."""
    from urial_edge.runtime.assistant import Assistant

    bot = Assistant.load(str(llama6), str(prompt_file), max_tokens=MAX_TOKENS)
    expected = bot.ask(QUERIES[0]).text
    steps = lockstep.Lockstep(bot)
    bot.start()  # the engine thread runs the lock-step loop
    assert steps.call("stream", {"query": QUERIES[0]}).finish().text == expected
    with pytest.raises(UrialError, match="the query is empty"):
        steps.call("stream", {"query": "  "})
    long = steps.call("complete", {"text": "Once", "max_tokens": 100000})
    next(iter(long))
    long.cancel()  # queued, then applied before a step
    assert long.finish().finish_reason == "cancelled"
    assert not bot.engine.busy()
    steps.stop()
    assert steps.stopped.is_set()
    with pytest.raises(UrialError, match="stopping"):
        steps.call("stream", {"query": QUERIES[0]})


def test_followers_keep_only_warnings_and_errors(monkeypatch, capfd):
    monkeypatch.setenv("MLX_HOSTFILE", "/nonexistent")
    monkeypatch.setenv("MLX_RANK", "2")
    monkeypatch.setattr(sys, "stdout", sys.stdout)
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    distributed.quiet_followers()
    print("an answer")
    sys.stderr.write("caching prefix tokens [###] 3/3\n>>> error: boom\nwarning: mind")
    sys.stderr.write(" this\n")
    sys.stderr.flush()
    out, err = capfd.readouterr()
    assert "an answer" not in out
    assert err == "[rank 2] error: boom\n[rank 2] warning: mind this\n"


# -- launched: 2 or 3 local ranks ----------------------------------------------------------------


def damage(path: Path) -> None:
    """Flip bytes in the tensor data (the header stays readable, the checksum fails)."""
    data = bytearray(path.read_bytes())
    for i in range(len(data) - 64, len(data) - 32):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.slow
def test_two_ranks_answer_as_one_process_and_share_nothing_stale(home, llama6, prompt_file, tmp_path):
    expected = [a.token_ids for a in single_answers(llama6, prompt_file)]
    out = tmp_path / "out"

    first, run = probe(2, home, out, llama6, prompt_file)
    for rank, record in enumerate(first):
        assert record["shard"] == {"rank": rank, "size": 2, "mode": "tensor"}
        assert [a["token_ids"] for a in record["answers"]] == expected, run.stderr
        assert not record["cache_hit"] and Path(record["prefix_path"]).is_file()
    paths = [Path(r["prefix_path"]) for r in first]
    assert len(set(paths)) == 2  # one file per rank, both apart from the single-process one

    again, _ = probe(2, home, out, llama6, prompt_file)
    assert all(r["cache_hit"] for r in again)  # every rank resumed from its own part
    assert all([a["token_ids"] for a in r["answers"]] == expected for r in again)

    damage(paths[1])
    before = [p.stat().st_mtime_ns for p in paths]
    rebuilt, run = probe(2, home, out, llama6, prompt_file)
    assert not any(r["cache_hit"] for r in rebuilt)  # both ranks rebuilt, not only the damaged one
    assert all(p.stat().st_mtime_ns != t for p, t in zip(paths, before))
    assert all([a["token_ids"] for a in r["answers"]] == expected for r in rebuilt)
    assert re.search(r"warning: prefix cache \S+ checksum mismatch", run.stderr), run.stderr  # rank 1 says why
    assert "another rank's part is missing or damaged" in run.stderr


@pytest.mark.slow
def test_ranks_sample_alike_without_a_seed(home, llama6, prompt_file, tmp_path):
    records, run = probe(2, home, tmp_path / "out", llama6, prompt_file, temperature=1.0, repetition_penalty=1.0)
    tokens = [[a["token_ids"] for a in r["answers"]] for r in records]
    assert tokens[0] == tokens[1], run.stderr  # one random stream on every rank (seeded by rank 0)
    greedy = [a.token_ids for a in single_answers(llama6, prompt_file)]
    assert tokens[0] != greedy  # it did sample


@pytest.mark.slow
def test_pipeline_split_answers_as_one_process(home, tmp_path, prompt_file):
    qwen = make_tiny_model(tmp_path / "qwen2", "llama", model_type="qwen2", num_hidden_layers=3)
    expected = [a.token_ids for a in single_answers(qwen, prompt_file)]
    records, run = probe(2, home, tmp_path / "out", qwen, prompt_file)
    for rank, record in enumerate(records):
        assert record["shard"] == {"rank": rank, "size": 2, "mode": "pipeline"}
        assert [a["token_ids"] for a in record["answers"]] == expected, run.stderr


@pytest.mark.slow
def test_models_that_cannot_be_split_fail_in_one_line(home, llama6, tiny_gemma, prompt_file):
    for n, model, reason in [(3, llama6, "6 query heads and 2 key/value heads do not divide by 3"),
                             (2, tiny_gemma, "'gemma3_text' cannot be split over 2 ranks")]:
        run = launch(n, home, *cli("ask", "-m", str(model), "-p", str(prompt_file), "Hi"))
        assert run.stdout == ""
        errors = [line for line in run.stderr.splitlines() if "error:" in line]
        assert errors and all(reason in line for line in errors), run.stderr
        assert "Traceback" not in run.stderr


@pytest.mark.slow
def test_cli_under_two_ranks_reads_and_writes_on_rank_zero_only(home, llama6, prompt_file, tmp_path):
    expected = [a.text for a in single_answers(llama6, prompt_file)]
    infile, outfile = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    infile.write_text("".join(json.dumps({"id": i, "query": q}) + "\n" for i, q in enumerate(QUERIES)))
    run = launch(2, home, *cli("batch", str(infile), "-o", str(outfile), "-m", str(llama6), "-p", str(prompt_file),
                               "--max-tokens", str(MAX_TOKENS)))
    lines = [json.loads(line) for line in outfile.read_text().splitlines()]
    assert [(r["id"], r["text"]) for r in lines] == list(enumerate(expected)), run.stderr

    run = launch(2, home, *cli("doctor"))
    assert re.findall(r"^distributed\s+(.*)$", run.stdout, re.M) == ["rank 0 of 2 (ring backend)"]

    run = launch(2, home, *cli("ask", "-m", str(llama6), "-p", str(prompt_file)), stdin="What?\n")
    assert "error: under mlx.launch standard input never ends: pass the query as an argument" in run.stderr


@pytest.mark.slow
def test_chat_sessions_are_kept_per_rank_and_rebuilt_together(home, llama6, prompt_file):
    from urial_edge.runtime.assistant import Assistant

    turns = ["What is one plus one?", "And two plus two?"]
    chat = Assistant.load(str(llama6), str(prompt_file), max_tokens=MAX_TOKENS).chat()
    expected = [chat.send(t).text for t in turns]
    args = cli("chat", "-s", "talk", "-m", str(llama6), "-p", str(prompt_file), "--max-tokens", str(MAX_TOKENS))

    run = launch(2, home, *args, stdin=f"{turns[0]}\n/exit\n")
    assert run.stdout.strip() == expected[0], run.stderr
    parts = [home / "sessions" / ".shards" / "2-tensor" / f"rank{r}" / "talk.safetensors" for r in range(2)]
    assert all(p.is_file() for p in parts)

    damage(parts[1])
    run = launch(2, home, *args, stdin=f"{turns[1]}\n/exit\n")
    assert run.stdout.strip() == expected[1], run.stderr
    assert "[rank 1] warning: session 'talk': its KV state is damaged" in run.stderr
    assert "session 'talk': another rank's part is missing or damaged" in run.stderr


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.loads(r.read())


def health(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=120) as r:
        return json.loads(r.read())


def wait_until_idle(health_url: str) -> dict:
    """/health once nothing runs or waits (the deadline only guards against a hang)."""
    def idle():
        load = health(health_url)
        return load if load["active"] == 0 and load["waiting"] == 0 else None

    return wait_until(idle, timeout=600.0, what="an idle server")


@pytest.mark.slow
def test_serve_on_two_ranks_answers_as_one_process(home, llama6, prompt_file):
    from urial_edge.runtime.assistant import Assistant

    bot = Assistant.load(str(llama6), str(prompt_file), max_tokens=MAX_TOKENS)
    expected_chat = bot.ask(QUERIES[0]).text
    expected_completion = bot.complete("Once upon a time").finish().text
    expected_choice = bot.ask(QUERIES[0], regex="[a-z]{2,6}").text  # a constraint reaches both ranks
    server = subprocess.Popen(launch_command(2, *cli("serve", "-m", str(llama6), "-p", str(prompt_file), "--port",
                                                     "0")),
                              env=launch_env(home), cwd=REPO, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    try:
        deadline, url = time.time() + LAUNCH_TIMEOUT, None
        while url is None and time.time() < deadline and server.poll() is None:
            m = re.search(r"on (http://[\d.]+:\d+/v1)", server.stderr.readline())
            url = m.group(1) if m else None
        assert url, "the server did not start"
        chat = {"messages": [{"role": "user", "content": QUERIES[0]}], "max_tokens": MAX_TOKENS}
        assert post(f"{url}/chat/completions", chat)["choices"][0]["message"]["content"] == expected_chat

        # a streaming client that leaves early: its answer is cancelled on both ranks at the same step
        health_url = url.removesuffix("/v1") + "/health"
        cancelled = health(health_url)["finished"]["cancelled"]
        request = urllib.request.Request(f"{url}/chat/completions", json.dumps({**chat, "stream": True,
                                         "max_tokens": 2000}).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as r:
            r.readline()
        assert wait_until_idle(health_url)["finished"]["cancelled"] == cancelled + 1  # not run to its end
        completion = post(f"{url}/completions", {"prompt": "Once upon a time", "max_tokens": MAX_TOKENS})
        assert completion["choices"][0]["text"] == expected_completion
        assert post(f"{url}/chat/completions", chat)["choices"][0]["message"]["content"] == expected_chat
        constrained = {**chat, "response_format": {"type": "regex", "regex": "[a-z]{2,6}"}}
        assert post(f"{url}/chat/completions", constrained)["choices"][0]["message"]["content"] == expected_choice

        record = json.loads(next((home / "servers").glob("*.json")).read_text())
        os.kill(record["pid"], signal.SIGTERM)  # rank 0 stops and tells rank 1
        server.wait(timeout=60)
        rest = server.stderr.read()
        assert "error" not in rest and "Traceback" not in rest, rest
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.slow
def test_smollm2_over_three_ranks_answers_as_one_process(home, tmp_path):
    from test_models import smollm2_gguf
    from urial_edge.model.store import resolve_model

    model = resolve_model(str(smollm2_gguf()))
    query = ["What is the capital of France?"]
    expected = single_answers(model, "urial-k1", query, max_tokens=20)[0]
    assert "Paris" in expected.text
    records, run = probe(3, home, tmp_path / "out", model, "urial-k1", query, max_tokens=20)
    for rank, record in enumerate(records):
        assert record["shard"] == {"rank": rank, "size": 3, "mode": "tensor"}
        assert record["answers"][0]["text"] == expected.text, run.stderr
