"""The Python API on tiny random-weight models: ask, stream, chat sessions, batch."""

import pytest

from conftest import make_tiny_model
from urial_edge.runtime.assistant import Assistant
from urial_edge.errors import UrialError


MESSAGES = ["Hello there, who are you?", "Tell me about rivers.", "And mountains?"]


def load(path, prompt_file, **options):
    options.setdefault("max_tokens", 12)
    return Assistant.load(str(path), prompt_file, **options)


def test_ask_cached_equals_no_cache(home, tiny_gemma, prompt_file):
    bot = load(tiny_gemma, prompt_file)
    cached = bot.ask("What is a river?")
    full = bot.ask("What is a river?", no_cache=True)
    assert cached.text == full.text and cached.tokens == full.tokens
    assert cached.finish_reason in ("stop", "length")
    assert cached.stats.prefill_tokens < full.stats.prefill_tokens
    assert cached.stats.ttft > 0 and cached.stats.generation_tokens == cached.tokens


def test_stream_pieces_join_to_the_answer(home, tiny_llama, prompt_file):
    bot = load(tiny_llama, prompt_file)
    stream = bot.stream("Name a colour.")
    pieces = list(stream)
    assert "".join(pieces).strip() == stream.answer.text == bot.ask("Name a colour.").text


def test_second_process_hits_the_disk_cache(home, tiny_llama, prompt_file):
    first = load(tiny_llama, prompt_file).ask("Hi?")
    second = load(tiny_llama, prompt_file).ask("Hi?")
    assert not first.stats.cache_hit and second.stats.cache_hit
    assert first.text == second.text


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_chat_equals_fresh_full_render(home, tmp_path, prompt_file, arch):
    path = make_tiny_model(tmp_path / arch, arch)
    bot = load(path, prompt_file, max_tokens=10)
    chat = bot.chat()
    history = []
    for message in MESSAGES:
        got = chat.send(message)
        expected = bot.ask(message, history=history, no_cache=True)
        assert got.text == expected.text
        history.append((message, got.text))
    assert chat.turns == history


def test_chat_session_saves_and_resumes(home, tiny_gemma, prompt_file):
    bot = load(tiny_gemma, prompt_file)
    chat = bot.chat("demo")
    chat.send(MESSAGES[0])
    path = chat.save()
    assert path == home / "sessions" / "demo.safetensors" and path.exists()
    resumed = load(tiny_gemma, prompt_file).chat("demo")
    assert resumed.turns == chat.turns and resumed.ids == chat.ids
    assert resumed.send(MESSAGES[1]).text == chat.send(MESSAGES[1]).text


def test_damaged_session_kv_is_rebuilt(home, tiny_llama, prompt_file, capsys):
    bot = load(tiny_llama, prompt_file)
    chat = bot.chat("s1")
    chat.send(MESSAGES[0])
    path = chat.save()
    data = bytearray(path.read_bytes())
    data[-50] ^= 0xFF  # damage the tensor data; the record in the header survives
    path.write_bytes(bytes(data))
    resumed = bot.chat("s1")
    assert "rebuilding" in capsys.readouterr().err
    assert resumed.send(MESSAGES[1]).text == chat.send(MESSAGES[1]).text


def test_batch_reuses_the_prefix(home, tiny_llama, prompt_file):
    bot = load(tiny_llama, prompt_file)
    answers = list(bot.batch(["a?", "b?", "a?"]))
    assert answers[0].text == answers[2].text
    from urial_edge.runtime.prompt import render_turn

    for q, a in zip(["a?", "b?", "a?"], answers):
        assert a.stats.prefill_tokens == len(bot.after_prefix(render_turn(q)))
        assert a.stats.cached_tokens == len(bot.prefix_ids)


def test_options_and_bad_input(home, tiny_llama, prompt_file):
    bot = load(tiny_llama, prompt_file, max_tokens=5)
    assert bot.ask("x?").tokens <= 5
    a = bot.ask("x?", temperature=0.8, seed=3)
    b = bot.ask("x?", temperature=0.8, seed=3)
    assert a.text == b.text
    with pytest.raises(UrialError, match="empty"):
        bot.ask("   ")
    with pytest.raises(UrialError, match="temperature"):
        bot.ask("x?", temperature=-1)
    with pytest.raises(UrialError, match="tokens of context are left"):
        bot.ask("word " * 3000)
    with pytest.raises(UrialError, match="invalid session name"):
        bot.chat("../escape")


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_a_prefix_whose_last_token_merges_differently_is_split_where_tokens_are_stable(home, tmp_path,
                                                                                     prompt_file, arch):
    """GPT-2-style tokenizers make the prefix's closing blank line one token at the end of the text but
    two before "# Query:". The cached part stops before it, so every path feeds the whole text's tokens."""
    from urial_edge.runtime.prompt import render_history, render_turn

    bot = load(make_tiny_model(tmp_path / arch, arch, gpt2_split=True), prompt_file, max_tokens=10)
    assert bot.prefix_tail == "\n\n"
    whole = bot.tokenizer.encode(bot.prefix_text + render_turn("Hi?"), bos=True)
    assert bot.tokenizer.encode(bot.prefix_text, bos=True) != whole[:len(bot.prefix_ids) + 1]  # the trap
    assert bot.prefix_ids + bot.after_prefix(render_turn("Hi?")) == whole
    chat, history = bot.chat("s"), []
    for message in MESSAGES:
        got = chat.send(message)
        text = bot.prefix_text + render_history(history, message)
        expected = bot.ask(message, history=history, no_cache=True)
        assert expected.stats.prompt_tokens == len(bot.tokenizer.encode(text, bos=True))
        assert got.text == expected.text and got.token_ids == expected.token_ids
        history.append((message, got.text))
    continued = bot.tokenizer.encode(bot.prefix_text + render_history(history, "x"), bos=True)
    assert chat.ids == continued[:len(chat.ids)]  # the state holds only tokens that the next turn keeps
    chat.save()
    assert bot.chat("s").send("More?").text == chat.send("More?").text
