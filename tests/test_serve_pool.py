"""The server's pool of models, in-process on tiny models: names, loading on demand, one engine per model
shared by its prompts, keep-alive, the model cap and the memory budget, and unloading that frees memory."""

import shutil
import threading

import pytest

from conftest import TINY_PROMPT, wait_until

from urial_edge.errors import UrialError
from urial_edge.units import parse_keep_alive


@pytest.mark.parametrize("value,seconds", [
    ("5m", 300.0), ("1h30m", 5400.0), ("10s", 10.0), ("500ms", 0.5), ("300", 300.0), (300, 300.0), (2.5, 2.5),
    (0, 0.0), ("0", 0.0), ("0s", 0.0), (-1, None), ("-1", None), ("-1m", None), (float("inf"), None)])
def test_keep_alive_reads_as_ollama_does(value, seconds):
    assert parse_keep_alive(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", "", None, True, [], float("nan"), "5d"])
def test_bad_keep_alive_is_a_one_line_error(value):
    with pytest.raises(UrialError, match="keep_alive"):
        parse_keep_alive(value)


def test_model_names_split_into_model_and_prompt():
    from urial_edge.serve.pool import split_name

    assert split_name("gemma-3-270m") == ("gemma-3-270m", None)
    assert split_name("gemma-3-270m:urial-k3") == ("gemma-3-270m", "urial-k3")
    assert split_name("gemma-3-270m:latest") == ("gemma-3-270m", None)
    assert split_name("org/model:urial-k0") == ("org/model", "urial-k0")


@pytest.fixture
def store(home, tiny_gemma, tiny_llama):
    """A home whose store holds two tiny models (``one`` and ``two``) and the tiny prompt file."""
    for name, model in (("one", tiny_llama), ("two", tiny_gemma), ("three", tiny_llama)):
        shutil.copytree(model, home / "models" / name)
    (home / "tiny.toml").write_text(TINY_PROMPT)
    return home


def make_pool(store, **settings):
    from urial_edge.runtime.assistant import Assistant
    from urial_edge.serve.pool import Pool
    from urial_edge.serve.run import loader

    default = Assistant.load(str(store / "models" / "one"), str(store / "tiny.toml"), max_tokens=4)
    default.start()
    return Pool(default, "one", loader(default), **settings)


def answer(pool, name, query="Hi", **options):
    with pool.use(name) as served:
        return served.assistant.ask(query, **options), served


def names(pool):
    return sorted(m.name for m in pool.loaded())


def test_models_load_on_demand_and_prompts_share_the_model(store):
    pool = make_pool(store)
    try:
        first, served = answer(pool, "two")
        assert names(pool) == ["one", "two"] and served.name == "two" and served.load_seconds > 0
        _, again = answer(pool, "two")
        assert again.load_seconds < served.load_seconds  # loaded once
        with pool.use("two:urial-k0") as a, pool.use("two") as b:
            assert a.assistant.model is b.assistant.model and a.assistant.engine is b.assistant.engine
            assert a.assistant.tokenizer is b.assistant.tokenizer and a.assistant.prompt.name == "urial-k0"
            x = a.assistant.stream("Name a river.", max_tokens=8)
            y = b.assistant.stream("Name a river.", max_tokens=8)
            ax, ay = x.finish(), y.finish()
        assert ax.stats.batch_size == ay.stats.batch_size == 2  # two prompts, one batch
        assert answer(pool, "two")[0].text == first.text
    finally:
        pool.close()


def test_the_least_recently_used_idle_model_makes_room(store):
    pool = make_pool(store, max_models=2)
    try:
        answer(pool, "two")
        answer(pool, "one")  # now "two" is the least recently used
        answer(pool, "three")
        assert names(pool) == ["one", "three"]
        assert pool.load_report()["finished"]["length"] + pool.load_report()["finished"]["stop"] == 3
    finally:
        pool.close()


def test_a_model_answering_is_never_unloaded(store):
    pool = make_pool(store, max_models=2)
    pool.load_wait = 0.5
    try:
        with pool.use("two"), pool.use("one"):
            with pytest.raises(Exception, match="all answering") as e:
                answer(pool, "three")
            assert e.value.status == 503
            assert names(pool) == ["one", "two"]
        got = {}
        with pool.use("two"):
            waiter = threading.Thread(target=lambda: got.update(answer=answer(pool, "three")[0]))
            waiter.start()  # waits for room: "one" is idle, so it goes
            waiter.join(60)
        assert got and names(pool) == ["three", "two"]
    finally:
        pool.close()


def test_what_can_never_fit_the_budget_is_refused(store):
    from urial_edge.serve.pool import weights_bytes

    size = weights_bytes(store / "models" / "two")
    pool = make_pool(store, max_memory=size - 1)
    try:
        with pytest.raises(Exception, match="needs about .*more than this server's memory budget") as e:
            answer(pool, "two")
        assert e.value.status == 400 and names(pool) == ["one"]
        assert answer(pool, "one")[0].text is not None
    finally:
        pool.close()


def test_the_memory_budget_unloads_idle_models_to_make_room(store):
    from urial_edge.serve.pool import weights_bytes

    pool = make_pool(store)
    try:
        pool.max_memory = pool.loaded()[0].nbytes() + weights_bytes(store / "models" / "two") + (1 << 10)
        answer(pool, "two")
        assert names(pool) == ["one", "two"]
        answer(pool, "three")  # no room for a third: the least recently used idle one goes
        assert names(pool) == ["three", "two"]
    finally:
        pool.close()


def test_keep_alive_expires_and_a_request_can_change_it(store):
    pool = make_pool(store, keep_alive=3600.0)
    try:
        with pool.use("two", keep_alive=0) as served:
            served.assistant.ask("Hi", max_tokens=2)
        wait_until(lambda: "two" not in names(pool), what="the model's keep-alive to expire")
        assert names(pool) == ["one"]
        with pool.use("two", keep_alive="-1"):
            pass
        assert next(m for m in pool.loaded() if m.name == "two").expires_at() is None
        assert next(m for m in pool.loaded() if m.name == "one").expires_at() is None  # the default stays
    finally:
        pool.close()


def test_unloading_gives_the_memory_back(store):
    import mlx.core as mx

    pool = make_pool(store)
    try:
        answer(pool, "one")
        mx.clear_cache()
        base = mx.get_active_memory()
        for _ in range(3):
            answer(pool, "two")
            loaded = mx.get_active_memory()
            pool.expire("two")  # unloaded at once: it is idle
            assert names(pool) == ["one"]
            assert mx.get_active_memory() < loaded and mx.get_cache_memory() == 0
        assert mx.get_active_memory() <= base * 1.05  # nothing of the unloaded model is kept
    finally:
        pool.close()


def test_unknown_names_and_prompts(store):
    pool = make_pool(store)
    try:
        for name, match in (("nope", "not found"), ("two:nope", "unknown prompt 'nope'")):
            with pytest.raises(Exception, match=match) as e:
                answer(pool, name)
            assert e.value.status == 404 and e.value.param == "model"
        assert names(pool) == ["one"]
    finally:
        pool.close()


@pytest.mark.parametrize("option,value", [("--state-cache", "lots"), ("--keep-alive", "soon"),
                                          ("--max-memory", "lots"), ("--request-timeout", "0")])
def test_bad_serve_option_values_exit_2(home, option, value):
    from click.testing import CliRunner

    from urial_edge.cli.main import cli

    result = CliRunner().invoke(cli, ["serve", option, value])
    assert result.exit_code == 2 and option in result.output


def test_with_prompt_shares_the_model_and_answers_as_its_own_assistant(store):
    from urial_edge.runtime.assistant import Assistant

    a = Assistant.load(str(store / "models" / "one"), str(store / "tiny.toml"), max_tokens=6)
    b = a.with_prompt("urial-k0")
    assert b.model is a.model and b.engine is a.engine and b.tokenizer is a.tokenizer and b.prompt.name == "urial-k0"
    alone = Assistant.load(str(store / "models" / "one"), "urial-k0", max_tokens=6)
    assert b.ask("Name a river.").text == alone.ask("Name a river.").text != a.ask("Name a river.").text
