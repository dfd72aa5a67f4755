"""The Ollama API through the official ``ollama`` Python client, against a real server process on tiny models."""

import time

import ollama
import pytest

from conftest import openai_client, raw, wait_until



@pytest.fixture
def server(two_models):
    return two_models


def client(server):
    return ollama.Client(host=f"http://{server['host']}:{server['port']}")


def openai_text(server, model, messages, **kw):
    return openai_client(server).chat.completions.create(model=model, messages=messages,
                                                         **kw).choices[0].message.content


MESSAGES = [{"role": "user", "content": "Name a river."}]


def test_chat_whole_and_streamed_is_the_openai_answer(server):
    whole = client(server).chat(model=server["name"], messages=MESSAGES, options={"num_predict": 10})
    assert whole.done and whole.done_reason in ("stop", "length") and whole.message.role == "assistant"
    assert whole.message.content == openai_text(server, server["name"], MESSAGES, max_tokens=10)
    parts = list(client(server).chat(model=server["name"], messages=MESSAGES, options={"num_predict": 10},
                                     stream=True))
    assert all(not p.done for p in parts[:-1]) and parts[-1].done
    assert "".join(p.message.content for p in parts).strip() == whole.message.content


def test_the_final_message_has_ollamas_counts_and_timings(server):
    out = client(server).chat(model=server["name"], messages=MESSAGES, options={"num_predict": 6})
    assert 0 < out.eval_count <= 6 and out.prompt_eval_count > 0
    for field in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(getattr(out, field), int) and getattr(out, field) >= 0
    assert out.total_duration >= out.eval_duration
    assert out.created_at.endswith("Z") and out.model == server["name"]


def test_options_map_and_unknown_ones_are_ignored(server):
    options = {"num_predict": 8, "temperature": 0.9, "top_p": 0.9, "seed": 11, "repeat_penalty": 1.2,
               "repeat_last_n": 16, "stop": ["zz"], "num_ctx": 4096, "top_k": 40, "mirostat": 0}
    a = client(server).chat(model=server["name"], messages=MESSAGES, options=options)
    b = openai_text(server, server["name"], MESSAGES, max_tokens=8, temperature=0.9, top_p=0.9, seed=11,
                    extra_body={"repetition_penalty": 1.2, "repetition_context": 16}, stop=["zz"])
    assert a.message.content == b and a.eval_count <= 8
    no_penalty = client(server).chat(model=server["name"], messages=MESSAGES,
                                     options={"num_predict": 8, "repeat_last_n": 0})
    assert no_penalty.message.content == openai_text(server, server["name"], MESSAGES, max_tokens=8,
                                                     extra_body={"repetition_penalty": 1.0})


def test_a_bad_option_names_ollamas_key(server):
    with pytest.raises(ollama.ResponseError) as e:
        client(server).chat(model=server["name"], messages=MESSAGES, options={"num_predict": -5})
    assert e.value.status_code == 400 and "options.num_predict" in e.value.error


def test_generate_framed_and_raw(server):
    framed = client(server).generate(model=server["name"], prompt="Name a river.", options={"num_predict": 10})
    assert framed.done and framed.response == openai_text(server, server["name"], MESSAGES, max_tokens=10)
    raw_out = client(server).generate(model=server["name"], prompt="Once upon a time", raw=True,
                                      options={"num_predict": 6})
    assert raw_out.response == openai_client(server).completions.create(model=server["name"], prompt="Once upon a time",
                                                    max_tokens=6).choices[0].text.strip()
    streamed = "".join(p.response for p in client(server).generate(model=server["name"], prompt="Name a river.",
                                                                   options={"num_predict": 10}, stream=True))
    assert streamed.strip() == framed.response


def test_tags_ps_show_and_version(server):
    names = [m.model for m in client(server).list().models]
    assert names[0] == server["name"] and f"{server['name']}:tiny" in names and "tinyllama:urial-k0" in names
    first = client(server).list().models[0]
    assert first.size > 0 and first.digest and first.details.family == "gemma3_text"
    running = client(server).ps().models
    assert running[0].model == server["name"] and running[0].size > 0 and running[0].expires_at.year > 2100
    shown = client(server).show(f"{server['name']}:urial-k0")
    assert shown.template.startswith("# Instruction") and "{{ .Prompt }}" in shown.template
    assert shown.details.family == "gemma3_text" and shown.capabilities == ["completion"]
    assert client(server).show(server["name"]).modelinfo["general.architecture"] == "gemma3_text"
    assert raw(server, "GET", "/api/version")[1]["version"]


def test_keep_alive_zero_unloads_after_the_answer_and_load_only_requests(server):
    loaded = lambda: {m.model for m in client(server).ps().models}  # noqa: E731
    out = client(server).generate(model="tinyllama", prompt="")  # Ollama's way to load a model
    assert out.done_reason == "load" and "tinyllama" in loaded()
    client(server).chat(model="tinyllama", messages=MESSAGES, options={"num_predict": 4}, keep_alive=0)
    wait_until(lambda: "tinyllama" not in loaded())
    client(server).generate(model="tinyllama", prompt="", keep_alive="1h")
    assert next(m for m in client(server).ps().models if m.model == "tinyllama").expires_at.year == \
        time.gmtime(time.time() + 3600).tm_year
    assert client(server).generate(model="tinyllama", prompt="", keep_alive=0).done_reason == "unload"
    wait_until(lambda: "tinyllama" not in loaded())
    assert server["name"] in loaded()


def test_errors_are_ollama_shaped(server):
    with pytest.raises(ollama.ResponseError) as e:
        client(server).chat(model="no-such-model", messages=MESSAGES)
    assert e.value.status_code == 404 and "not found" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client(server).chat(model=server["name"], messages=[{"role": "user", "content": "What is this?",
                                                             "images": ["AAAA"]}])
    assert e.value.status_code == 400 and "images" in e.value.error
    with pytest.raises(ollama.ResponseError) as e:
        client(server).chat(model=server["name"], messages=MESSAGES, keep_alive="soon")
    assert e.value.status_code == 400 and "keep_alive" in e.value.error


def test_logprobs_as_ollama_gives_them(server):
    out = client(server).chat(model=server["name"], messages=MESSAGES, options={"num_predict": 6}, logprobs=True,
                              top_logprobs=2)
    assert len(out.logprobs) == out.eval_count and all(len(t.top_logprobs) == 2 for t in out.logprobs)
    assert all(t.top_logprobs[0].logprob == t.logprob for t in out.logprobs)  # greedy
    parts = list(client(server).chat(model=server["name"], messages=MESSAGES, options={"num_predict": 6},
                                     logprobs=True, stream=True))
    assert [t.logprob for p in parts for t in (p.logprobs or [])] == [t.logprob for t in out.logprobs]


SMALL = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                          "unit": {"enum": ["cm", "kg"]}},
         "required": ["n", "unit"], "additionalProperties": False}


def test_format_constrains_chat_and_generate_to_the_schema(server):
    import json

    from jsonschema import validate

    out = client(server).chat(model=server["name"], messages=MESSAGES, format=SMALL, options={"num_predict": 60})
    assert out.done_reason == "stop"
    validate(json.loads(out.message.content), SMALL)
    parts = list(client(server).chat(model=server["name"], messages=MESSAGES, format=SMALL, stream=True,
                                     options={"num_predict": 60}))
    assert "".join(p.message.content for p in parts) == out.message.content
    generated = client(server).generate(model=server["name"], prompt="Size?", format=SMALL, options={"num_predict": 60})
    validate(json.loads(generated.response), SMALL)
    anything = client(server).generate(model=server["name"], prompt="Data?", format="json",
                                       options={"num_predict": 200})
    assert anything.done_reason == "length" or isinstance(json.loads(anything.response), dict)


def test_a_bad_format_is_a_400_naming_it(server):
    import json

    with pytest.raises(ollama.ResponseError) as e:
        client(server).chat(model=server["name"], messages=MESSAGES, format={"type": "strin"})
    assert e.value.status_code == 400 and "'format'" in e.value.error and "Invalid type: strin" in e.value.error
    body = json.dumps({"model": server["name"], "messages": MESSAGES, "format": "yaml"})  # the client refuses it
    code, data = raw(server, "POST", "/api/chat", body, {"Content-Type": "application/json"})
    assert code == 400 and data == {"error": "'format' must be \"json\" or a JSON schema object"}
