"""Integration tests on the real bundled base model (Gemma 3 270M)."""

import pytest

from urial_edge.runtime.prompt import SAMPLE_QUERIES, boundary_problems, load_prompt

pytestmark = pytest.mark.slow

QUESTIONS = ["What is the capital of France?", "Give me two tips for learning a new language."]


@pytest.fixture(scope="module")
def bot(bundled_home):
    import os

    os.environ["URIAL_EDGE_HOME"] = str(bundled_home)
    from urial_edge.runtime.assistant import Assistant

    return Assistant.load(max_tokens=40)


def test_cached_answers_equal_full_prefill_token_for_token(bot):
    for question in QUESTIONS:  # two questions in one process, each from the untouched shared prefix
        cached, full = bot.ask(question), bot.ask(question, no_cache=True)
        assert cached.token_ids == full.token_ids and cached.text == full.text
        assert full.stats.prefill_tokens == len(bot.prefix_ids) + cached.stats.prefill_tokens


BATCH = QUESTIONS + ["Write a haiku about autumn.", "What is 17 times 23?", "Name three rivers in Africa.",
                     "How do vaccines work?"]


def test_batched_greedy_answers_equal_single_answers_token_for_token(bot):
    single = [bot.ask(q) for q in BATCH]
    batched = list(bot.batch(BATCH, batch_size=4))  # more queries than slots: some join mid-way
    assert [a.token_ids for a in batched] == [a.token_ids for a in single]
    assert max(a.stats.batch_size for a in batched) == 4


def test_answers_like_an_assistant(bot):
    answer = bot.ask(QUESTIONS[0])
    assert "Paris" in answer.text
    assert answer.finish_reason in ("stop", "length") and answer.stats.ttft > 0


MORE_QUERIES = SAMPLE_QUERIES + (
    "", "?", "```", "\n", "ok\n\n\n", "   ", "Translate 'bonjour' to English.", "def f():\n\treturn 1",
    "# Query:", "Résumé naïve façade", "数学の問題を解いてください", "🙂🙃", "a" * 300, "1+1=?",
)


@pytest.mark.parametrize("name", ["urial-k0", "urial-k1", "urial-k3", "urial-k8", "urial-k4-direct"])
def test_prefix_ids_are_an_exact_prefix_of_every_prompt(bot, name):
    assert boundary_problems(load_prompt(name), bot.tokenizer, MORE_QUERIES) == []


def test_quantized_kv_cache_answers(bot, bundled_home):
    from urial_edge.runtime.assistant import Assistant

    q8 = Assistant(bot.model, bot.config, bot.tokenizer, bot.model_path, bot.prompt, bot.options, 8, True, None)
    assert q8.prefix.key != bot.prefix.key
    assert "Paris" in q8.ask(QUESTIONS[0]).text
