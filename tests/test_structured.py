"""Structured output (issue 21): constrained answers on tiny random-weight models and on the bundled model.

A random-weight model writes garbage, so every valid answer here is valid because of the mask alone. The
constraints are chosen bounded (maxLength, maximum, maxItems, finite grammars), so that every answer completes
well within max_tokens and all of them can be checked.
"""

import json
import re

import jsonschema
import pytest

from conftest import make_tiny_model
from urial_edge.errors import UrialError
from urial_edge.runtime import constraints
from urial_edge.runtime.assistant import Assistant

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6, "description": "The person's first name"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120, "description": "Age in years"},
        "pet": {"enum": ["cat", "dog", None], "description": "Their pet, or null"},
        # an integer: a number's digits are unbounded, and a random model may write them up to max_tokens
        "score": {"type": "integer", "minimum": -5, "maximum": 5},
        "home": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 4},
                                                  "floor": {"type": "integer", "minimum": 0, "maximum": 9}},
                 "required": ["city"], "additionalProperties": False},
        "tags": {"type": "array", "items": {"enum": ["a", "bb"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "pet", "home", "tags"],
    "additionalProperties": False,
}
LARK = 'start: "x=" NUMBER ("," NUMBER){0,2}\nNUMBER: /[0-9]{1,3}/\n'
GBNF = 'root ::= item ("-" item)?\nitem ::= [A-Z] [a-z] [a-z]?\n'
# (keyword, spec, how to check a complete answer's value)
CASES = [
    ("schema", PERSON, lambda v: jsonschema.validate(v, PERSON) is None),
    ("schema", {"type": "object", "properties": {"n": {"type": "integer", "maximum": 99, "minimum": 0}},
                "required": ["n"], "additionalProperties": False}, lambda v: set(v) == {"n"} and 0 <= v["n"] <= 99),
    ("regex", r"[0-9]{4}-[a-z]{2,3}", lambda v: re.fullmatch(r"[0-9]{4}-[a-z]{2,3}", v) is not None),
    ("choice", ["yes", "no", "not sure"], lambda v: v in ("yes", "no", "not sure")),
    ("grammar", LARK, lambda v: re.fullmatch(r"x=[0-9]{1,3}(,[0-9]{1,3}){0,2}", v) is not None),
    ("grammar", GBNF, lambda v: re.fullmatch(r"[A-Z][a-z]{1,2}(-[A-Z][a-z]{1,2})?", v) is not None),
]
QUERIES = ["Tell me about someone.", "x", "What is the date and a code for it, please?", "Is it raining?"]


@pytest.fixture(params=["gemma3", "llama"])
def bot(request, home, tmp_path, prompt_file):
    """gemma3: sliding-window layers of 16 tokens (answers run past the window); llama: plain caches."""
    model = make_tiny_model(tmp_path / request.param, request.param)
    return Assistant.load(str(model), prompt_file, max_tokens=200)


def check(answer, kind, spec, valid) -> None:
    assert answer.finish_reason == "stop", (kind, answer.text)
    assert answer.constrained and valid(answer.value)
    assert answer.value == (json.loads(answer.text) if kind == "schema" else answer.text)
    assert "```" not in answer.text  # the frame's closing fence is not part of the answer


def test_every_constrained_answer_is_valid_alone_and_batched_beside_unconstrained_ones(bot):
    for size in (1, 3, 8):
        requests, expected = [], []
        for i, (kind, spec, valid) in enumerate(CASES):
            requests.append(bot.request(QUERIES[i % len(QUERIES)], **{kind: spec}))
            expected.append((kind, spec, valid))
            requests.append(bot.request(QUERIES[i % len(QUERIES)]))  # an unconstrained row beside it
            expected.append(None)
        answers = list(bot.run(requests, size))
        for answer, case in zip(answers, expected):
            if case is None:
                assert not answer.constrained and "value" not in answer.as_dict()
            else:
                check(answer, *case)


def test_unconstrained_answers_are_unchanged_beside_constrained_ones(bot):
    alone = [bot.ask(q) for q in QUERIES]
    mixed = [bot.request(q) for q in QUERIES]
    for i, (kind, spec, _) in enumerate(CASES):
        mixed.insert(2 * i % (len(mixed) + 1), bot.request(QUERIES[i % 4], **{kind: spec}))
    answers = [a for a in bot.run(mixed, 8) if not a.constrained]
    assert [a.token_ids for a in answers] == [a.token_ids for a in alone]
    assert [a.text for a in answers] == [a.text for a in alone]


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 3, "top_p": 0.95}])
def test_fast_forward_gives_the_tokens_of_token_by_token_decoding(bot, sampling):
    def run(fast_forward, size):
        bot.engine.fast_forward = fast_forward
        steps = bot.engine.steps
        requests = [bot.request(QUERIES[i % 4], logprobs=2, **{kind: spec}, **sampling)
                    for i, (kind, spec, _) in enumerate(CASES)] + [bot.request(QUERIES[0], **sampling)]
        return list(bot.run(requests, size)), bot.engine.steps - steps

    for size in (1, 8):
        fast, fast_steps = run(True, size)
        slow, slow_steps = run(False, size)
        bot.engine.fast_forward = True
        assert [a.token_ids for a in fast] == [a.token_ids for a in slow]
        assert [a.text for a in fast] == [a.text for a in slow]
        for a, b in zip(fast[:-1], slow[:-1]):  # forced tokens: probability 1 either way
            assert [t.token for t in a.logprobs] == [t.token for t in b.logprobs]
            assert [t.logprob for t in a.logprobs] == pytest.approx([t.logprob for t in b.logprobs], abs=1e-4)
        if size == 1:
            assert fast_steps < slow_steps  # forced runs went in one step each


def test_logprobs_come_from_the_masked_distribution(bot):
    answer = bot.ask("Pick one.", choice=["yes", "no"], logprobs=5)
    first = answer.logprobs[0]
    allowed = {bot.tokenizer.encode("y")[0], bot.tokenizer.encode("n")[0]}
    assert {t for t, _ in first.top} == allowed  # only what the grammar allows is a rival
    assert sum(2.718281828 ** v for _, v in first.top) == pytest.approx(1.0, abs=1e-4)
    assert all(t.logprob == 0.0 and t.top == [(t.token, 0.0)] for t in answer.logprobs[1:])  # forced


def test_an_answer_cut_at_max_tokens_is_never_presented_as_valid(bot):
    answer = bot.ask("Go.", schema=PERSON, max_tokens=5)
    assert answer.finish_reason == "length" and answer.value is None
    assert answer.as_dict()["value"] is None and answer.tokens == 5
    for fast_forward in (True, False):  # what is left once the grammar has nothing to choose does not count
        bot.engine.fast_forward = fast_forward
        complete = bot.ask("Go.", choice=["left", "right"], max_tokens=1)
        assert complete.finish_reason == "stop" and complete.value in ("left", "right") and complete.tokens > 1
    bot.engine.fast_forward = True
    stream = bot.stream("Go.", regex=r"[a-z]{30}")
    pieces = iter(stream)
    next(pieces)
    stream.cancel()
    assert stream.finish().finish_reason == "cancelled" and stream.answer.value is None


def test_stop_strings_never_cut_a_constrained_answer(bot):
    text = "# Query: x\n```\n# Answer: y"  # the frame's stop strings, inside the only allowed answer
    answer = bot.ask("Say it.", choice=[text], stop=["Query"])
    assert answer.finish_reason == "stop" and answer.text == answer.value == text
    spaced = bot.ask("Say it.", regex=r"  [a-z]{2} ")
    assert spaced.finish_reason == "stop" and re.fullmatch(r"  [a-z]{2} ", spaced.text)  # not trimmed


def test_raw_completions_can_be_constrained_and_end_on_eos_or_grammar(bot):
    answer = bot.complete("Numbers: ", regex=r"[0-9]{2,5}").finish()
    assert re.fullmatch(r"[0-9]{2,5}", answer.text) and answer.value == answer.text
    done = bot.complete("A: ", schema={"type": "object", "properties": {}, "additionalProperties": False}).finish()
    assert done.text == "{}" and done.value == {} and done.finish_reason == "stop"


def test_a_chat_turn_can_be_constrained_and_the_conversation_stays_exact(bot):
    chat = bot.chat()
    first = chat.send("Who?", schema=PERSON)
    assert first.finish_reason == "stop", first.text
    jsonschema.validate(first.value, PERSON)
    second = chat.send("And then?")
    assert second.token_ids == bot.ask("And then?", history=[("Who?", first.text)]).token_ids
    assert chat.turns == [("Who?", first.text), ("And then?", second.text)]


DESCRIBED = {"type": "object", "properties": {
    "city": {"type": "string", "description": "Where it happened"},
    "when": {"type": "object", "description": "The date", "properties": {
        "year": {"type": "integer", "description": "Four digits"}}},
    "who": {"type": "array", "items": {"$ref": "#/$defs/person"}}},
    "required": ["city"], "$defs": {"person": {"type": "object", "properties": {
        "name": {"type": "string", "description": "Full name"}}}}}


def test_field_descriptions_reach_the_prompt_where_asked(bot):
    constraint = constraints.make("schema", DESCRIBED)
    text = constraint.description()
    assert text.splitlines() == [
        "Answer with a JSON object with these fields:", "- city (string): Where it happened",
        "- when (object, optional): The date", "  - year (integer, optional): Four digits",
        "- who (array of objects, optional)", "  - name (string, optional): Full name"]
    query, system = "Where was it?", ""
    assert constraints.with_description(constraint, "query", query, system) == (f"{query}\n\n{text}", "")
    assert constraints.with_description(constraint, "system", query, "Be brief.") == (query, f"Be brief.\n\n{text}")
    assert constraints.with_description(constraint, "none", query, "") == (query, "")
    assert constraints.with_description(constraints.make("regex", "a+"), "both", query, "") == (query, "")
    assert bot.request(query, schema=DESCRIBED).tokens == bot.request(query, system=text, remember=False).tokens
    with_hint = bot.request(query, schema=DESCRIBED, describe="both")
    plain = bot.request(query + "\n\n" + text, system=text)
    assert with_hint.tokens == plain.tokens
    with pytest.raises(UrialError, match="describe must be one of"):
        bot.request(query, schema=DESCRIBED, describe="everywhere")


@pytest.mark.parametrize("kind,spec,match", [
    ("schema", {"type": "strin"}, "invalid schema: Invalid type: strin"),
    ("schema", '{"type": "object",', "invalid schema: the schema is not valid JSON"),
    ("schema", [1, 2], "invalid schema: a schema must be a JSON object"),
    ("schema", {"type": "string", "format": "colour"}, "invalid schema: Unknown format: colour"),
    ("schema", {"type": "array", "uniqueItems": True}, 'Unimplemented keys: ["uniqueItems"] ("x-guidance"'),
    ("schema", {"type": "integer", "minimum": 5, "maximum": 1}, "minimum (5) is greater than maximum (1)"),
    ("schema", {"$ref": "#/$defs/missing"}, "invalid schema:"),
    ("regex", "a(b", "invalid regex: invalid regex \"a(b\""),
    ("regex", "", "invalid regex: the regex is empty"),
    ("choice", [], "invalid choice: a choice needs a non-empty list of strings"),
    ("choice", ["a", ""], "invalid choice: a choice must not be empty"),
    ("grammar", "start: foo", 'invalid grammar: unknown name: "foo"'),
    ("grammar", "root ::= [a-", "invalid grammar: GBNF: Unexpected end of input"),
    ("grammar", "   ", "invalid grammar: the grammar is empty"),
])
def test_bad_constraints_are_one_line_errors_before_any_generation(home, tiny_llama, prompt_file, kind, spec, match):
    bot = Assistant.load(str(tiny_llama), prompt_file)
    with pytest.raises(UrialError) as e:
        bot.ask("Hi?", **{kind: spec})
    assert match in str(e.value) and "\n" not in str(e.value)
    assert bot.engine.steps == 0 and not bot.engine.waiting


def test_one_constraint_at_a_time_and_lenient_schemas_warn(home, tiny_llama, prompt_file, capsys):
    bot = Assistant.load(str(tiny_llama), prompt_file, max_tokens=40)
    with pytest.raises(UrialError, match="give one constraint, not schema and regex"):
        bot.ask("Hi?", schema={}, regex="a")
    schema = {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2, "uniqueItems": True,
              "x-guidance": {"lenient": True}}
    answer = bot.ask("Hi?", schema=schema)
    assert "uniqueItems" in capsys.readouterr().err and answer.finish_reason == "stop"
    assert all(v in ("a", "b") for v in answer.value)


def test_the_token_table_is_kept_in_the_store_and_rebuilt_when_damaged(home, tiny_llama, prompt_file):
    bot = Assistant.load(str(tiny_llama), prompt_file, max_tokens=20)
    constraints._vocabularies.clear()  # as in a new process
    first = bot.ask("Hi?", schema=PERSON)
    table, = (home / "tokenizers").glob("*.llguidance-*.npz")
    stored = table.stat().st_mtime_ns
    constraints._vocabularies.clear()
    again = bot.ask("Hi?", schema=PERSON)  # built from the stored table
    assert table.stat().st_mtime_ns == stored
    table.write_bytes(b"not a zip")
    constraints._vocabularies.clear()
    rebuilt = bot.ask("Hi?", schema=PERSON)  # from tokenizer.json again, and stored again
    assert first.token_ids == again.token_ids == rebuilt.token_ids
    assert constraints._load_table(table) is not None


def test_response_formats_map_to_constraints():
    assert constraints.from_response_format(None) is None
    assert constraints.from_response_format({"type": "text"}) is None
    assert constraints.from_response_format({"type": "json_object"}).spec == {"type": "object"}
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    c = constraints.from_response_format({"type": "json_schema", "json_schema": {"name": "x", "schema": schema}})
    assert c.kind == "schema" and c.spec == schema
    for made in (c, constraints.make("regex", "[a-c]+"), constraints.make("choice", ["a", "b"]),
                 constraints.make("grammar", GBNF)):
        assert constraints.from_response_format(made.response_format()) == made  # what `ask` sends a server
        plain = json.loads(json.dumps(made.arguments()))  # what the ranks of a split model get
        assert constraints.pop_constraint(plain) == made and plain == {}
    for bad, match in [({"type": "xml"}, "unknown type 'xml'"), ("json", "must be an object with a 'type'"),
                       ({"type": "json_schema", "json_schema": {"name": "x"}}, "must be an object with a 'schema'"),
                       ({"type": "regex", "regex": "(("}, "invalid regex")]:
        with pytest.raises(UrialError, match=re.escape(match)):
            constraints.from_response_format(bad)


def test_masks_touch_only_the_constrained_rows():
    import mlx.core as mx
    import numpy as np

    from urial_edge.runtime.sampling import apply_masks

    logits = mx.random.normal((3, 70))
    words = np.zeros((2, 3), np.int32)
    words[0, 0], words[1, 2] = 0b1010, 1 << 5  # row 0 allows tokens 1 and 3, row 2 token 69
    out = apply_masks(logits, [0, 2], words)
    assert mx.array_equal(out[1], logits[1]).item()
    assert [i for i in range(70) if out[0, i].item() > -float("inf")] == [1, 3]
    assert [i for i in range(70) if out[2, i].item() > -float("inf")] == [69]
    assert out[0, 3].item() == logits[0, 3].item()


# -- the bundled model -------------------------------------------------------------------------------


TASKS = [json.loads(line) for line in open(__file__.rsplit("/", 2)[0] + "/benchmarks/structured/tasks.jsonl")]


@pytest.mark.slow
def test_bundled_model_answers_valid_json_and_fast_forward_is_exact(bundled):
    bot = Assistant.load(max_tokens=160)
    tasks = [t for t in TASKS if "array" not in json.dumps(t["schema"])][:6]  # short answers, mostly complete
    queries = [f"{t['instruction']}\n\n{t['input']}" for t in tasks]

    def run(fast_forward, size):
        bot.engine.fast_forward = fast_forward
        requests = [bot.request(q, schema=t["schema"]) for q, t in zip(queries, tasks)] + [bot.request(queries[0])]
        return list(bot.run(requests, size))

    reference = run(False, 1)  # token by token, one at a time
    fast, batched = run(True, 1), run(True, 4)
    bot.engine.fast_forward = True
    assert [a.token_ids for a in fast] == [a.token_ids for a in batched] == [a.token_ids for a in reference]
    for t, a in zip(tasks, batched):
        if a.finish_reason == "stop":
            jsonschema.validate(a.value, t["schema"])
        else:
            assert a.finish_reason == "length" and a.value is None
    assert sum(a.finish_reason == "stop" for a in batched[:-1]) >= 4
    assert sum(a.stats.generation_tokens for a in fast) == sum(a.stats.generation_tokens for a in reference)
    assert batched[-1].token_ids == bot.ask(queries[0]).token_ids  # the unconstrained row, as alone
