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

import openai
import pytest

from conftest import TINY_PROMPT as PROMPT, open_stream, raw, running_server, start_server, wait_until


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_gemma):
    with running_server(tmp_path_factory.mktemp("server-home"), tiny_gemma) as info:
        yield info


def client(server, key="none"):
    return openai.OpenAI(base_url=f"http://{server['host']}:{server['port']}/v1", api_key=key, max_retries=0)


def chat(server, messages, **kw):
    return client(server).chat.completions.create(model=server["model"].name, messages=messages, max_tokens=12,
                                                  **kw)


def test_plain_and_streamed_chat_agree(server):
    plain = chat(server, [{"role": "user", "content": "Name a river."}])
    text = plain.choices[0].message.content
    assert isinstance(text, str) and plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.completion_tokens > 0 and plain.usage.prompt_tokens > plain.usage.completion_tokens
    pieces = [c.choices[0].delta.content or "" for c in chat(server, [{"role": "user", "content": "Name a river."}],
                                                             stream=True)]
    assert "".join(pieces).strip() == text


def test_multi_turn_reuses_the_conversation_state(server):
    from urial_edge.runtime.assistant import Assistant

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
    out = client(server).completions.create(model=server["model"].name, prompt="Once upon a time", max_tokens=5)
    assert isinstance(out.choices[0].text, str) and out.usage.completion_tokens <= 5
    ids = [m.id for m in client(server).models.list().data]
    assert ids[0] == server["model"].name and f"{server['model'].name}:tiny" in ids
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


# -- structured output ---------------------------------------------------------------------------

NUMBERS = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 999},
                                            "unit": {"enum": ["kg", "m"]}},
           "required": ["n", "unit"], "additionalProperties": False}


def test_the_openai_parse_helper_gets_a_pydantic_object(server):
    from typing import List, Literal

    from pydantic import BaseModel, Field

    class Pet(BaseModel):
        name: str = Field(max_length=6)
        age: int = Field(ge=0, le=30)
        kind: Literal["cat", "dog"]
        tags: List[Literal["old", "young"]] = Field(max_length=2)

    completions = client(server).chat.completions
    parse = getattr(completions, "parse", None) or client(server).beta.chat.completions.parse
    done = parse(model=server["model"].name, messages=[{"role": "user", "content": "Describe a pet."}], response_format=Pet,
                 max_tokens=200)
    message = done.choices[0].message
    assert done.choices[0].finish_reason == "stop" and isinstance(message.parsed, Pet)
    assert Pet.model_validate_json(message.content) == message.parsed


def test_response_formats_on_both_endpoints_streamed_or_not(server):
    def ask(**kw):
        return client(server).chat.completions.create(model=server["model"].name,
                                                      messages=[{"role": "user", "content": "How?"}], **kw)

    schema = {"type": "json_schema", "json_schema": {"name": "numbers", "schema": NUMBERS}}
    whole = ask(response_format=schema, max_tokens=100).choices[0]
    value = json.loads(whole.message.content)
    assert whole.finish_reason == "stop" and set(value) == {"n", "unit"} and 0 <= value["n"] <= 999
    pieces = [c.choices[0].delta.content or "" for c in ask(response_format=schema, max_tokens=100, stream=True)]
    assert "".join(pieces) == whole.message.content
    anything = ask(response_format={"type": "json_object"}, max_tokens=300).choices[0]
    assert anything.finish_reason == "length" or isinstance(json.loads(anything.message.content), dict)
    text = client(server).completions.create(model=server["model"].name, prompt="Code:", max_tokens=20,
                                             extra_body={"response_format": {"type": "regex", "regex": "[A-Z]{3}"}})
    assert re.fullmatch("[A-Z]{3}", text.choices[0].text) and text.choices[0].finish_reason == "stop"
    picked = ask(max_tokens=20, response_format={"type": "choice", "choice": ["light", "heavy"]})
    assert picked.choices[0].message.content in ("light", "heavy")


@pytest.mark.parametrize("response_format,match", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}, "Invalid type: strin"),
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "must be an object with a 'schema'"),
    ({"type": "yaml"}, "unknown type 'yaml'"),
    ("json", "must be an object with a 'type'"),
    ({"type": "grammar", "grammar": "start: nothing_here"}, "invalid grammar"),
])
def test_a_bad_response_format_is_a_400_naming_it(server, response_format, match):
    for path, key in (("/v1/chat/completions", "messages"), ("/v1/completions", "prompt")):
        body = {key: [{"role": "user", "content": "x"}] if key == "messages" else "x",
                "response_format": response_format}
        code, data = raw(server, "POST", path, json.dumps(body), {"Content-Type": "application/json"})
        assert code == 400 and data["error"]["param"] == "response_format", data
        assert match in data["error"]["message"] and data["error"]["type"] == "invalid_request_error"


def test_ask_with_a_schema_uses_the_running_server_too(server):
    env = {**os.environ, "URIAL_EDGE_HOME": str(server["home"])}
    argv = [sys.executable, "-m", "urial_edge.cli", "ask", "--model", str(server["model"]), "--prompt",
            str(server["prompt"]), "--json", "--max-tokens", "100", "--schema", json.dumps(NUMBERS), "How heavy?"]
    via = json.loads(subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout)
    local = json.loads(subprocess.run(argv + ["--no-server"], capture_output=True, text=True, env=env,
                                      check=True).stdout)
    assert "server" in via["stats"] and "server" not in local["stats"]
    assert via["text"] == local["text"] and via["value"] == local["value"] == json.loads(local["text"])


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

    from urial_edge.cli.main import cli

    result = CliRunner().invoke(cli, ["serve", "--model", str(tiny_llama), "--host", "0.0.0.0"],
                                env={"URIAL_EDGE_HOME": str(tmp_path)})
    assert result.exit_code == 1 and "refusing to listen on 0.0.0.0 without --api-key" in result.stderr


def test_ask_uses_the_running_server(server):
    env = {**os.environ, "URIAL_EDGE_HOME": str(server["home"])}
    base = [sys.executable, "-m", "urial_edge.cli", "ask", "--model", str(server["model"]),
            "--prompt", str(server["prompt"]), "--max-tokens", "12", "--json", "Name a river."]
    via = json.loads(subprocess.run(base, capture_output=True, text=True, env=env, check=True).stdout)
    local = json.loads(subprocess.run(base + ["--no-server"], capture_output=True, text=True, env=env,
                                      check=True).stdout)
    assert via["stats"]["server"].endswith(str(server["port"])) and "server" not in local["stats"]
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
    local = subprocess.run(base + ["--no-daemon"], input=script, capture_output=True, text=True, env=env,
                           check=True)  # the 0.1 spelling of --no-server
    assert "using the server" in via.stderr and "using the server" not in local.stderr
    assert via.stdout == local.stdout


# -- one declaration of the options reaches every path -------------------------------------------

CLI_VALUES = {"max_tokens": ("7", 7), "temperature": ("0.7", 0.7), "top_p": ("0.9", 0.9),
              "repetition_penalty": ("1.2", 1.2), "repetition_context": ("16", 16), "seed": ("5", 5),
              "stop": ("zz", ["zz"])}


def test_every_cli_option_reaches_the_in_process_and_the_server_path(server):
    from dataclasses import fields

    from urial_edge.runtime.options import GenerationOptions, option_spec

    assert set(CLI_VALUES) == {f.name for f in fields(GenerationOptions)}  # a new option needs a value here
    env = {**os.environ, "URIAL_EDGE_HOME": str(server["home"])}
    argv = [sys.executable, "-m", "urial_edge.cli", "ask", "--model", str(server["model"]), "--prompt",
            str(server["prompt"]), "--json"]
    for name, (text, _) in CLI_VALUES.items():
        argv += [option_spec(name).flags[0], text]
    argv.append("Name a river.")
    via = json.loads(subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout)
    local = json.loads(subprocess.run(argv + ["--no-server"], capture_output=True, text=True, env=env,
                                      check=True).stdout)
    assert "server" in via["stats"] and "server" not in local["stats"]
    expected = {option_spec(n).json_keys[0] if option_spec(n).json_keys else n: v for n, (_, v) in CLI_VALUES.items()}
    assert local["options"] == expected and via["options"] == expected
    assert via["text"] == local["text"] and via["tokens"] == local["tokens"] <= 7


def test_a_preset_reaches_the_server_path_too(server):
    env = {**os.environ, "URIAL_EDGE_HOME": str(server["home"])}
    argv = [sys.executable, "-m", "urial_edge.cli", "ask", "--model", str(server["model"]), "--prompt",
            str(server["prompt"]), "--json", "--preset", "urial-greedy", "--max-tokens", "6", "Hello?"]
    via = json.loads(subprocess.run(argv, capture_output=True, text=True, env=env, check=True).stdout)
    assert via["options"]["repetition_penalty"] == 1.15 and via["options"]["repetition_context"] == 0
    assert via["options"]["max_tokens"] == 6


# -- under load ----------------------------------------------------------------------------------

LONG = "Count to ten."  # on the tiny llama model this greedy answer runs to about 1,900 tokens


@pytest.fixture(scope="module")
def narrow(tmp_path_factory, tiny_llama):
    """A server with one slot and no queue: a second request while one runs gets 429."""
    with running_server(tmp_path_factory.mktemp("narrow-home"), tiny_llama, "--max-batch", "1",
                        "--max-queue", "0") as info:
        yield info


def stream_body(content: str, max_tokens: int = 4096) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, "stream": True}


def wait_for(info, condition, what: str):
    """The server's /health once ``condition(health)`` holds (the deadline only guards against a hang)."""
    def met():
        health = raw(info, "GET", "/health")[1]
        return health if condition(health) else None

    return wait_until(met, timeout=600.0, what=what)


def wait_idle(info):
    return wait_for(info, lambda health: health["active"] == 0 and health["waiting"] == 0, "an idle server")


def test_past_the_queue_a_request_gets_429_with_retry_after(narrow):
    long = open_stream(narrow, stream_body(LONG))
    try:
        conn = http.client.HTTPConnection(narrow["host"], narrow["port"], timeout=60)
        conn.request("POST", "/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": "Hi"}]}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = json.loads(r.read())
        assert r.status == 429 and int(r.getheader("Retry-After")) >= 1
        assert data["error"]["type"] == "rate_limit_error" and "busy" in data["error"]["message"]
    finally:
        long.close()
    wait_idle(narrow)


@pytest.mark.parametrize("streaming", [True, False])
def test_a_client_that_leaves_frees_its_slot(narrow, streaming):
    before = raw(narrow, "GET", "/health")[1]["finished"]["cancelled"]
    if streaming:
        sock = open_stream(narrow, stream_body(LONG))
    else:
        body = json.dumps({"messages": [{"role": "user", "content": LONG}], "max_tokens": 4096}).encode()
        sock = socket.create_connection((narrow["host"], narrow["port"]))
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
        wait_for(narrow, lambda health: health["active"] == 1, "the request's admission")  # being generated
    sock.close()
    health = wait_idle(narrow)
    assert health["finished"]["cancelled"] == before + 1  # cancelled, not run to its ~1,900 tokens
    assert chat(narrow, [{"role": "user", "content": "Hi"}]).choices[0].message.content is not None


@pytest.fixture(scope="module")
def wide(tmp_path_factory, tiny_llama):
    """A server with the default batch of 8 on the tiny llama model (whose LONG answer is long)."""
    with running_server(tmp_path_factory.mktemp("wide-home"), tiny_llama) as info:
        yield info


def test_a_short_request_is_answered_while_a_long_one_runs(wide):
    long = open_stream(wide, stream_body(LONG))
    try:
        short = chat(wide, [{"role": "user", "content": "Hi"}])
        assert short.choices[0].finish_reason in ("stop", "length")
        health = raw(wide, "GET", "/health")[1]
        assert health["active"] == 1  # the long answer still runs: the short one did not wait for its end
    finally:
        long.close()
    wait_idle(wide)
