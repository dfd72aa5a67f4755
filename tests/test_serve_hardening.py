"""Server hardening against real server processes: request deadlines (slowloris), the connection cap,
streams ended by a final event on SIGTERM, case-insensitive Bearer, no secrets in /health behind a key,
IPv6 loopback, and ``ask`` finding a server that serves its model whichever model it was started with."""

import errno
import http.client
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import threading

import pytest

from conftest import (TINY_PROMPT, multi_model_server, open_stream, raw, running_server, start_server, stop_server,
                      wait_until)

DEADLINE = 60.0  # generous: these wait for a condition, they do not time anything


def read_all(sock) -> bytes:
    """Everything the server sends until it closes the connection."""
    sock.settimeout(DEADLINE)
    chunks = iter(lambda: sock.recv(65536), b"")
    return b"".join(chunks)


def status_and_json(response: bytes):
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.fixture(scope="module")
def strict(tmp_path_factory, tiny_gemma, tiny_llama):
    """A server with a 1-second request deadline; the tiny llama is in its store."""
    with multi_model_server(tmp_path_factory.mktemp("strict-home"), tiny_gemma, "--request-timeout", "1",
                            store=[("tinyllama", tiny_llama)]) as info:
        yield info


def trickle(server, first: bytes, byte: bytes) -> bytes:
    """Send ``first``, then one ``byte`` every 0.2 s until the server answers; return its answer."""
    sock = socket.create_connection((server["host"], server["port"]), timeout=DEADLINE)
    sock.sendall(first)
    try:
        for _ in range(int(DEADLINE / 0.2)):
            if select.select([sock], [], [], 0.2)[0]:
                break
            try:
                sock.sendall(byte)
            except (BrokenPipeError, ConnectionResetError):
                break
        return read_all(sock)
    finally:
        sock.close()


def test_a_request_head_sent_byte_by_byte_gets_408(strict):
    status, data = status_and_json(trickle(strict, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: ", b"a"))
    assert status == 408 and "not received within 1 seconds" in data["error"]["message"]


def test_a_body_sent_byte_by_byte_gets_408(strict):
    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n{"
    status, data = status_and_json(trickle(strict, head, b" "))
    assert status == 408 and data["error"]["code"] == "timeout"


def test_an_idle_connection_is_closed(strict):
    sock = socket.create_connection((strict["host"], strict["port"]))
    assert read_all(sock) == b""  # closed by the server, without an answer (no request was started)
    assert raw(strict, "GET", "/health")[0] == 200


def test_ask_uses_a_server_started_with_another_model(strict):
    env = {**os.environ, "URIAL_EDGE_HOME": str(strict["home"])}
    argv = [sys.executable, "-m", "urial_edge.cli", "ask", "--model", "tinyllama", "--prompt", str(strict["prompt"]),
            "--max-tokens", "8", "--json", "Name a river."]
    via = json.loads(subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout)
    local = json.loads(subprocess.run(argv + ["--no-server"], capture_output=True, text=True, env=env,
                                      check=True).stdout)
    assert via["stats"]["server"].endswith(str(strict["port"])) and "server" not in local["stats"]
    assert via["text"] == local["text"]
    models = {m["name"]: m for m in raw(strict, "GET", "/api/ps")[1]["models"]}
    assert models["tinyllama"]["urial"]["prompts"] == ["tiny"]


def test_past_the_connection_cap_a_client_gets_503(tmp_path, tiny_llama):
    (tmp_path / "home").mkdir()
    with running_server(tmp_path / "home", tiny_llama, "--max-connections", "3") as server:
        held = [socket.create_connection((server["host"], server["port"])) for _ in range(3)]
        try:
            wait_until(lambda: raw_health_refused(server))
        finally:
            for s in held:
                s.close()
        wait_until(lambda: raw(server, "GET", "/health")[0] == 200)


def raw_health_refused(server) -> bool:
    sock = socket.create_connection((server["host"], server["port"]), timeout=DEADLINE)
    try:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        status, data = status_and_json(read_all(sock))
    finally:
        sock.close()
    assert status == 503 and "too many open connections" in data["error"]["message"]
    return True


def test_ipv6_loopback_with_a_key_lower_case_bearer_and_no_secrets_in_health(tmp_path, tiny_llama):
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError:
        pytest.skip("no IPv6 loopback here")
    prompt = tmp_path / "tiny.toml"
    prompt.write_text(TINY_PROMPT)
    proc, host, port = start_server(tmp_path / "home", tiny_llama, prompt, "--host", "::1", "--api-key", "s3cret")
    try:
        assert host == "::1"
        server = {"host": host, "port": port}
        status, health = raw(server, "GET", "/health")
        assert status == 200 and health == {"status": "ok"}  # no pid, token or load without the key
        status, full = raw(server, "GET", "/health", headers={"Authorization": "bearer s3cret"})
        assert status == 200 and "pid" in full and "token" not in full
        status, _ = raw(server, "GET", "/v1/models", headers={"Authorization": "BEARER  s3cret "})
        assert status == 200
        assert raw(server, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        env = {**os.environ, "URIAL_EDGE_HOME": str(tmp_path / "home")}
        listed = subprocess.run([sys.executable, "-m", "urial_edge.cli", "serve", "--status"], capture_output=True,
                                text=True, env=env)
        assert f"http://[::1]:{port}" in listed.stdout and "not answering" not in listed.stdout
    finally:
        assert "Traceback" not in stop_server(proc)


LONG = "Count to ten."  # on the tiny llama model this greedy answer runs to about 1,900 tokens


def open_writer(fifo) -> int:
    """The FIFO's write end once a reader has it open (else 0: not yet)."""
    try:
        return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ENXIO:
            return 0
        raise


def test_sigterm_while_a_model_loads_on_demand_waits_for_the_load_and_answers_503(tmp_path, tiny_llama, tiny_gemma):
    """A load runs MLX work on a thread of its own: the process must not exit under it, and the request that
    asked for it gets an answer. The model's tokenizer.json is a FIFO, so its load holds until the test has
    seen the server start stopping."""
    home = tmp_path / "home"
    slow = home / "models" / "slow"
    shutil.copytree(tiny_gemma, slow)
    tokenizer = slow / "tokenizer.json"
    content = tokenizer.read_bytes()
    tokenizer.unlink()
    os.mkfifo(tokenizer)
    prompt = tmp_path / "tiny.toml"
    prompt.write_text(TINY_PROMPT)
    proc, host, port = start_server(home, tiny_llama, prompt)
    reply = {}

    def ask():
        conn = http.client.HTTPConnection(host, port, timeout=DEADLINE)
        conn.request("POST", "/v1/chat/completions", json.dumps({"model": "slow", "max_tokens": 4,
                                                                 "messages": [{"role": "user", "content": "Hi"}]}))
        response = conn.getresponse()
        reply.update(status=response.status, body=json.loads(response.read()))

    thread = threading.Thread(target=ask)
    thread.start()
    writer = wait_until(lambda: open_writer(tokenizer), what="the load to read the tokenizer")
    proc.send_signal(signal.SIGTERM)
    assert next(line for line in proc.stderr if line.startswith("stopping")) == "stopping (requests in flight: 1)\n"
    spare = tmp_path / "tokenizer.json"
    spare.write_bytes(content)
    os.replace(spare, tokenizer)  # later reads get the file itself
    os.set_blocking(writer, True)
    with os.fdopen(writer, "wb") as fifo:
        fifo.write(content)
    thread.join(DEADLINE)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0 and "Traceback" not in err, err
    assert reply["status"] == 503 and "shutting down" in reply["body"]["error"]["message"], reply

def test_sigterm_ends_every_answer_with_a_final_event(tmp_path, tiny_llama):
    prompt = tmp_path / "tiny.toml"
    prompt.write_text(TINY_PROMPT)
    proc, host, port = start_server(tmp_path / "home", tiny_llama, prompt)
    server = {"host": host, "port": port}
    messages = [{"role": "user", "content": LONG}]
    sse = open_stream(server, {"messages": messages, "max_tokens": 4096, "stream": True}, timeout=DEADLINE)
    ndjson = open_stream(server, {"messages": messages, "options": {"num_predict": 4096}}, "/api/chat", b"{",
                         DEADLINE)
    plain = {}

    def whole():
        conn = http.client.HTTPConnection(host, port, timeout=DEADLINE)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": messages, "max_tokens": 4096}))
        response = conn.getresponse()
        plain.update(status=response.status, body=json.loads(response.read()))

    thread = threading.Thread(target=whole)
    thread.start()
    wait_until(lambda: raw(server, "GET", "/health")[1]["active"] == 3)
    proc.send_signal(signal.SIGTERM)
    events = read_all(sse).decode()
    lines = read_all(ndjson).decode().strip().splitlines()
    thread.join(DEADLINE)
    _, err = proc.communicate(timeout=DEADLINE)
    assert proc.returncode == 0 and "Traceback" not in err
    assert events.rstrip().endswith("data: [DONE]")
    last = json.loads(events.rstrip().splitlines()[-3][len("data: "):])
    assert "shutting down" in last["error"]["message"]
    assert "shutting down" in json.loads(lines[-1])["error"]
    assert plain["status"] == 503 and "shutting down" in plain["body"]["error"]["message"]
