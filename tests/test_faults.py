"""Fault injection: swapped and damaged files, crashes during a save, PID reuse, stopped servers,
hostile HTTP, bursts and bad input. Each case is one that once went wrong (see issue 14)."""

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
    sessions.save(forged, b.state)
    capsys.readouterr()
    resumed = bot.chat("a")
    assert "does not match its turns; rebuilding" in capsys.readouterr().err
    fresh = bot.chat()
    fresh.send("Tell me about rivers.")
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
    first.save()
    env = {**os.environ, "URIAL_EDGE_HOME": str(home)}
    argv = [sys.executable, "-c", CRASHING_SAVE, str(tiny_gemma), prompt_file]
    done = subprocess.run(argv + ["0"], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    steps = int(done.stdout)
    assert steps == 5  # created, written, fsync(file), rename, fsync(directory)
    seen = []
    for step in range(1, steps + 1):
        first.save()  # back to the one-turn session
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
    from urial_edge.runtime.prompt import load_prompt, render_prefix
    from urial_edge.serve.discovery import server_key

    port = free_port()
    info = {"key": server_key(Path(model), render_prefix(load_prompt(prompt_file))), "host": "127.0.0.1",
            "port": port, "token": "t0ken", "model": str(model), "prompt": "tiny", "kv_bits": None,
            "api_key": False, "pid": pid, "process_start": "someone else's start", **extra}
    folder = home / "servers"
    folder.mkdir(parents=True, exist_ok=True)
    record = folder / f"{info['key']}-{port}.json"
    record.write_text(json.dumps(info))
    return record


def test_a_record_whose_pid_was_reused_is_never_signalled(home, tiny_llama, prompt_file):
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = plant_record(home, tiny_llama, prompt_file, bystander.pid)
        stop = CliRunner().invoke(cli, ["serve", "--stop"])
        assert stop.exit_code == 0 and "no server running" in stop.stderr
        time.sleep(0.2)
        assert bystander.poll() is None  # still alive: it was never sent SIGTERM
        assert not record.exists()  # the stale record is gone
        plant_record(home, tiny_llama, prompt_file, bystander.pid)
        start = time.time()
        ask = CliRunner().invoke(cli, ["ask", "--model", str(tiny_llama), "-p", prompt_file, "--max-tokens", "4",
                                       "--json", "Hi?"])
        assert ask.exit_code == 0, ask.output
        assert "server" not in json.loads(ask.stdout)["stats"] and time.time() - start < 30
    finally:
        bystander.kill()


def test_two_servers_for_one_model_both_recorded_and_a_stopped_one_is_not_waited_for(home, tiny_llama,
                                                                                     prompt_file):
    procs = [start_server(home, tiny_llama, prompt_file)[0] for _ in range(2)]
    try:
        status = CliRunner().invoke(cli, ["serve", "--status"])
        assert len([line for line in status.stdout.splitlines() if line.startswith("pid ")]) == 2
        for p in procs:
            p.send_signal(signal.SIGSTOP)
        start = time.time()
        ask = subprocess.run([sys.executable, "-m", "urial_edge.cli", "ask", "--model", str(tiny_llama), "-p",
                              prompt_file, "--max-tokens", "4", "--json", "Hi?"], capture_output=True, text=True,
                             env={**os.environ, "URIAL_EDGE_HOME": str(home)}, timeout=60)
        assert ask.returncode == 0 and "does not answer; answering here" in ask.stderr
        assert time.time() - start < 20  # two health checks of 2 s, then the answer here
        stop = CliRunner().invoke(cli, ["serve", "--stop"])
        assert "(not answering)" in stop.stdout and stop.stderr.count("stopped pid") == 2
        for p in procs:
            assert p.wait(timeout=30) == 0
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
