"""The OpenAI-compatible server, driven by the official openai client against a live process."""

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")

PROMPT = '''name = "tiny"
system = "You are a helpful assistant."
[[examples]]
query = "What is one plus one?"
answer = "One plus one is two."
'''


def start_server(home, model, prompt_file, *extra):
    env = {**os.environ, "URIAL_EDGE_HOME": str(home)}
    cmd = [sys.executable, "-m", "urial_edge.cli", "serve", "--model", str(model), "--prompt", str(prompt_file),
           "--port", "0", *extra]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        line = proc.stderr.readline()
        m = re.search(r"on http://([\d.]+):(\d+)/v1", line or "")
        if m:
            return proc, m.group(1), int(m.group(2))
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stderr.read()}")
    raise RuntimeError("server did not start")


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gemma):
    home = tmp_path_factory.mktemp("server-home")
    prompt = home / "tiny.toml"
    prompt.write_text(PROMPT)
    proc, host, port = start_server(home, tiny_gemma, prompt)
    yield {"proc": proc, "host": host, "port": port, "home": home, "prompt": prompt, "model": tiny_gemma}
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0  # SIGTERM shuts down cleanly


def client(server, key="none"):
    return openai.OpenAI(base_url=f"http://{server['host']}:{server['port']}/v1", api_key=key, max_retries=0)


def raw(server, method, path, body=None, headers=None):
    conn = http.client.HTTPConnection(server["host"], server["port"], timeout=60)
    conn.request(method, path, body, headers or {})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, json.loads(data)


def chat(server, messages, **kw):
    return client(server).chat.completions.create(model="tiny", messages=messages, max_tokens=12, **kw)


def test_plain_and_streamed_chat_agree(server):
    plain = chat(server, [{"role": "user", "content": "Name a river."}])
    text = plain.choices[0].message.content
    assert isinstance(text, str) and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens > 0 and plain.usage.prompt_tokens > plain.usage.completion_tokens
    pieces = [c.choices[0].delta.content or "" for c in chat(server, [{"role": "user", "content": "Name a river."}],
                                                             stream=True)]
    assert "".join(pieces).strip() == text


def test_multi_turn_reuses_the_conversation_state(server):
    from urial_edge.assistant import Assistant

    first = chat(server, [{"role": "user", "content": "Hello!"}])
    history = [{"role": "user", "content": "Hello!"},
               {"role": "assistant", "content": first.choices[0].message.content},
               {"role": "user", "content": "Tell me more."}]
    second = chat(server, history)
    cached = second.usage.prompt_tokens_details.cached_tokens
    os.environ["URIAL_EDGE_HOME"] = str(server["home"])
    bot = Assistant.load(str(server["model"]), str(server["prompt"]), max_tokens=12)
    assert cached > len(bot.prefix_ids)  # started past the prefix: the first turn's state was reused
    expected = bot.ask("Tell me more.", history=[("Hello!", first.choices[0].message.content)])
    assert second.choices[0].message.content == expected.text


def test_system_message_joins_the_prompt(server):
    out = chat(server, [{"role": "system", "content": "Answer in French."}, {"role": "user", "content": "Hi"}])
    assert out.choices[0].message.content is not None


def test_completions_models_and_health(server):
    out = client(server).completions.create(model="tiny", prompt="Once upon a time", max_tokens=5)
    assert isinstance(out.choices[0].text, str) and out.usage.completion_tokens <= 5
    assert [m.id for m in client(server).models.list().data] == [server["model"].name]
    assert raw(server, "GET", "/health")[1]["status"] == "ok"


def test_concurrent_clients(server):
    results, errors = {}, []

    def worker(i):
        try:
            results[i] = chat(server, [{"role": "user", "content": f"Question {i % 2}?"}]).choices[0].message.content
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and len(results) == 4
    assert results[0] == results[2] and results[1] == results[3]


@pytest.mark.parametrize("body,status,match", [
    (b"{not json", 400, "not valid JSON"),
    (b"[1, 2]", 400, "JSON object"),
    (json.dumps({"messages": []}).encode(), 400, "non-empty list"),
    (json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode(), 400, "unknown role"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "max_tokens": 10 ** 6}).encode(), 400, "max_tokens"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}], "temperature": "hot"}).encode(), 400, "temperature"),
    (b"x" * (2 << 20), 413, "larger than"),
])
def test_malformed_requests_get_openai_style_errors(server, body, status, match):
    code, data = raw(server, "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    assert code == status and match in data["error"]["message"] and data["error"]["type"]


def test_client_disconnecting_mid_stream_leaves_the_server_healthy(server):
    messages = [{"role": "user", "content": "Count to ten."}]
    body = json.dumps({"messages": messages, "max_tokens": 200, "stream": True}).encode()
    sock = socket.create_connection((server["host"], server["port"]))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
    sock.recv(200)
    sock.close()
    a = chat(server, messages)
    b = chat(server, messages)
    assert a.choices[0].message.content == b.choices[0].message.content


def test_api_key_is_checked(tmp_path, tiny_llama):
    prompt = tmp_path / "tiny.toml"
    prompt.write_text(PROMPT)
    proc, host, port = start_server(tmp_path / "home", tiny_llama, prompt, "--api-key", "s3cret")
    try:
        info = {"host": host, "port": port}
        with pytest.raises(openai.AuthenticationError):
            client(info, "wrong").models.list()
        status, data = raw(info, "GET", "/v1/models")
        assert status == 401 and "API key" in data["error"]["message"]
        assert client(info, "s3cret").models.list().data
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def test_refuses_public_host_without_key(tmp_path, tiny_llama):
    from click.testing import CliRunner

    from urial_edge.cli import cli

    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_llama), "--host", "0.0.0.0"],
                                env={"URIAL_EDGE_HOME": str(tmp_path)})
    assert result.exit_code == 1 and "refusing to listen on 0.0.0.0 without --api-key" in result.stderr


def test_ask_uses_the_running_server(server):
    env = {**os.environ, "URIAL_EDGE_HOME": str(server["home"])}
    base = [sys.executable, "-m", "urial_edge.cli", "ask", "--model", str(server["model"]),
            "--prompt", str(server["prompt"]), "--max-tokens", "12", "--json", "Name a river."]
    via = json.loads(subprocess.run(base, capture_output=True, text=True, env=env, check=True).stdout)
    local = json.loads(subprocess.run(base + ["--no-daemon"], capture_output=True, text=True, env=env,
                                      check=True).stdout)
    assert via["stats"]["daemon"].endswith(str(server["port"])) and "daemon" not in local["stats"]
    assert via["text"] == local["text"]
    status = subprocess.run([sys.executable, "-m", "urial_edge.cli", "serve", "--status"], capture_output=True,
                            text=True, env=env)
    assert f":{server['port']}" in status.stdout


def test_chat_uses_the_running_server(server):
    env = {**os.environ, "URIAL_EDGE_HOME": str(server["home"])}
    base = [sys.executable, "-m", "urial_edge.cli", "chat", "--model", str(server["model"]),
            "--prompt", str(server["prompt"]), "--max-tokens", "8"]
    script = "Hello!\nTell me more.\n/exit\n"
    via = subprocess.run(base, input=script, capture_output=True, text=True, env=env, check=True)
    local = subprocess.run(base + ["--no-daemon"], input=script, capture_output=True, text=True, env=env, check=True)
    assert "using the server" in via.stderr and "using the server" not in local.stderr
    assert via.stdout == local.stdout
