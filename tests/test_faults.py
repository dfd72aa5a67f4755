"""Fault injection: swapped and damaged files, crashes during a save, PID reuse, stopped servers,
hostile HTTP, bursts and bad input. Each case is one that once went wrong (see issues 14 and 24).

Issue 24's cases (from "== issue 24" on): state files tied to what they claim (tokenizer memos, prefix
caches forged with another window or with tensors of the wrong shape, sessions), writes that never
destroy data (batch output = input, foreign output files, two chats in one session, full disks by
monkeypatch, file-size limit and a real tmpfs), bad values refused at the edge (numbers, text, sizes,
JSON depth, closed standard streams), clean exits (300 runs and queued MLX work at exit) and the small
ones (cache build, session names in bytes, batch resumes, ids, BOM and stdin, doctor, models import,
prompts list)."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from conftest import TINY_PROMPT, raw, running_server, start_server
from urial_edge.runtime.assistant import Assistant
from urial_edge.cli.main import cli
from urial_edge.errors import UrialError
from urial_edge.testing import exit_stress
from urial_edge.testing.exit_stress import cli_argv

TESTS = os.path.dirname(__file__)


def load(model, prompt_file, **options):
    options.setdefault("max_tokens", 10)
    return Assistant.load(str(model), prompt_file, **options)


def one_line_error(result, code, match):
    assert result.exit_code == code, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], result.stderr
    assert "Traceback" not in result.output


# -- swapped files: an answer never comes from another state ----------------------------------------


def test_prefix_cache_of_a_same_length_prompt_copied_over_is_rebuilt(home, tiny_llama, tmp_path):
    """The reported case: one word of the system text changed, same token count, file copied over."""
    a = tmp_path / "a.toml"
    a.write_text(TINY_PROMPT)
    b = tmp_path / "b.toml"
    b.write_text(TINY_PROMPT.replace("briefly", "shortly"))  # same length in bytes, so in byte tokens
    args = ["--model", str(tiny_llama), "--max-tokens", "12"]
    run = CliRunner().invoke
    for prompt in (a, b):
        assert run(cli, ["cache", "build", *args[:2], "-p", str(prompt)]).exit_code == 0
    files = {p: Path(run(cli, ["cache", "build", *args[:2], "-p", str(p)]).stdout.strip()) for p in (a, b)}
    assert files[a] != files[b]
    files[a].write_bytes(files[b].read_bytes())
    cached = run(cli, ["ask", *args, "-p", str(a), "--json", "What is a river?"])
    full = run(cli, ["ask", *args, "-p", str(a), "--json", "--no-cache", "What is a river?"])
    assert "is not this prompt's state" in cached.stderr
    assert json.loads(cached.stdout)["text"] == json.loads(full.stdout)["text"]


def test_session_file_copied_over_another_is_never_mixed_with_its_turns(home, tiny_gemma, prompt_file, capsys):
    bot = load(tiny_gemma, prompt_file)
    a, b = bot.chat("a"), bot.chat("b")
    a.send("Tell me about rivers.")
    b.send("Tell me about cheese.")  # same length as a's message
    pa, pb = a.save(), b.save()
    assert len(a.ids) == len(b.ids)
    pa.write_bytes(pb.read_bytes())
    capsys.readouterr()
    resumed = bot.chat("a")
    assert "holds the conversation saved as 'b'" in capsys.readouterr().err
    assert resumed.turns == b.turns  # b's turns with b's state: consistent, and said so
    assert resumed.send("And then?").text == b.send("And then?").text


def test_session_state_that_does_not_match_its_turns_is_rebuilt(home, tiny_llama, prompt_file, capsys):
    from urial_edge.runtime import sessions

    bot = load(tiny_llama, prompt_file)
    a, b = bot.chat("a"), bot.chat("b")
    a.send("Tell me about rivers.")
    b.send("Tell me about cheese.")
    forged = sessions.SessionRecord("a", a.turns, b.ids, b.pending, bot.prefix.key)  # b's ids under a's turns
    sessions.save(forged, b.state, replaces=None)
    resumes_as_new(bot, "a", capsys, "does not match its turns; rebuilding")


def resumes_as_new(bot, name, capsys, warning):
    """Session ``name`` is resumed with ``warning`` and goes on as a new chat asked the same would."""
    capsys.readouterr()
    resumed = bot.chat(name)
    assert warning in capsys.readouterr().err
    fresh = bot.chat()
    for query, _ in resumed.turns:
        fresh.send(query)
    assert resumed.send("And then?").text == fresh.send("And then?").text


def test_legacy_session_directory_is_read_and_replaced(home, tiny_llama, prompt_file):
    bot = load(tiny_llama, prompt_file)
    chat = bot.chat()
    chat.send("Tell me about rivers.")
    legacy = home / "sessions" / "old"
    legacy.mkdir(parents=True)
    (legacy / "session.json").write_text(json.dumps({"version": 1, "turns": chat.turns, "ids": [1, 2]}))
    (legacy / "kv.safetensors").write_bytes(b"whatever")
    resumed = bot.chat("old")
    assert resumed.turns == chat.turns and resumed.ids == chat.ids + chat.pending
    resumed.save()
    assert not legacy.exists() and (home / "sessions" / "old.safetensors").exists()


@pytest.mark.parametrize("record", [
    {"turns": "not a list"}, {"turns": [[1, 2]]}, {"turns": [["q"]]}, {"turns": [["q", "a"]], "ids": ["x"]}, [1],
])
def test_session_records_with_wrong_types_give_one_line_errors(home, tiny_llama, prompt_file, record):
    folder = home / "sessions" / "bad"
    folder.mkdir(parents=True)
    (folder / "session.json").write_text(json.dumps(record))
    with pytest.raises(UrialError, match="session 'bad' is damaged"):
        load(tiny_llama, prompt_file).chat("bad")


# -- a crash at any step of a session save leaves the old or the new session -------------------------

CRASHING_SAVE = r"""
import os, sys
import urial_edge
from mlx_lm.models import cache as mlx_cache
from urial_edge.runtime.assistant import Assistant

step, points = int(sys.argv[3]), [0]

def point():
    points[0] += 1
    if points[0] == step:
        os._exit(17)  # no cleanup, no flush: as a crash or a power cut would

def after(fn):
    def wrapper(*args, **kwargs):
        result = fn(*args, **kwargs)
        point()
        return result
    return wrapper

bot = Assistant.load(sys.argv[1], sys.argv[2], max_tokens=8)
chat = bot.chat("a")
chat.send("And the second question?")
real_save = mlx_cache.save_prompt_cache

def save(*args, **kwargs):
    point()  # the temporary file exists, still empty
    real_save(*args, **kwargs)
    point()  # written, not yet flushed to disk

mlx_cache.save_prompt_cache = save
os.fsync = after(os.fsync)  # the file, then the directory
os.replace = after(os.replace)
chat.save()
print(points[0])
"""


def test_a_crash_after_each_step_of_a_session_save_leaves_the_old_or_the_new_session(home, tiny_gemma,
                                                                                     prompt_file):
    bot = load(tiny_gemma, prompt_file, max_tokens=8)
    first = bot.chat("a")
    first.send("The first question?")
    one_turn = first.save().read_bytes()
    env = {**os.environ, "URIAL_EDGE_HOME": str(home)}
    argv = [sys.executable, "-c", CRASHING_SAVE, str(tiny_gemma), prompt_file]
    done = subprocess.run(argv + ["0"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout)
    assert steps == 5  # created, written, fsync(file), rename, fsync(directory)
    seen = []
    for step in range(1, steps + 1):
        (home / "sessions" / "a.safetensors").write_bytes(one_turn)  # back to the one-turn session
        crashed = subprocess.run(argv + [str(step)], capture_output=True, text=True, env=env)
        assert crashed.returncode == 17, crashed.stderr
        resumed = bot.chat("a")
        assert len(resumed.turns) in (1, 2), step  # never none
        seen.append(len(resumed.turns))
        fresh = bot.chat()
        for q, _ in resumed.turns:
            fresh.send(q)
        assert resumed.send("Next?").text == fresh.send("Next?").text  # and its state is its own
    assert seen == [1, 1, 1, 2, 2]  # the rename is the moment the new session takes over
    from urial_edge.runtime.sessions import list_sessions

    assert [p for p in (home / "sessions").iterdir() if p.name.startswith(".")]  # killed writers' leftovers
    assert list_sessions() == ["a"]  # ... are not sessions


def test_temporary_files_of_killed_writers_are_ignored_and_cleared(home, tiny_llama, prompt_file):
    load(tiny_llama, prompt_file).prefix  # a real cache file
    cache = home / "cache"
    stale = cache / ".0123.safetensors.abcd.tmp.safetensors"
    stale.write_bytes(b"half a file")
    old = time.time() - 3600
    os.utime(stale, (old, old))
    verify = CliRunner().invoke(cli, ["cache", "verify"])
    assert verify.exit_code == 0 and stale.name not in verify.stdout
    assert stale.name not in CliRunner().invoke(cli, ["cache", "list"]).stdout
    assert CliRunner().invoke(cli, ["cache", "clear", "--older-than", "30d"]).exit_code == 0
    assert not stale.exists() and list(cache.glob("*.safetensors"))


def test_cache_folder_stays_under_its_cap(home, tmp_path, monkeypatch):
    from conftest import make_tiny_model

    sizes = []
    for seed in (1, 2, 3):
        bot = load(make_tiny_model(tmp_path / f"m{seed}", "llama", seed=seed), str(write_prompt(tmp_path)))
        sizes.append(bot.prefix.path.stat().st_size)
        monkeypatch.setenv("URIAL_EDGE_CACHE_MAX", str(int(max(sizes) * 2.5)))
    files = list((home / "cache").glob("*.safetensors"))
    assert len(files) == 2 and bot.prefix.path in files  # the oldest went; the newest stays


def write_prompt(tmp_path):
    f = tmp_path / "p.toml"
    f.write_text(TINY_PROMPT)
    return f


# -- server records: never signal a foreign process -------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def plant_record(home, model, prompt_file, pid, **extra):
    """The record a server for ``model`` and ``prompt_file`` would write, under ``pid``."""
    from urial_edge.runtime.prompt import load_prompt, render_prefix
    from urial_edge.serve.discovery import prefix_digest, server_key

    port, prefix = free_port(), render_prefix(load_prompt(prompt_file))
    info = {"key": server_key(Path(model), prefix), "host": "127.0.0.1",
            "port": port, "token": "t0ken", "model": str(model), "prompt": "tiny", "kv_bits": None,
            "models": {str(Path(model).resolve()): Path(model).name}, "prompts": {prefix_digest(prefix): "tiny"},
            "api_key": False, "pid": pid, "process_start": "someone else's start", **extra}
    folder = home / "servers"
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / f"{info['key']}-{port}.json"
    record.write_text(json.dumps(info))
    return record


# another program under a reused PID: it tells, when asked with SIGUSR1, whether it was sent SIGTERM before
# (signals it blocks stay pending, so the answer does not depend on how soon a signal would have arrived)
BYSTANDER = r"""
import signal, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1})
print("ready", flush=True)
got = set()
while signal.SIGUSR1 not in got:
    got.add(signal.sigwait({signal.SIGTERM, signal.SIGUSR1}))
print("TERM" if signal.SIGTERM in got | signal.sigpending() else "never sent TERM", flush=True)
"""


def test_a_record_whose_pid_was_reused_is_never_signalled(home, tiny_llama, prompt_file):
    bystander = subprocess.Popen([sys.executable, "-c", BYSTANDER], stdout=subprocess.PIPE, text=True)
    try:
        assert bystander.stdout.readline() == "ready\n"
        record = plant_record(home, tiny_llama, prompt_file, bystander.pid)
        stop = CliRunner().invoke(cli, ["serve", "--stop"])
        assert stop.exit_code == 0 and "no server running" in stop.stderr
        assert not record.exists()  # the stale record is gone
        record = plant_record(home, tiny_llama, prompt_file, bystander.pid)
        ask = CliRunner().invoke(cli, ["ask", "--model", str(tiny_llama), "-p", prompt_file, "--max-tokens", "4",
                                       "--json", "Hi?"])
        assert ask.exit_code == 0, ask.output
        assert "server" not in json.loads(ask.stdout)["stats"] and not record.exists()  # not asked: known stale
        bystander.send_signal(signal.SIGUSR1)
        assert bystander.stdout.readline() == "never sent TERM\n"
    finally:
        bystander.kill()
        bystander.wait()


def test_two_servers_for_one_model_both_recorded_and_a_stopped_one_is_not_waited_for(home, tiny_llama,
                                                                                     prompt_file):
    procs = [start_server(home, tiny_llama, prompt_file)[0] for _ in range(2)]
    try:
        status = CliRunner().invoke(cli, ["serve", "--status"])
        assert len([line for line in status.stdout.splitlines() if line.startswith("pid ")]) == 2
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        ask = subprocess.run([sys.executable, "-m", "urial_edge.cli", "ask", "--model", str(tiny_llama), "-p",
                              prompt_file, "--max-tokens", "4", "--json", "Hi?"], capture_output=True, text=True,
                             env={**os.environ, "URIAL_EDGE_HOME": str(home)}, timeout=600)
        assert ask.returncode == 0 and "server" not in json.loads(ask.stdout)["stats"], ask.stderr
        assert ask.stderr.count("does not answer; answering here") == 2  # each given up after its health check
        stop = CliRunner().invoke(cli, ["serve", "--stop"])
        assert "(not answering)" in stop.stdout and stop.stderr.count("stopped pid") == 2
        for p in procs:
            assert p.wait(timeout=300) == 0
        assert not list((home / "servers").glob("*.json"))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


# -- hostile HTTP -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_llama):
    with running_server(tmp_path_factory.mktemp("fault-server"), tiny_llama) as info:
        yield info  # on leaving: no tracebacks from the clients that misbehaved


def send_raw(server, data: bytes, read: bool = True) -> bytes:
    with socket.create_connection((server["host"], server["port"]), timeout=30) as sock:
        sock.sendall(data)
        if not read:
            return b""
        out = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return out
            out += chunk


def status_and_error(response: bytes):
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)["error"]


@pytest.mark.parametrize("length,status,match", [
    ("-1", 400, "invalid Content-Length"), ("abc", 400, "invalid Content-Length"),
    (None, 411, "Content-Length header is required"), (str(10 ** 12), 413, "larger than"),
])
def test_content_length_is_required_and_bounded(server, length, status, match):
    header = f"Content-Length: {length}\r\n" if length is not None else ""
    response = send_raw(server, (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n{header}"
                                 "Content-Type: application/json\r\n\r\n").encode() + b"{" * 1000)
    code, error = status_and_error(response)
    assert code == status and match in error["message"] and error["type"]


def test_unsupported_methods_and_garbage_get_json_errors(server):
    for method in ("PUT", "DELETE", "PATCH"):
        code, error = status_and_error(send_raw(server, f"{method} /v1/models HTTP/1.1\r\nHost: x\r\n"
                                                         "Content-Length: 0\r\n\r\n".encode()))
        assert code == 405 and method in error["message"]
    code, error = status_and_error(send_raw(server, b"NONSENSE\r\n\r\n"))
    assert code == 400 and error["type"] == "invalid_request_error"


def test_clients_that_leave_before_their_answer_leave_no_traceback(server):
    body = b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}'
    for _ in range(5):
        send_raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000\r\n\r\n",
                 read=False)
        send_raw(server, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body, read=False)
    assert raw(server, "GET", "/health")[1]["status"] == "ok"


def test_a_burst_of_concurrent_connections_is_served_without_resets(server):
    results, errors = [], []

    def one(i):
        try:
            status, data = raw(server, "POST", "/v1/chat/completions", json.dumps(
                {"messages": [{"role": "user", "content": f"Hi {i}"}], "max_tokens": 2}),
                {"Content-Type": "application/json"})
            results.append(status)
        except OSError as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(40)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors and results.count(200) + results.count(429) == 40 and results.count(200) > 0


def test_distinct_system_messages_cost_no_disk_and_bounded_memory(server):
    cache = Path(server["home"]) / "cache"
    before = sorted(p.name for p in cache.glob("*.safetensors"))
    for i in range(12):
        status, data = raw(server, "POST", "/v1/chat/completions", json.dumps(
            {"messages": [{"role": "system", "content": f"Today is day {i}. The user is called U{i}."},
                          {"role": "user", "content": "Hi"}], "max_tokens": 2}), {"Content-Type": "application/json"})
        assert status == 200 and data["usage"]["prompt_tokens_details"]["cached_tokens"] >= 100
    assert sorted(p.name for p in cache.glob("*.safetensors")) == before  # nothing new on disk
    states = raw(server, "GET", "/health")[1]["states"]
    assert states["count"] >= 1 and states["bytes"] <= states["max_bytes"]


# -- bad input on the command line: one line, the documented exit code, before loading the model ---------


@pytest.mark.parametrize("argv,code,match", [
    (["ask", "--temperature", "nan", "x"], 2, "temperature"),
    (["ask", "--stop", "", "x"], 2, "stop"),
    (["ask", "--top-p", "0", "x"], 2, "top_p"),
    (["chat", "--session", "s" * 255], 2, "session"),
    (["chat", "--session", "../x"], 2, "session"),
])
def test_bad_option_values_exit_2(home, argv, code, match):
    result = CliRunner().invoke(cli, ["--help"] if not argv else argv)
    assert result.exit_code == code and match in result.output and "Traceback" not in result.output


def test_invalid_utf8_in_a_command_line_query_exits_2(home):
    proc = subprocess.run([sys.executable.encode(), b"-m", b"urial_edge.cli", b"ask", b"\xff\xfe bad"],
                          capture_output=True, env={**os.environ, "URIAL_EDGE_HOME": str(home)})
    assert proc.returncode == 2 and b"not valid UTF-8" in proc.stderr and b"Traceback" not in proc.stderr


@pytest.mark.parametrize("where", ["missing-dir", "a-directory"])
def test_batch_output_problems_are_found_before_loading_the_model(home, tmp_path, where):
    infile = tmp_path / "in.jsonl"
    infile.write_text('{"id": 1, "query": "Hi?"}\n')
    out = tmp_path / "nowhere" / "out.jsonl" if where == "missing-dir" else tmp_path
    result = CliRunner().invoke(cli, ["batch", str(infile), "-o", str(out), "--model", "no-such-model"])
    one_line_error(result, 1, "does not exist" if where == "missing-dir" else "is a directory")


def test_chat_keeps_going_after_a_bad_command(home, tiny_llama, prompt_file):
    script = "Hello?\n/save ../x\n/save " + "n" * 255 + "\nStill there?\n/save good\n/exit\n"
    result = CliRunner().invoke(cli, ["chat", "--model", str(tiny_llama), "-p", prompt_file, "--max-tokens", "4"],
                                input=script)
    assert result.exit_code == 0, result.output
    assert result.stderr.count("error: invalid session name") == 2 and "saved to" in result.stderr
    resumed = load(tiny_llama, prompt_file).chat("good")
    assert [q for q, _ in resumed.turns] == ["Hello?", "Still there?"]  # nothing said was lost


def test_api_rejects_non_text_session_names_and_queries(home, tiny_llama, prompt_file):
    bot = load(tiny_llama, prompt_file)
    with pytest.raises(UrialError, match="must be a string"):
        bot.chat(123)
    with pytest.raises(UrialError, match="must be a string"):
        bot.ask(b"bytes")


# == issue 24: state files tied to what they claim, writes that never destroy data, bad values refused at the
# edge, clean exits ==========================================================================================

def invoke(*argv, input=None):
    return CliRunner().invoke(cli, [str(a) for a in argv], input=input)


def tiny_args(model, prompt_file, max_tokens=8):
    return ["--model", str(model), "-p", prompt_file, "--max-tokens", str(max_tokens)]


def forge(path, change):
    """Rewrite a state file's tensors with ``change`` applied to each layer, under a valid checksum and its
    original metadata: damage no checksum can see."""
    from mlx_lm.models import cache as mlx_cache

    from urial_edge.runtime import kv_file

    import mlx.core as mx

    state, meta = kv_file.load(path)
    for c in state:
        change(c)
        c.keys, c.values = mx.contiguous(c.keys), mx.contiguous(c.values)
    meta["checksum"] = kv_file.checksum(state)
    mlx_cache.save_prompt_cache(str(path), state, meta)


def half_head(c):
    c.keys, c.values = c.keys[..., : c.keys.shape[-1] // 2], c.values[..., : c.values.shape[-1] // 2]


def few_positions(c):
    keep = max(1, min(c.offset, c.keys.shape[2]) // 2)
    c.keys, c.values = c.keys[..., :keep, :], c.values[..., :keep, :]


# -- 1. state files -----------------------------------------------------------------------------------------


def test_tokenizer_memo_of_another_text_copied_over_is_never_used(home, tiny_llama, tmp_path, capsys):
    import hashlib

    a, b = tmp_path / "a.toml", tmp_path / "b.toml"
    a.write_text(TINY_PROMPT)
    b.write_text(TINY_PROMPT.replace("briefly and clearly", "in one short sentence"))
    bots = [load(tiny_llama, str(p)) for p in (a, b)]
    digests = [hashlib.sha256(bot.prefix_text.encode()).hexdigest()[:32] for bot in bots]
    memo_a, memo_b = (home / "tokenizers" / f"{bot.tokenizer.key}.{d}.json" for bot, d in zip(bots, digests))
    assert memo_a.exists() and memo_b.exists()
    memo_a.write_bytes(memo_b.read_bytes())  # b's ids, under a's text
    capsys.readouterr()
    assert load(tiny_llama, str(a)).prefix_ids == bots[0].prefix_ids
    assert "rebuilding it" in capsys.readouterr().err


@pytest.mark.parametrize("change", [dict(max_size=8), dict(max_size=64), dict(keep=4)])
def test_prefix_cache_forged_with_another_window_is_rebuilt(home, tiny_gemma, prompt_file, change):
    from mlx_lm.models.cache import RotatingKVCache

    args = [*tiny_args(tiny_gemma, prompt_file, 12), "--json", "--no-server"]
    path = Path(invoke("cache", "build", *args[:4]).stdout.strip())
    forge(path, lambda c: [setattr(c, k, v) for k, v in change.items()] if isinstance(c, RotatingKVCache) else 0)
    cached = invoke("ask", *args, "What is a river?")
    full = invoke("ask", *args, "--no-cache", "What is a river?")
    assert cached.exit_code == 0, cached.output
    assert "rebuilding it" in cached.stderr
    assert json.loads(cached.stdout)["text"] == json.loads(full.stdout)["text"]


@pytest.mark.parametrize("damage", [half_head, few_positions])
@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_gemma"])
def test_prefix_cache_with_tensors_of_the_wrong_shape_fails_verify_and_is_rebuilt(home, prompt_file, request, arch,
                                                                                   damage):
    model = request.getfixturevalue(arch)
    args = [*tiny_args(model, prompt_file, 12), "--json", "--no-server"]
    path = Path(invoke("cache", "build", *args[:4]).stdout.strip())
    forge(path, damage)
    verify = invoke("cache", "verify")
    assert verify.exit_code == 1 and f"BAD  {path.name}" in verify.stdout
    cached = invoke("ask", *args, "What is a river?")
    assert cached.exit_code == 0, cached.output
    assert "rebuilding it" in cached.stderr and "unexpected" not in cached.stderr
    full = invoke("ask", *args, "--no-cache", "What is a river?")
    assert json.loads(cached.stdout)["text"] == json.loads(full.stdout)["text"]
    assert invoke("cache", "verify").exit_code == 0  # the rebuilt file


def test_session_state_of_the_wrong_shape_is_rebuilt_from_its_turns(home, tiny_llama, prompt_file, capsys):
    bot = load(tiny_llama, prompt_file)
    chat = bot.chat("s")
    chat.send("Tell me about rivers.")
    forge(chat.save(), half_head)
    resumes_as_new(bot, "s", capsys, "rebuilding")


def test_session_saved_with_another_model_is_rebuilt_for_this_one(home, tiny_llama, tiny_gemma, prompt_file, capsys):
    first = load(tiny_gemma, prompt_file).chat("s")
    first.send("Tell me about rivers.")
    first.save()
    bot = load(tiny_llama, prompt_file)
    capsys.readouterr()
    resumed = bot.chat("s")
    assert "another model or prompt" in capsys.readouterr().err
    assert resumed.turns == first.turns
    fresh = type(resumed).from_turns(bot, first.turns)
    assert resumed.send("And then?").text == fresh.send("And then?").text


# -- 2. writes never destroy data -----------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same", "dotted", "symlink", "hard link"])
def test_batch_refuses_an_output_that_is_its_input(home, tmp_path, how):
    infile = tmp_path / "q.jsonl"
    infile.write_text('{"id": 1, "query": "Hi?"}\n{"id": 2, "query": "Bye?"}\n')
    before = infile.read_bytes()
    out = {"same": infile, "dotted": tmp_path / "sub" / ".." / "q.jsonl", "symlink": tmp_path / "link.jsonl",
           "hard link": tmp_path / "hard.jsonl"}[how]
    (tmp_path / "sub").mkdir()
    if how == "symlink":
        out.symlink_to(infile)
    elif how == "hard link":
        os.link(infile, out)
    result = invoke("batch", infile, "-o", out, "--model", "no-such-model")
    one_line_error(result, 1, "is the input file")
    assert infile.read_bytes() == before


@pytest.mark.parametrize("content", ["my notes\nthe last line, with no newline", "one line, no newline",
                                     '{"id": 1, "text": "ours"}\nnot ours\n{"id": 2, "te'])
def test_batch_never_touches_an_output_file_that_is_not_ours(home, tmp_path, content):
    infile, notes = tmp_path / "q.jsonl", tmp_path / "notes.txt"
    infile.write_text('{"id": 1, "query": "Hi?"}\n')
    notes.write_text(content)
    result = invoke("batch", infile, "-o", notes, "--model", "no-such-model")
    one_line_error(result, 1, "not a result of ours")
    assert notes.read_text() == content


def test_two_chats_in_one_session_in_one_process_the_second_save_is_refused(home, tiny_llama, prompt_file):
    bot = load(tiny_llama, prompt_file)
    first, second = bot.chat("s"), bot.chat("s")
    first.send("Tell me about rivers.")
    first.save()
    second.send("Tell me about cheese.")
    with pytest.raises(UrialError, match="saved by another chat or process"):
        second.save()
    assert bot.chat("s").turns == first.turns  # nothing of the first was lost
    first.send("And then?")
    first.save()  # the owner goes on saving
    assert len(bot.chat("s").turns) == 2


class Chat:
    """A `urial-edge chat` subprocess driven line by line (its prompt '>>> ' marks each turn's end)."""

    def __init__(self, argv, env):
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env=env)
        self.err = b""
        self.wait_for_prompt(1)

    def wait_for_prompt(self, count):
        import select

        while self.err.count(b">>> ") < count:
            ready, _, _ = select.select([self.proc.stderr], [], [], 120)
            chunk = os.read(self.proc.stderr.fileno(), 65536) if ready else b""
            assert chunk, (self.err.decode(), self.proc.poll())
            self.err += chunk

    def say(self, line):
        self.proc.stdin.write(line.encode() + b"\n")
        self.proc.stdin.flush()
        self.wait_for_prompt(self.err.count(b">>> ") + 1)

    def close(self):
        out, err = self.proc.communicate(b"/exit\n", timeout=120)
        self.err += err
        return self.proc.returncode, self.err.decode()


def test_a_second_process_in_the_same_session_gets_a_clear_error_and_nothing_is_lost(home, tiny_llama, prompt_file):
    env = {**os.environ, "URIAL_EDGE_HOME": str(home)}
    argv = [sys.executable, "-m", "urial_edge.cli", "chat", *tiny_args(tiny_llama, prompt_file), "--session", "trip"]
    first, second = Chat(argv, env), Chat(argv, env)  # both have opened the (new) session
    try:
        first.say("Plan a day in Lisbon.")
        second.say("Plan a day in Porto.")
        first.say("Make it cheaper.")
    finally:
        code_first, err_first = first.close()
        code_second, err_second = second.close()
    assert code_first == 0, err_first
    assert code_second == 1 and "error: session 'trip' was saved by another chat or process" in err_second
    assert "Traceback" not in err_second
    turns = load(tiny_llama, prompt_file).chat("trip").turns
    assert [q for q, _ in turns] == ["Plan a day in Lisbon.", "Make it cheaper."]


def disk_full_runtime_error(*args, **kwargs):
    raise RuntimeError("[write] Unable to write 10078 bytes to file.")  # what mx.save_safetensors raises


def test_a_full_disk_while_saving_the_prefix_cache_is_a_warning_and_the_answer_comes(home, tiny_llama, prompt_file,
                                                                                        monkeypatch):
    from urial_edge.runtime import kv_file

    monkeypatch.setattr(kv_file.mlx_cache, "save_prompt_cache", disk_full_runtime_error)
    result = invoke("ask", *tiny_args(tiny_llama, prompt_file), "--no-server", "Hi?")
    assert result.exit_code == 0 and result.stdout.strip(), result.output
    assert "warning: prefix cache not saved" in result.stderr and "unexpected" not in result.stderr
    assert not [p for p in (home / "cache").iterdir() if p.suffix != ".lock"]


def test_a_full_disk_while_saving_a_session_is_a_one_line_error_and_the_chat_goes_on(home, tiny_llama, prompt_file,
                                                                                       monkeypatch):
    from urial_edge.runtime import kv_file

    bot = load(tiny_llama, prompt_file)
    bot.prefix  # saved before the disk fills up
    monkeypatch.setattr(kv_file.mlx_cache, "save_prompt_cache", disk_full_runtime_error)
    chat = bot.chat("s")
    chat.send("Hi?")
    with pytest.raises(UrialError, match="cannot write"):
        chat.save()
    result = invoke("chat", *tiny_args(tiny_llama, prompt_file), "--session", "t", input="Hi?\nAgain?\n/exit\n")
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 3 and all("cannot write" in e or "not saved" in e for e in errors), result.stderr
    assert "unexpected" not in result.stderr and result.stdout.count("\n") == 2  # both answers were given


def limited(limit: int):
    """A child process whose files may grow to ``limit`` bytes (as on a nearly full disk: EFBIG, not a kill)."""
    import resource

    def apply():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_file_size_limit_gives_warnings_for_caches_and_one_line_errors_for_sessions_and_results(
        home, tiny_llama, prompt_file, tmp_path):
    env = {**os.environ, "URIAL_EDGE_HOME": str(home)}
    args = tiny_args(tiny_llama, prompt_file, 4)
    run = lambda *argv, **kw: subprocess.run(cli_argv(*argv), capture_output=True, text=True, env=env,  # noqa
                                             preexec_fn=limited(60_000), **kw)
    ask = run("ask", *args, "--no-server", "Hi?")
    assert ask.returncode == 0 and ask.stdout.strip() and "warning: prefix cache not saved" in ask.stderr, ask.stderr
    chat = run("chat", *args, "--session", "s", input="Hi?\n/exit\n")
    assert chat.returncode == 1 and chat.stdout.strip() and "Traceback" not in chat.stderr
    assert "error: cannot write" in chat.stderr and chat.stderr.strip().endswith("was not saved (see the error above)")
    infile, out = tmp_path / "q.jsonl", tmp_path / "out.jsonl"
    infile.write_text("".join(json.dumps({"id": i, "query": f"Question {i}?"}) + "\n" for i in range(300)))
    batch = run("batch", infile, "-o", out, *args)
    assert batch.returncode == 1 and "Traceback" not in batch.stderr, batch.stderr
    assert batch.stderr.strip().splitlines()[-1].startswith("error: ") and "too large" in batch.stderr
    lines = out.read_text().splitlines(keepends=True)
    assert lines and all(json.loads(line)["id"] == i for i, line in enumerate(lines[:-1]))


@contextlib.contextmanager
def tmpfs(folder: Path, options: str):
    """A real filesystem of its own at ``folder`` (tmpfs, mounted as root; the test is skipped otherwise)."""
    folder.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)],
                                           capture_output=True).returncode != 0:
        pytest.skip("mounting a tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.fixture
def small_disk(tmp_path):
    """A 1 MB filesystem, soon full."""
    with tmpfs(tmp_path / "small", "size=1m") as mount:
        yield mount


def test_a_really_full_disk(small_disk, tiny_llama, prompt_file, tmp_path):
    home = small_disk / "home"
    env = {**os.environ, "URIAL_EDGE_HOME": str(home)}
    args = tiny_args(tiny_llama, prompt_file, 4)
    run = lambda *argv, **kw: subprocess.run(cli_argv(*argv), capture_output=True, text=True, env=env, **kw)  # noqa
    assert run("prompts", "tokens", prompt_file, "--model", tiny_llama).returncode == 0  # the tokenizer index
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    (small_disk / "filler").write_bytes(b"\0" * max(0, free - 150_000))
    ask = run("ask", *args, "--no-server", "Hi?")
    assert ask.returncode == 0 and ask.stdout.strip() and "warning: prefix cache not saved" in ask.stderr, ask.stderr
    assert "no space left" in ask.stderr
    chat = run("chat", *args, "--session", "s", input="Hi?\n/exit\n")
    assert chat.returncode == 1 and "no space left" in chat.stderr and "Traceback" not in chat.stderr
    infile = tmp_path / "q.jsonl"
    infile.write_text("".join(json.dumps({"id": i, "query": f"Question {i}?"}) + "\n" for i in range(400)))
    batch = run("batch", infile, "-o", small_disk / "out.jsonl", *args)
    assert batch.returncode == 1 and batch.stderr.strip().splitlines()[-1].startswith("error: no space left")


# -- 3. bad values refused at the edge -------------------------------------------------------------------------

HUGE = "9" * 400


@pytest.mark.parametrize("argv", [
    ["ask", "--max-tokens", "inf", "x"], ["ask", "--max-tokens", "1e999", "x"], ["ask", "--max-tokens", "-inf", "x"],
    ["ask", "--max-tokens", "1" + "0" * 400, "x"], ["ask", "--temperature", HUGE, "x"],
    ["ask", "--temperature", HUGE + ".5", "x"], ["ask", "--seed", "12345678901234567890123", "x"],
    ["ask", "--repetition-context", "1e20", "x"], ["ask", "--repetition-context", "100000000000000000000", "x"],
    ["ask", "--top-p", "nan", "x"], ["batch", "-", "-o", "o.jsonl", "--max-tokens", "inf"],
    ["ask", *sum((["--stop", s] for s in "abcdefghi"), []), "x"],
    ["serve", "--state-cache", "lots"], ["cache", "clear", "--older-than", "soon"],
    ["cache", "clear", "--max-size", "lots"], ["models", "import", "x.gguf", "--name", ""],
    ["chat", "--web", "--regex", "[a-z]+"],
])
def test_bad_values_on_the_command_line_exit_2(home, argv):
    result = invoke(*argv[:1], "--model", "no-such-model", *argv[1:]) if argv[0] == "ask" else invoke(*argv)
    assert result.exit_code == 2, result.output
    assert "unexpected" not in result.output and "Traceback" not in result.output
    assert "Error: Invalid value" in result.stderr


@pytest.mark.parametrize("name,value", [
    ("max_tokens", float("inf")), ("max_tokens", float("nan")), ("max_tokens", 10 ** 400), ("max_tokens", 1e20),
    ("temperature", 10 ** 400), ("temperature", float("inf")), ("seed", 2 ** 70), ("seed", 10 ** 22),
    ("repetition_context", 1e20), ("repetition_context", 10 ** 20), ("top_p", 10 ** 400), ("seed", -1),
    ("repetition_penalty", -(10 ** 400)), ("max_tokens", "7"), ("stop", ["x"] * 9),
])
def test_every_face_refuses_bad_numbers_with_one_error(name, value):
    from urial_edge.runtime.options import GenerationOptions, OptionError, check

    with pytest.raises(UrialError, match=name.split("_")[0]):
        check(name, value)
    with pytest.raises(OptionError):
        GenerationOptions.from_json({name: value}, GenerationOptions())
    with pytest.raises(UrialError):
        GenerationOptions(**{name: value})


def test_the_api_refuses_bad_numbers_and_extremes_still_answer(home, tiny_gemma, prompt_file):
    from urial_edge.runtime.options import option_spec

    bot = load(tiny_gemma, prompt_file)
    for options in ({"max_tokens": float("inf")}, {"temperature": 10 ** 400}, {"seed": 2 ** 70},
                    {"repetition_context": 10 ** 20}):
        with pytest.raises(UrialError):
            bot.ask("Hi?", **options)
    top = {name: option_spec(name).high for name in ("seed", "repetition_context")}
    answer = bot.ask("Hi?", temperature=0.7, max_tokens=3, **top)  # the largest allowed values work
    assert answer.finish_reason in ("stop", "length")


SURROGATE = "hi \ud800"


def test_the_api_refuses_text_that_is_not_unicode(home, tiny_llama, prompt_file):
    bot = load(tiny_llama, prompt_file)
    calls = [lambda: bot.ask(SURROGATE), lambda: bot.request(SURROGATE), lambda: bot.complete(SURROGATE),
             lambda: list(bot.batch(["Hi?", SURROGATE])), lambda: bot.chat().send(SURROGATE),
             lambda: bot.ask("Hi?", system=SURROGATE), lambda: bot.ask("Hi?", history=[(SURROGATE, "a")]),
             lambda: bot.ask("Hi?", history=[("q", SURROGATE)])]
    for call in calls:
        with pytest.raises(UrialError, match="not valid Unicode"):
            call()


def test_batch_lines_with_bad_text_or_deep_json_are_their_own_errors(home, tiny_llama, prompt_file, tmp_path):
    infile, out = tmp_path / "q.jsonl", tmp_path / "out.jsonl"
    infile.write_text('{"id": 1, "query": "Hi?"}\n{"id": 2, "query": "hi \\ud800"}\n{"id": "\\udfff", "query": "x"}\n'
                      + "[" * 100_000 + "]" * 100_000 + '\n{"id": 5, "query": "Bye?"}\n')
    result = invoke("batch", infile, "-o", out, *tiny_args(tiny_llama, prompt_file, 4))
    assert result.exit_code == 3, result.output
    for n in (2, 3, 4):
        assert f"q.jsonl:{n}:" in result.stderr
    assert "not valid Unicode" in result.stderr and "deep" in result.stderr and "unexpected" not in result.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [1, 5]


def spy_on_tokenizing(monkeypatch) -> list:
    """The lengths of the texts the lazy tokenizer builds a BPE for (the work a refusal must not do)."""
    from urial_edge.model.tokenizer import LazyBPE

    seen, tokenizer_for = [], LazyBPE.tokenizer_for
    monkeypatch.setattr(LazyBPE, "tokenizer_for",
                        lambda self, text: seen.append(len(text)) or tokenizer_for(self, text))
    return seen


@pytest.mark.parametrize("size", [400_000, 5_000_000])
def test_a_query_far_beyond_the_context_is_refused_before_it_is_tokenized(home, tiny_gemma, prompt_file, size,
                                                                         monkeypatch):
    load(tiny_gemma, prompt_file)  # indexes the tokenizer: later loads are lazy, as in a new process
    bot = load(tiny_gemma, prompt_file)
    assert bot.tokenizer._lazy is not None
    seen = spy_on_tokenizing(monkeypatch)
    query = ("All work and no play makes a dull model. " * (size // 40 + 1))[:size]
    for call in (lambda: bot.request(query), lambda: bot.complete(query), lambda: bot.chat().send(query)):
        with pytest.raises(UrialError, match="the query is at least .* tokens of context are left"):
            call()
    assert not seen or max(seen) < 100_000


@pytest.mark.slow
def test_400_kb_on_the_bundled_model_is_refused_before_it_is_tokenized(bundled, monkeypatch):
    """Gemma's 32k context and 31-character tokens: 400 KB is not too long by its length alone; its
    stretches (cut where no token can span) are counted instead of building a BPE for it (26 s)."""
    from urial_edge.model.tokenizer import Tokenizer, _build_full

    Tokenizer(bundled)
    bot = Assistant.load(str(bundled))
    assert bot.tokenizer._lazy is not None
    seen = spy_on_tokenizing(monkeypatch)
    readme = (Path(TESTS).parent / "README.md").read_text()
    with pytest.raises(UrialError, match="the query is at least .* tokens of context are left"):
        bot.request((readme * 10)[:400_000])
    assert not seen or max(seen) < 100_000
    full = _build_full((bundled / "tokenizer.json").read_bytes(), bundled)  # and a long text that fits is exact
    assert bot.tokenizer.encode(readme) == full.encode(readme, add_special_tokens=False).ids


def run_closed(fds: str, *argv, home):
    """The CLI with standard input or output closed (``<&-``, ``>&-``), as a shell would start it."""
    return subprocess.run(["sh", "-c", f'exec "$0" "$@" {fds}', *cli_argv(*argv)], stderr=subprocess.PIPE,
                          stdout=None if ">&-" in fds else subprocess.PIPE, text=True,
                          env={**os.environ, "URIAL_EDGE_HOME": str(home)})


def test_closed_standard_input_and_output(home, tiny_llama, prompt_file):
    args = tiny_args(tiny_llama, prompt_file, 4)
    answered = run_closed("<&-", "ask", *args, "--no-server", "Hi?", home=home)
    assert answered.returncode == 0 and answered.stdout.strip(), answered.stderr
    no_query = run_closed("<&-", "ask", *args, home=home)
    assert no_query.returncode == 1 and no_query.stderr.strip().splitlines() == [
        "error: no query: standard input is closed; pass the query as an argument"]
    for argv, message in ((["chat", *args, "--no-server"], "no message to answer"),
                          (["batch", "-", "-o", "out.jsonl", *args], "nothing to answer")):
        closed = run_closed("<&-", *argv, home=home)
        assert closed.returncode == 1 and closed.stderr.strip().splitlines() == [
            f"error: standard input is closed: {message}"], closed.stderr
    lost = run_closed(">&-", "ask", *args, "--no-server", "Hi?", home=home)
    assert lost.returncode == 1 and lost.stderr.strip().splitlines()[-1] == \
        "error: standard output is closed: the output has nowhere to go"
    assert "Traceback" not in lost.stderr


# -- 6. the small ones ------------------------------------------------------------------------------------------


def test_cache_build_fails_when_nothing_was_saved(home, tiny_llama, prompt_file):
    home.mkdir(parents=True)
    (home / "cache").write_text("a file where the cache folder should be")
    result = invoke("cache", "build", "--model", tiny_llama, "-p", prompt_file)
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip().splitlines()[-1].startswith("error: the prefix cache was built but not saved")


@pytest.mark.parametrize("name", ["𝒜" * 60, "é" * 51])
def test_session_names_are_measured_in_bytes(home, tiny_llama, prompt_file, name):
    result = invoke("chat", "--session", name, *tiny_args(tiny_llama, prompt_file), input="Hi?\n/exit\n")
    assert result.exit_code == 2 and "session" in result.output, result.output
    with pytest.raises(UrialError, match="bytes"):
        load(tiny_llama, prompt_file).chat(name)
    longest = "é" * 50  # 100 bytes: saved and resumed
    chat = load(tiny_llama, prompt_file).chat(longest)
    chat.send("Hi?")
    assert chat.save().exists() and load(tiny_llama, prompt_file).chat(longest).turns == chat.turns


def test_resuming_a_batch_with_other_options_is_refused(home, tiny_llama, prompt_file, tmp_path):
    infile, out = tmp_path / "q.jsonl", tmp_path / "out.jsonl"
    infile.write_text('{"id": 1, "query": "Hi?"}\n')
    assert invoke("batch", infile, "-o", out, *tiny_args(tiny_llama, prompt_file, 4)).exit_code == 0
    infile.write_text('{"id": 1, "query": "Hi?"}\n{"id": 2, "query": "Bye?"}\n')
    before = out.read_text()
    other = invoke("batch", infile, "-o", out, *tiny_args(tiny_llama, prompt_file, 5))
    one_line_error(other, 1, "made with other options")
    assert out.read_text() == before
    same = invoke("batch", infile, "-o", out, *tiny_args(tiny_llama, prompt_file, 4))
    assert same.exit_code == 0 and "1 answered, 1 already done" in same.stderr


def test_resuming_with_another_constraint_is_refused(home, tiny_llama, prompt_file, tmp_path):
    """A constraint is part of a run's setup: a batch line's own schema, the command line's constraint, or an
    eval question's schema; resuming with another one would mix two setups in one file."""
    infile, out = tmp_path / "q.jsonl", tmp_path / "out.jsonl"
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    infile.write_text(json.dumps({"id": 1, "query": "Hi?", "schema": schema}) + "\n")
    args = tiny_args(tiny_llama, prompt_file, 8)
    assert invoke("batch", infile, "-o", out, *args, "--choice", "yes", "--choice", "no").exit_code == 0
    other_schema = {**schema, "required": []}
    infile.write_text(json.dumps({"id": 1, "query": "Hi?", "schema": other_schema}) + "\n"
                      + json.dumps({"id": 2, "query": "Bye?"}) + "\n")
    before = out.read_text()
    one_line_error(invoke("batch", infile, "-o", out, *args, "--choice", "yes", "--choice", "no"), 1,
                   "made with other options or another constraint")
    infile.write_text(json.dumps({"id": 1, "query": "Hi?", "schema": schema}) + "\n"
                      + json.dumps({"id": 2, "query": "Bye?"}) + "\n")
    assert invoke("batch", infile, "-o", out, *args, "--choice", "yes", "--choice", "no").exit_code == 0
    assert out.read_text().startswith(before) and json.loads(out.read_text().splitlines()[1])["value"] in ("yes", "no")
    for changed in (["--choice", "yes", "--choice", "maybe"], []):  # line 2 under another constraint, or none
        infile.write_text(json.dumps({"id": 2, "query": "Bye?"}) + "\n")
        one_line_error(invoke("batch", infile, "-o", out, *args, *changed), 1, "another constraint")
    questions, answers = tmp_path / "questions.jsonl", tmp_path / "eval"
    questions.write_text(json.dumps({"id": "a", "query": "Yes or no?"}) + "\n")
    run = ["eval", questions, "-o", answers, "-m", tiny_llama, "-p", prompt_file, "--max-tokens", "8"]
    assert invoke(*run, "--choice", "yes", "--choice", "no").exit_code == 0
    one_line_error(invoke(*run, "--regex", "[a-z]+"), 1, "another constraint")
    assert invoke(*run, "--choice", "yes", "--choice", "no").exit_code == 0


def test_implicit_ids_never_take_an_explicit_id(home, tiny_llama, prompt_file, tmp_path):
    infile, out = tmp_path / "q.jsonl", tmp_path / "out.jsonl"
    infile.write_text('{"query": "Hi?"}\n{"id": 1, "query": "Bye?"}\n{"query": "Why?"}\n')
    result = invoke("batch", infile, "-o", out, *tiny_args(tiny_llama, prompt_file, 4))
    assert result.exit_code == 3, result.output
    assert "q.jsonl:1: no 'id', and its line number 1 is the id of line 2" in result.stderr
    assert "q.jsonl:2:" not in result.stderr
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == [1, 3]
    alone = invoke("ask", *tiny_args(tiny_llama, prompt_file, 4), "--json", "--no-server", "Bye?")
    assert json.loads(out.read_text().splitlines()[0])["text"] == json.loads(alone.stdout)["text"]


def test_a_batch_file_may_start_with_a_bom_and_come_from_stdin(home, tiny_llama, prompt_file, tmp_path):
    infile, out = tmp_path / "q.jsonl", tmp_path / "out.jsonl"
    lines = '{"id": 1, "query": "Hi?"}\n{"id": 2, "query": "Bye?"}\n'
    infile.write_bytes(b"\xef\xbb\xbf" + lines.encode())
    bom = invoke("batch", infile, "-o", out, *tiny_args(tiny_llama, prompt_file, 4))
    assert bom.exit_code == 0 and "2 answered" in bom.stderr, bom.output
    piped = invoke("batch", "-", "-o", tmp_path / "piped.jsonl", *tiny_args(tiny_llama, prompt_file, 4), input=lines)
    assert piped.exit_code == 0 and "2 answered" in piped.stderr, piped.output
    assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == \
        [json.loads(x)["text"] for x in (tmp_path / "piped.jsonl").read_text().splitlines()]


@pytest.fixture
def read_only_dir(tmp_path):
    """A directory nobody can write to: a read-only mount when we are root (root ignores permission bits)."""
    if os.geteuid() != 0:
        folder = tmp_path / "ro"
        folder.mkdir(mode=0o555)
        yield folder
        folder.chmod(0o755)
        return
    with tmpfs(tmp_path / "ro", "ro,size=64k") as folder:
        yield folder


def test_doctor_fails_when_home_is_a_file(tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.write_text("not a folder")
    monkeypatch.setenv("URIAL_EDGE_HOME", str(home))
    result = invoke("doctor")
    assert result.exit_code == 1 and "is not a directory" in result.stdout, result.output


def test_doctor_fails_when_home_is_read_only(read_only_dir, monkeypatch):
    monkeypatch.setenv("URIAL_EDGE_HOME", str(read_only_dir))
    result = invoke("doctor")
    assert result.exit_code == 1 and "is not writable" in result.stdout, result.output


def test_models_import_refuses_an_empty_name(home, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    result = invoke("models", "import", gguf, "--name", "")
    assert result.exit_code == 2 and "--name" in result.output and "Traceback" not in result.output


def test_prompts_list_marks_the_default(home):
    from urial_edge.runtime.prompt import DEFAULT_PROMPT

    result = invoke("prompts", "list")
    rows = {line.split()[1] if line.startswith("*") else line.split()[0]: line for line in result.stdout.splitlines()}
    assert rows[DEFAULT_PROMPT].startswith("*") and sum(line.startswith("*") for line in rows.values()) == 1
    assert "default" not in result.stdout.lower().replace(f"* {DEFAULT_PROMPT}", "")


# -- 4. clean exits -------------------------------------------------------------------------------------------

# an answer, then MLX work still queued when the process exits: what the engine leaves behind after its last
# step (it queues the next forward pass before it looks at the tokens), here made long enough to be caught
EXIT_WITH_WORK_QUEUED = r"""
import sys
from urial_edge.model.backend import prepare
prepare()
import mlx.core as mx
from urial_edge.runtime.assistant import Assistant
print(Assistant.load(sys.argv[1], sys.argv[2], max_tokens=4).ask("Hi?").text)
a = mx.random.normal((1500, 1500))
x = a
for _ in range(30):
    x = mx.tanh(x @ a)
mx.async_eval(x)
"""


# an engine thread (as a server runs) that drew sampled tokens, stopped by the exit handler
EXIT_WITH_AN_ENGINE_THREAD = r"""
import sys
from urial_edge.model.backend import prepare
prepare()
from urial_edge.runtime.assistant import Assistant
bot = Assistant.load(sys.argv[1], sys.argv[2], max_tokens=4)
bot.start()
print(bot.ask("Hi?", temperature=0.8).text)
"""

def in_parallel(argvs: list, env: dict, workers: int = 4) -> list:
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(lambda argv: subprocess.run(argv, capture_output=True, text=True, env=env), argvs))


@pytest.mark.slow
def test_a_process_waits_for_queued_mlx_work_before_it_exits(home, tiny_llama, prompt_file):
    """MKL's exit handlers freed its buffers while MLX's thread was still in one of its matrix products
    (gdb: ``mkl_core_fini`` on the main thread, ``cblas_sgemm`` on MLX's): about 1 exit in 10 crashed here."""
    env = {**os.environ, "URIAL_EDGE_HOME": str(home)}
    load(tiny_llama, prompt_file).prefix
    with exit_stress.cpu_hogs(2):  # one per core of a 2-core machine: exits race the work they wait for
        runs = in_parallel([[sys.executable, "-c", EXIT_WITH_WORK_QUEUED, str(tiny_llama), prompt_file]] * 60, env)
    bad = [r for r in runs if exit_stress.crashed(r.returncode, r.stderr)]
    assert not bad, [(r.returncode, r.stderr[-300:]) for r in bad]


@pytest.mark.slow
def test_an_engine_thread_stopped_at_exit_ends_cleanly(home, tiny_llama, prompt_file):
    """A thread that used MLX, left to end by itself, takes the GIL in MLX's clean-up of its thread state:
    when it ends while the interpreter tears down (the exit handler had just stopped it), the process
    aborts ("terminate called without an active exception", exit 134; a server's exit: 2 in 5 runs of
    tests/test_server.py on a busy machine). Engine threads clear their MLX state themselves."""
    env = {**os.environ, "URIAL_EDGE_HOME": str(home)}
    load(tiny_llama, prompt_file).prefix
    with exit_stress.cpu_hogs(2):
        runs = in_parallel([[sys.executable, "-c", EXIT_WITH_AN_ENGINE_THREAD, str(tiny_llama), prompt_file]] * 60,
                           env)
    bad = [r for r in runs if exit_stress.crashed(r.returncode, r.stderr)]
    assert not bad, [(r.returncode, r.stderr[-300:]) for r in bad]


EXIT_RUNS = int(os.environ.get("URIAL_EDGE_EXIT_RUNS", "60"))  # benchmarks/bench_exit_stress.py runs 300+


@pytest.mark.slow
def test_no_crash_at_exit_of_ask_no_cache_and_a_batch_resume_beside_busy_cores(home, tiny_gemma, tiny_llama,
                                                                              prompt_file, tmp_path):
    env = {**os.environ, "URIAL_EDGE_HOME": str(home)}
    runs = exit_stress.stress([str(tiny_gemma), str(tiny_llama)], prompt_file, EXIT_RUNS, tmp_path, env)
    assert len(runs) == EXIT_RUNS and {r.kind for r in runs} == set(exit_stress.KINDS)
    assert not [r for r in runs if r.crashed], [(r.kind, r.returncode, r.tail) for r in runs if r.crashed]


# -- the count ---------------------------------------------------------------------------------------------------

# Every failure issue 24 reported, other than the server's (tests/test_server.py), and the test here that
# reproduced it (it failed on the code of the report) and passes now.
ISSUE_24 = {
    "tokenizer memo of another prompt copied over": "test_tokenizer_memo_of_another_text_copied_over_is_never_used",
    "prefix cache forged with another window size": "test_prefix_cache_forged_with_another_window_is_rebuilt",
    "cache tensors of the wrong shape (ask fails, verify says ok)":
        "test_prefix_cache_with_tensors_of_the_wrong_shape_fails_verify_and_is_rebuilt",
    "session state of the wrong shape": "test_session_state_of_the_wrong_shape_is_rebuilt_from_its_turns",
    "session saved with another model": "test_session_saved_with_another_model_is_rebuilt_for_this_one",
    "batch -o its own input": "test_batch_refuses_an_output_that_is_its_input",
    "batch -o notes.txt loses its last line": "test_batch_never_touches_an_output_file_that_is_not_ours",
    "two chats in one session in one process": "test_two_chats_in_one_session_in_one_process_the_second_save_is_refused",
    "two processes in one session": "test_a_second_process_in_the_same_session_gets_a_clear_error_and_nothing_is_lost",
    "full disk (RuntimeError) saving the prefix cache":
        "test_a_full_disk_while_saving_the_prefix_cache_is_a_warning_and_the_answer_comes",
    "full disk (RuntimeError) saving a session":
        "test_a_full_disk_while_saving_a_session_is_a_one_line_error_and_the_chat_goes_on",
    "ulimit -f": "test_a_file_size_limit_gives_warnings_for_caches_and_one_line_errors_for_sessions_and_results",
    "a full tmpfs": "test_a_really_full_disk",
    "lone surrogate in a batch line": "test_batch_lines_with_bad_text_or_deep_json_are_their_own_errors",
    "lone surrogate through the API": "test_the_api_refuses_text_that_is_not_unicode",
    "5 MB query hangs": "test_a_query_far_beyond_the_context_is_refused_before_it_is_tokenized",
    "400 KB query takes 26 s to be refused": "test_400_kb_on_the_bundled_model_is_refused_before_it_is_tokenized",
    "Infinity, 10**400, 2**70, 1e20 through the API": "test_the_api_refuses_bad_numbers_and_extremes_still_answer",
    "one check of numbers for every face": "test_every_face_refuses_bad_numbers_with_one_error",
    "--max-tokens inf, 1e999, 400 digits, 23-digit seed, --repetition-context, nine --stop, --state-cache lots, "
    "--older-than soon exit 1": "test_bad_values_on_the_command_line_exit_2",
    "closed stdin and stdout": "test_closed_standard_input_and_output",
    "heap corruption at exit: MLX work still queued": "test_a_process_waits_for_queued_mlx_work_before_it_exits",
    "heap corruption at exit: ask, --no-cache, batch resume under load":
        "test_no_crash_at_exit_of_ask_no_cache_and_a_batch_resume_beside_busy_cores",
    "cache build exits 0 when nothing was saved": "test_cache_build_fails_when_nothing_was_saved",
    "session names in characters": "test_session_names_are_measured_in_bytes",
    "batch resumed with other options": "test_resuming_a_batch_with_other_options_is_refused",
    "implicit ids collide with explicit ids": "test_implicit_ids_never_take_an_explicit_id",
    "BOM, batch -": "test_a_batch_file_may_start_with_a_bom_and_come_from_stdin",
    "doctor: home is a file": "test_doctor_fails_when_home_is_a_file",
    "doctor: home is read-only": "test_doctor_fails_when_home_is_read_only",
    "models import --name ''": "test_models_import_refuses_an_empty_name",
    "prompts list calls urial-k3 the default": "test_prompts_list_marks_the_default",
}


def test_every_issue_24_case_has_its_test_here():
    tests = {name for name in globals() if name.startswith("test_")}
    assert len(ISSUE_24) == 32
    assert set(ISSUE_24.values()) <= tests, set(ISSUE_24.values()) - tests
