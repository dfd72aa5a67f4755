"""Integration tests on the real bundled base model (Gemma 3 270M)."""

import pytest

from urial_edge.prompt import SAMPLE_QUERIES, boundary_problems, load_prompt

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Give me two tips for learning a new language."]


@pytest.fixture(scope="module")
def bot(bundled_home):
    import os

    os.environ["URIAL_EDGE_HOME"] = str(bundled_home)
    from urial_edge.assistant import Assistant

    return Assistant.load(max_tokens=40)


def test_cached_answers_equal_full_prefill_token_for_token(bot):
    from urial_edge.generate import generate_tokens
    from urial_edge.prefix_cache import make_cache
    from urial_edge.prompt import render_turn

    for question in QUESTIONS:  # two questions in one process, each from an untouched prefix copy
        rest = bot.tokenizer.encode(render_turn(question))
        resumed = list(generate_tokens(bot.model, rest, bot.prefix.fresh(), list(bot.prefix.tokens), bot.options))
        full = list(generate_tokens(bot.model, bot.prefix_ids + rest, make_cache(bot.model), [], bot.options))
        assert resumed == full
        assert bot.ask(question).text == bot.ask(question, no_cache=True).text


def test_answers_like_an_assistant(bot):
    answer = bot.ask(QUESTIONS[0])
    assert "Paris" in answer.text
    assert answer.finish_reason in ("stop", "length") and answer.stats.ttft > 0


MORE_QUERIES = SAMPLE_QUERIES + (
    "", "?", "```", "\n", "ok\n\n\n", "   ", "Translate 'bonjour' to English.", "def f():\n\treturn 1",
    "# Query:", "Résumé naïve façade", "数学の問題を解いてください", "🙂🙃", "a" * 300, "1+1=?",
)


@pytest.mark.parametrize("name", ["urial-k0", "urial-k1", "urial-k3", "urial-k8"])
def test_prefix_ids_are_an_exact_prefix_of_every_prompt(bot, name):
    assert boundary_problems(load_prompt(name), bot.tokenizer, MORE_QUERIES) == []


def test_quantized_kv_cache_answers(bot, bundled_home):
    from urial_edge.assistant import Assistant

    q8 = Assistant(bot.model, bot.config, bot.tokenizer, bot.model_path, bot.prompt, bot.options, 8, True, None)
    assert q8.prefix.key != bot.prefix.key
    assert "Paris" in q8.ask(QUESTIONS[0]).text
