"""OpenAI fidelity, through the official ``openai`` client against a real server process on tiny models:
models and prompts by name (loaded on demand), content parts, ``n``, ``stream_options.include_usage``,
cached tokens, the streaming helpers, and an HTTP answer (never a dropped connection) for hostile bodies."""

import json

import openai
import pytest

from conftest import openai_client as client, raw



@pytest.fixture
def server(two_models):
    return two_models


def ask(server, content, model=None, **kw):
    return client(server).chat.completions.create(model=model or server["name"], max_tokens=10,
                                                  messages=[{"role": "user", "content": content}], **kw)


def text(completion):
    return completion.choices[0].message.content


def loaded(server):
    return {m["name"]: m for m in raw(server, "GET", "/api/ps")[1]["models"]}


# -- models and prompts by name ---------------------------------------------------------------------


def test_models_lists_every_model_with_its_prompts(server):
    data = client(server).models.list().data
    ids = [m.id for m in data]
    assert ids[0] == server["name"] and "tinyllama" in ids and "tinyllama:urial-k3" in ids
    first = data[0].model_dump()
    assert first["owned_by"] == "urial-edge"
    assert first["urial"] == {"model": server["name"], "prompt": None, "prompts": first["urial"]["prompts"],
                              "default_prompt": "tiny", "loaded": True}
    assert {"urial-k0", "urial-k1", "urial-k3", "urial-k4-direct", "urial-k8", "tiny"} <= set(first["urial"]["prompts"])
    entry = client(server).models.retrieve("tinyllama:urial-k1").model_dump()
    assert entry["urial"]["model"] == "tinyllama" and entry["urial"]["prompt"] == "urial-k1"
    with pytest.raises(openai.NotFoundError):
        client(server).models.retrieve("no-such-model")


def test_a_model_and_a_prompt_load_on_demand_and_the_loaded_keep_serving(server):
    before = text(ask(server, "Name a river."))
    out = ask(server, "Name a river.", model="tinyllama:urial-k0")
    assert out.model == "tinyllama:urial-k0" and out.choices[0].finish_reason in ("stop", "length")
    assert "urial-k0" in loaded(server)["tinyllama"]["urial"]["prompts"]
    listed = {m.id: m.model_dump()["urial"]["loaded"] for m in client(server).models.list().data}
    assert listed["tinyllama:urial-k0"] and not listed["tinyllama:urial-k8"]
    with pytest.raises(openai.BadRequestError, match="longer than the model's context"):
        ask(server, "Hi", model="tinyllama:urial-k8")  # this prompt cannot fit the tiny model
    assert text(ask(server, "Name a river.")) == before


def test_names_that_cannot_be_served_get_404_with_a_reason(server):
    with pytest.raises(openai.NotFoundError, match="not found"):
        ask(server, "Hi", model="no-such-model")
    with pytest.raises(openai.NotFoundError, match=r"not downloaded; run `urial-edge models pull mistral-7b`"):
        ask(server, "Hi", model="mistral-7b")  # a registry model that is not in the Hugging Face cache
    with pytest.raises(openai.NotFoundError, match="unknown prompt 'no-such-prompt'"):
        ask(server, "Hi", model=f"{server['name']}:no-such-prompt")
    assert text(ask(server, "Hi")) is not None


def test_two_prompts_of_one_model_share_it_and_decode_together(server):
    name = server["name"]
    ask(server, "Warm up.", model=f"{name}:urial-k0")
    models = loaded(server)
    assert set(models[name]["urial"]["prompts"]) >= {"tiny", "urial-k0"} and list(models).count(name) == 1


# -- message content and usage --------------------------------------------------------------------


def test_content_as_text_parts_is_the_same_message(server):
    plain = text(ask(server, "Name a river.\nAnd a lake."))
    parts = text(ask(server, [{"type": "text", "text": "Name a river."}, {"type": "text", "text": "And a lake."}]))
    assert parts == plain


def test_non_text_parts_are_refused_with_a_clear_400(server):
    image = [{"type": "text", "text": "What is this?"},
             {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError, match=r"content\[1\]: only text parts are supported"):
        ask(server, image)


def test_cached_tokens_count_the_prefix_and_the_conversation(server):
    first = ask(server, "Hello!")
    cached = first.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < first.usage.prompt_tokens
    follow = client(server).chat.completions.create(model=server["name"], max_tokens=10, messages=[
        {"role": "user", "content": "Hello!"}, {"role": "assistant", "content": text(first)},
        {"role": "user", "content": "More."}])
    assert follow.usage.prompt_tokens_details.cached_tokens > cached


def test_include_usage_ends_the_stream_with_a_usage_chunk(server):
    chunks = list(client(server).chat.completions.create(
        model=server["name"], max_tokens=10, messages=[{"role": "user", "content": "Name a river."}], stream=True,
        stream_options={"include_usage": True}))
    *body, last = chunks
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.usage.prompt_tokens_details.cached_tokens > 0
    assert all(c.usage is None for c in body) and body[-1].choices[0].finish_reason in ("stop", "length")
    assert "ttft" in last.model_dump()["stats"]
    streamed = "".join(c.choices[0].delta.content or "" for c in body)
    assert streamed.strip() == text(ask(server, "Name a river."))


def test_the_streaming_helper_assembles_the_same_answer(server):
    messages = [{"role": "user", "content": "Name a river."}]
    with client(server).chat.completions.stream(model=server["name"], max_tokens=10, messages=messages,
                                                stream_options={"include_usage": True}) as stream:
        deltas = [e.delta for e in stream if e.type == "content.delta"]
        final = stream.current_completion_snapshot  # (get_final_completion refuses answers cut at max_tokens)
    assert final.choices[0].message.role == "assistant"
    assert final.choices[0].message.content.strip() == text(ask(server, "Name a river.")) == "".join(deltas).strip()
    assert final.usage.completion_tokens > 0


# -- n answers decoded together ---------------------------------------------------------------------


def test_n_answers_with_a_seed_are_the_single_answers_of_seed_plus_i(server):
    many = ask(server, "Name a river.", n=3, temperature=1.0, seed=7)
    assert [c.index for c in many.choices] == [0, 1, 2]
    singles = [text(ask(server, "Name a river.", temperature=1.0, seed=7 + i)) for i in range(3)]
    assert [c.message.content for c in many.choices] == singles
    stats = [c.model_dump()["stats"] for c in many.choices]
    assert many.usage.completion_tokens == sum(s["generation_tokens"] for s in stats)
    assert max(s["batch_size"] for s in stats) >= 2  # decoded together


def test_n_answers_stream_with_their_indices(server):
    stream = client(server).completions.create(model=server["name"], prompt="Once upon a time", max_tokens=6,
                                                n=2, stream=True, temperature=1.0, seed=3)
    texts, finished = {0: "", 1: ""}, set()
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.text
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1}
    plain = client(server).completions.create(model=server["name"], prompt="Once upon a time", max_tokens=6,
                                               temperature=1.0, seed=4)
    assert texts[1].strip() == plain.choices[0].text


def test_n_beyond_the_batch_is_refused(server):
    with pytest.raises(openai.BadRequestError, match="'n' must be an integer between 1 and 8"):
        ask(server, "Hi", n=9)


# -- every hostile body gets an HTTP answer -------------------------------------------------------

MESSAGE = '"messages": [{"role": "user", "content": "Hi"}]'
HOSTILE = {
    "arrays nested 100k deep": ("/v1/chat/completions", '{"x": ' + "[" * 100000 + "]" * 100000 + "}", None),
    "objects nested 50k deep": ("/v1/chat/completions", '{"x": ' + '{"a": ' * 50000 + "1" + "}" * 50000 + "}", None),
    "max_tokens Infinity": ("/v1/chat/completions", "{" + MESSAGE + ', "max_tokens": Infinity}', "max_tokens"),
    "temperature 10**400": ("/v1/chat/completions", "{" + MESSAGE + f', "temperature": {10 ** 400}}}', "temperature"),
    "seed 2**70": ("/v1/chat/completions", "{" + MESSAGE + f', "seed": {2 ** 70}, "temperature": 0.5}}', "seed"),
    "lone surrogate in a message": ("/v1/chat/completions",
                                    '{"messages": [{"role": "user", "content": "hi \\ud800"}]}', "messages"),
    "lone surrogate in a prompt": ("/v1/completions", '{"prompt": "hi \\ud800"}', "prompt"),
    "repetition_context 1e20": ("/v1/chat/completions", "{" + MESSAGE + ', "repetition_context": 1e20}',
                                "repetition_context"),
    "a model that is not a string": ("/v1/chat/completions", "{" + MESSAGE + ', "model": ["x"]}', "model"),
    "a keep_alive that is not a duration": ("/v1/chat/completions", "{" + MESSAGE + ', "keep_alive": "soon"}', None),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_bodies_get_a_400_and_the_server_goes_on(server, case):
    path, body, key = HOSTILE[case]
    status, data = raw(server, "POST", path, body.encode(), {"Content-Type": "application/json"})
    assert status == 400 and data["error"]["type"] == "invalid_request_error", data
    if key is not None:
        assert data["error"]["param"] == key, data
    assert text(ask(server, "Hi")) is not None


def test_an_ollama_path_answers_errors_in_ollama_shape(server):
    status, data = raw(server, "POST", "/api/chat", b"{nope", {"Content-Type": "application/json"})
    assert status == 400 and isinstance(data["error"], str)
    status, data = raw(server, "POST", "/api/chat", json.dumps({"model": "missing", "messages": [
        {"role": "user", "content": "Hi"}]}).encode(), {"Content-Type": "application/json"})
    assert status == 404 and "not found" in data["error"]


# -- log-probabilities --------------------------------------------------------------------------


def test_chat_logprobs_are_the_engines_and_leave_the_answer_as_it_is(server):
    import os

    from urial_edge.runtime.assistant import Assistant

    out = ask(server, "Name a river.", logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens and text(out) == text(ask(server, "Name a river."))
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == entry.logprob  # greedy: the likeliest token was taken
        assert [t.logprob for t in entry.top_logprobs] == sorted((t.logprob for t in entry.top_logprobs), reverse=True)
        assert entry.bytes == list(entry.token.encode())
    os.environ["URIAL_EDGE_HOME"] = str(server["home"])
    bot = Assistant.load(str(server["model"]), str(server["prompt"]), max_tokens=10)
    local = bot.ask("Name a river.", logprobs=3).logprobs
    assert [e.token for e in content] == [bot.tokenizer.decode([t.token]) for t in local]
    assert [e.logprob for e in content] == pytest.approx([t.logprob for t in local], abs=1e-4)


def test_streamed_logprobs_come_with_their_chunks(server):
    whole = ask(server, "Name a river.", logprobs=True, top_logprobs=1).choices[0].logprobs.content
    chunks = list(client(server).chat.completions.create(
        model=server["name"], max_tokens=10, messages=[{"role": "user", "content": "Name a river."}], stream=True,
        logprobs=True, top_logprobs=1))
    streamed = [e for c in chunks for e in (c.choices[0].logprobs.content if c.choices[0].logprobs else [])]
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]


def test_completion_logprobs_in_the_legacy_shape(server):
    done = client(server).completions.create(model=server["name"], prompt="Once upon a time", max_tokens=5, logprobs=2)
    out, n = done.choices[0].logprobs, done.usage.completion_tokens
    assert len(out.tokens) == len(out.token_logprobs) == len(out.top_logprobs) == n
    assert all(1 <= len(top) <= 2 and lp <= 0 for top, lp in zip(out.top_logprobs, out.token_logprobs))
    assert out.text_offset == [sum(len(t) for t in out.tokens[:i]) for i in range(n)]


def test_bad_logprobs_requests_are_refused(server):
    with pytest.raises(openai.BadRequestError, match="top_logprobs must be an integer from 0 to 20"):
        ask(server, "Hi", logprobs=True, top_logprobs=21)
    with pytest.raises(openai.BadRequestError, match="needs 'logprobs': true"):
        ask(server, "Hi", top_logprobs=2)
