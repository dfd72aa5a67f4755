"""The batched engine on tiny random-weight models: exactness, joining and leaving, cancellation, limits."""

import threading

import pytest
from conftest import make_tiny_model
from urial_edge.runtime.assistant import Assistant
from urial_edge.runtime.engine import Engine, EngineBusy, Request
from urial_edge.errors import UrialError


# different lengths on purpose: prompts of one batch are padded to the longest
QUERIES = ["Hi?", "Name a colour.", "What is the tallest mountain on Earth and how tall is it?", "x",
           "Tell me about rivers, lakes and the sea, in some detail please.", "Why is the sky blue?",
           "2+2?", "Write a short poem about the moon and the stars at night."]


@pytest.fixture(params=["gemma3", "llama"])
def bot(request, home, tmp_path, prompt_file):
    """gemma3: five sliding-window layers of 16 tokens (RotatingKVCache) and a global one; llama: plain caches."""
    model = make_tiny_model(tmp_path / request.param, request.param)
    return Assistant.load(str(model), prompt_file, max_tokens=40, stop=["\x00none"])


def test_batched_greedy_answers_equal_single_answers_token_for_token(bot):
    single = [bot.ask(q) for q in QUERIES]
    assert len({len(a.token_ids) for a in single}) > 1 or all(a.tokens == 40 for a in single)
    for size in (2, 3, 8):  # 2 and 3: more queries than slots, so sequences join and leave mid-way
        batched = list(bot.batch(QUERIES, batch_size=size))
        assert [a.token_ids for a in batched] == [a.token_ids for a in single], size
        assert [a.text for a in batched] == [a.text for a in single]
        assert max(a.stats.batch_size for a in batched) == min(size, len(QUERIES))


def test_answers_longer_than_the_sliding_window_stay_exact(bot):
    long = "Count slowly: " + " ".join(str(i) for i in range(40))  # well past the 16-token window
    single = [bot.ask(q, max_tokens=60) for q in (long, QUERIES[0])]
    batched = list(bot.batch([long, QUERIES[0]], max_tokens=60))
    assert [a.token_ids for a in batched] == [a.token_ids for a in single]


def test_cached_and_full_prefill_agree_inside_a_batch(bot):
    full = [bot.ask(q, no_cache=True) for q in QUERIES[:4]]
    batched = list(bot.batch(QUERIES[:4], no_cache=True))
    cached = list(bot.batch(QUERIES[:4]))
    assert [a.token_ids for a in full] == [a.token_ids for a in batched] == [a.token_ids for a in cached]


def test_each_answer_keeps_its_own_options(bot):
    alone = [bot.ask(QUERIES[0], max_tokens=5), bot.ask(QUERIES[1], repetition_penalty=1.0),
             bot.ask(QUERIES[2], temperature=0.9, seed=7), bot.ask(QUERIES[3], repetition_context=0,
                                                                    repetition_penalty=1.3)]
    requests = [bot.request(QUERIES[0], max_tokens=5), bot.request(QUERIES[1], repetition_penalty=1.0),
                bot.request(QUERIES[2], temperature=0.9, seed=7),
                bot.request(QUERIES[3], repetition_context=0, repetition_penalty=1.3)]
    together = list(bot.run(requests, batch_size=4))
    assert [a.token_ids for a in together] == [a.token_ids for a in alone]
    assert together[0].tokens <= 5 and together[0].finish_reason in ("length", "stop")
    assert together[2].options["seed"] == 7 and together[2].options["temperature"] == 0.9


def test_a_seed_gives_the_same_sample_whatever_runs_beside_it(bot):
    a = bot.ask(QUERIES[1], temperature=1.0, seed=3)
    b = list(bot.run([bot.request(QUERIES[0]), bot.request(QUERIES[1], temperature=1.0, seed=3)]))[1]
    c = bot.ask(QUERIES[1], temperature=1.0, seed=4)
    assert a.token_ids == b.token_ids
    assert a.token_ids != c.token_ids  # another seed samples otherwise (tiny random models are far from greedy)


def test_cancelled_answer_leaves_at_the_next_step_and_others_go_on(bot):
    engine = bot.engine
    seqs = [engine.submit(bot.request(q, max_tokens=30)) for q in QUERIES[:3]]
    it = iter(seqs[1])
    while not seqs[1].token_ids:
        engine.step()
    seqs[1].cancel()
    steps_before = engine.steps
    engine.step()
    assert seqs[1].finish_reason == "cancelled" and seqs[1] not in engine.active
    assert engine.steps == steps_before + 1
    rest = [list(s) for s in (seqs[0], seqs[2])]
    assert all(s.finish_reason in ("stop", "length") for s in (seqs[0], seqs[2]))
    assert "".join(rest[0]).strip() == bot.ask(QUERIES[0], max_tokens=30).text
    del it


def test_stream_closed_early_cancels_its_sequence(bot):
    stream = bot.stream(QUERIES[4], max_tokens=40)
    pieces = iter(stream)
    next(pieces)
    pieces.close()  # a consumer that stops reading
    bot.engine.step()
    assert not bot.engine.active and not bot.engine.waiting


def test_bounded_queue_refuses_with_a_retry_hint(home, tiny_llama, prompt_file):
    bot = Assistant.load(str(tiny_llama), prompt_file, max_tokens=8, batch_size=1, max_queued=1)
    first = [bot.engine.submit(bot.request(q)) for q in QUERIES[:2]]
    with pytest.raises(EngineBusy) as busy:
        bot.engine.submit(bot.request(QUERIES[2]))
    assert busy.value.retry_after >= 1 and "busy" in str(busy.value)
    for s in first:
        list(s)
    assert all(s.finish_reason in ("stop", "length") for s in first)
    assert first[1].stats.queue_seconds > 0


def test_waiting_time_is_in_the_stats(home, tiny_llama, prompt_file):
    bot = Assistant.load(str(tiny_llama), prompt_file, max_tokens=8, batch_size=1)
    seqs = [bot.engine.submit(bot.request(q)) for q in QUERIES[:4]]  # one slot: each waits for those before
    for s in seqs:
        list(s)
    waits = [s.stats.queue_seconds for s in seqs]
    assert waits == sorted(waits) and waits[3] > waits[0]
    assert all(s.stats.ttft >= s.stats.queue_seconds for s in seqs)


def test_many_threads_share_one_driven_engine(bot):
    bot.start()
    expected = {q: bot.ask(q).text for q in QUERIES[:4]}
    results, errors = {}, []

    def worker(q):
        try:
            results[q] = bot.ask(q).text
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(q,)) for q in QUERIES[:4]]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and results == expected


def test_bad_requests_are_refused_before_queueing(bot):
    with pytest.raises(UrialError, match="no tokens"):
        bot.engine.submit(Request([]))
    with pytest.raises(UrialError, match="context"):
        bot.engine.submit(Request([1] * 5000))
    with pytest.raises(UrialError, match="query 2"):
        list(bot.batch(["ok?", "  "]))
    assert not bot.engine.waiting


def test_batch_size_must_be_positive(home, tiny_llama):
    with pytest.raises(UrialError, match="at least 1"):
        Engine(None, None, [], 100, max_active=0)


def full_pass_logprobs(bot, query: str, answer_ids: list, temperature: float = 1.0) -> list:
    """Log-softmax rows (at ``temperature``) of one plain forward pass over the whole prompt and answer."""
    import mlx.core as mx

    from urial_edge.runtime import prompt as urial

    ids = bot.prefix_ids + bot.after_prefix(urial.render_turn(query)) + answer_ids
    logits = bot.model(mx.array(ids)[None])[0, -len(answer_ids) - 1:-1, :].astype(mx.float32) / temperature
    return (logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()


def test_logprobs_come_from_the_distribution_each_token_was_chosen_from(bot):
    plain = bot.ask(QUERIES[2], repetition_penalty=1.0)
    scored = bot.ask(QUERIES[2], repetition_penalty=1.0, logprobs=5)
    assert scored.token_ids == plain.token_ids and scored.text == plain.text  # asking costs nothing in answers
    assert plain.logprobs is None and len(scored.logprobs) == scored.tokens
    reference = full_pass_logprobs(bot, QUERIES[2], scored.token_ids)
    for step, row in zip(scored.logprobs, reference):
        assert step.top[0][0] == step.token  # greedy: the chosen token is the likeliest
        assert [t for t, _ in step.top] == sorted(range(len(row)), key=lambda t: -row[t])[:5]
        assert step.logprob == pytest.approx(row[step.token], abs=1e-3)
        assert [v for _, v in step.top] == pytest.approx([row[t] for t, _ in step.top], abs=1e-3)


def test_batched_logprobs_equal_single_ones_and_sampled_ones_follow_temperature(bot):
    single = [bot.ask(q, logprobs=2) for q in QUERIES[:3]]
    batched = list(bot.batch(QUERIES[:3], batch_size=3, logprobs=2))
    for a, b in zip(single, batched):
        assert [t.token for t in a.logprobs] == [t.token for t in b.logprobs] == a.token_ids
        assert [t.logprob for t in a.logprobs] == pytest.approx([t.logprob for t in b.logprobs], abs=1e-4)
    for temperature in (1.5, 0.4):
        sampled = bot.ask(QUERIES[0], temperature=temperature, seed=1, repetition_penalty=1.0, logprobs=0)
        reference = full_pass_logprobs(bot, QUERIES[0], sampled.token_ids, temperature)
        assert [t.top for t in sampled.logprobs] == [[]] * sampled.tokens
        assert [t.logprob for t in sampled.logprobs] == pytest.approx(
            [row[t] for t, row in zip(sampled.token_ids, reference)], abs=1e-3)
    with pytest.raises(UrialError, match="logprobs must be an integer from 0 to 20"):
        bot.ask(QUERIES[0], logprobs=21)
