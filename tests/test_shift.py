"""The token-distribution-shift analysis: teacher-forced ranks (cached = full pass, batched = single), chat
templates, answers from another model (re-tokenized, or KL with a shared tokenizer), bad input, the report
files, resuming, and ``eval --reference``; on tiny random-weight models and (slow) on the bundled model."""

import html.parser
import json
import math
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import make_tiny_gguf, make_tiny_model, smollm2_gguf
from urial_edge.cli.main import cli
from urial_edge.errors import UrialError
from urial_edge.eval import shift
from urial_edge.eval.shift_report import REPORT_FILES
from urial_edge.runtime import scoring
from urial_edge.runtime.chat_template import ChatTemplate

ANSWERS = [
    {"id": 1, "query": "What is one plus one?", "answer": "One plus one is two. <b>&amp;</b> caf\u00e9 \u6771\u4eac"},
    {"id": "b", "query": "Name a colour.", "answer": "Blue.\n```python\nprint(1)\n```\nThat is all."},
    {"id": 3, "query": "Why is the sky blue?",
     "answer": "Because of Rayleigh scattering: shorter wavelengths scatter more, so the sky looks blue by day."},
]
TINY_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<eos>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>'"
    " + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt"
    " %}{{ '<|im_start|>assistant\\n' }}{% endif %}")


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.fixture
def answers_file(tmp_path):
    return write_jsonl(tmp_path / "answers.jsonl", ANSWERS)


def run_shift(*argv):
    return CliRunner().invoke(cli, ["shift", *map(str, argv)], catch_exceptions=False)


def full_pass(model, tokens, answer):
    """The oracle: the model's own forward pass over the whole text, no cache; ranks and log-probs in numpy."""
    import mlx.core as mx

    logits = np.array(model(mx.array([tokens[:-1]]))[0, -answer:].astype(mx.float32))
    targets = np.array(tokens[-answer:])
    chosen = logits[np.arange(answer), targets]
    top = logits.max(axis=1)
    lse = top + np.log(np.exp(logits - top[:, None]).sum(axis=1))
    return (logits > chosen[:, None]).sum(axis=1) + 1, chosen - lse, logits - lse[:, None]


# -- ranks ----------------------------------------------------------------------------------------------


def test_rank_counts_only_greater_logits_and_top_is_the_first_highest():
    logits = np.array([[1.0, 3.0, 3.0, 2.0], [5.0, 5.0, 1.0, 0.0], [0.0, 1.0, 2.0, 3.0]], dtype=np.float32)
    ranks, logprobs, top, top_logprobs, _ = scoring._reduce(logits, np.array([2, 1, 0]))
    assert ranks.tolist() == [1, 1, 4]  # a tie for the top counts as unshifted
    assert top.tolist() == [1, 0, 3]  # greedy's choice among ties: the first id
    softmax = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert np.allclose(np.exp(logprobs), softmax[[0, 1, 2], [2, 1, 0]]) and np.allclose(np.exp(top_logprobs),
                                                                                    softmax.max(axis=1))
    assert [shift.category(r) for r in (1, 2, 3, 4, 50)] == ["unshifted", "marginal", "marginal", "shifted", "shifted"]


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_cached_ranks_equal_a_full_pass(home, tiny_gemma, tiny_llama, prompt_file, arch):
    """From the cached prefix (past the sliding window of 16, so rotating caches have wrapped), several rows of
    different lengths padded together and fed in chunks of 7: the same ranks as one plain forward pass."""
    base = shift.Base(str(tiny_gemma if arch == "gemma3" else tiny_llama))
    items = [shift.Item(a["id"], a["query"], a["answer"]) for a in ANSWERS]
    prepared = shift.prepare(base, shift.conditions([prompt_file])[0], items, "test")
    assert len(prepared.prefix) > 16 * 3
    base.scorer.step = 7
    scored = dict(scoring.score(base.scorer, prepared.seqs, prepared.state(), batch_size=3))
    for i, seq in enumerate(prepared.seqs):
        ranks, logprobs, _ = full_pass(base.model, prepared.prefix + seq.tokens, seq.answer)
        assert scored[i].ranks == ranks.tolist()
        assert np.allclose(scored[i].logprobs, logprobs, atol=1e-4)
        plain = scoring.score_hidden(base.scorer, base.scorer.full_hidden(prepared.prefix + seq.tokens, seq.answer),
                                     seq.tokens[-seq.answer:])
        assert plain.ranks == scored[i].ranks and plain.top_ids == scored[i].top_ids


def test_batched_equals_single_and_head_chunks_do_not_matter(home, tiny_gemma, prompt_file, monkeypatch):
    base = shift.Base(str(tiny_gemma))
    items = [shift.Item(a["id"], a["query"], a["answer"]) for a in ANSWERS]
    for condition in shift.conditions(["none", prompt_file]):
        prepared = shift.prepare(base, condition, items, "test")
        together = dict(scoring.score(base.scorer, prepared.seqs, prepared.state(), batch_size=8))
        monkeypatch.setattr(scoring, "SCORE_ELEMENTS", 5 * base.scorer.vocab)  # 5 positions per head chunk
        alone = dict(scoring.score(base.scorer, prepared.seqs, prepared.state(), batch_size=1))
        monkeypatch.undo()
        for i in range(len(items)):
            assert together[i].ranks == alone[i].ranks and together[i].top_ids == alone[i].top_ids
            assert np.allclose(together[i].logprobs, alone[i].logprobs, atol=1e-5)


def test_bare_query_is_bos_and_the_frame_only(home, tiny_gemma):
    base = shift.Base(str(tiny_gemma))
    item = shift.Item(1, "Hi?", "Hello.")
    prepared = shift.prepare(base, shift.conditions(["none"])[0], [item], "test")
    seq = prepared.seqs[0]
    assert prepared.prefix == [] and prepared.state() is None
    assert base.tokenizer.decode(seq.tokens[:-seq.answer]) == "<bos># Query:\n```\nHi?\n```\n\n# Answer:\n```\n"
    assert base.tokenizer.decode(seq.tokens[-seq.answer:]) == "Hello."


# -- chat templates and the GGUF importer --------------------------------------------------------------


GEMMA_LIKE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}"
              "{% else %}{% set role = m['role'] %}{% endif %}<start_of_turn>{{ role }}\n{{ m['content'] | trim }}"
              "<end_of_turn>\n{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")


SMOLLM2_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.mark.parametrize("source,end,turn", [
    (SMOLLM2_TEMPLATE, "<|im_end|>", SMOLLM2_SYSTEM + "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n"),
    (GEMMA_LIKE, "<end_of_turn>", "<bos><start_of_turn>user\n{}<end_of_turn>\n<start_of_turn>model\n")])
def test_chat_template_renders_the_user_turn_and_finds_the_end_of_turn(source, end, turn):
    template = ChatTemplate(source, "<bos>", "<eos>")
    for query in ("Hi", "  Two lines\nand {{ braces }} "):  # the message is text, never template code
        shown = query.strip() if source is GEMMA_LIKE else query  # (that template trims it)
        assert template.prompt(query) == turn.format(shown)
    assert template.end_of_turn() == end
    refusing = ChatTemplate("{{ raise_exception('only system and user roles') }}", name="m")
    with pytest.raises(UrialError, match="the chat template of m failed: only system and user roles"):
        refusing.prompt("Hi")
    with pytest.raises(UrialError, match="the chat template of m does not compile"):
        ChatTemplate("{% for %}", name="m").prompt("Hi")


def test_gguf_import_keeps_the_chat_template(tmp_path, home):
    from urial_edge.model import gguf_import

    target = tmp_path / "model"
    gguf_import.import_gguf(make_tiny_gguf(tmp_path / "t.gguf", chat_template=TINY_TEMPLATE), target)
    assert json.loads((target / "tokenizer_config.json").read_text())["chat_template"] == TINY_TEMPLATE
    assert ChatTemplate.of_model(target).end_of_turn() == "<eos>"
    assert gguf_import.FORMAT_VERSION >= 3  # imports made before templates were kept are redone
    gguf_import.import_gguf(make_tiny_gguf(tmp_path / "u.gguf"), tmp_path / "plain")
    with pytest.raises(UrialError, match="has no chat template"):
        ChatTemplate.of_model(tmp_path / "plain")


def chat_model(path, seed, tokenizer_from=None, gpt2_split=False):
    """A tiny 'instruction-tuned' model: random weights with a chat template (and another model's tokenizer)."""
    make_tiny_model(path, "llama", seed=seed, gpt2_split=gpt2_split)
    if tokenizer_from is not None:
        shutil.copy(tokenizer_from / "tokenizer.json", path / "tokenizer.json")
    config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TINY_TEMPLATE}))
    return path


# -- answers from an aligned model ----------------------------------------------------------------------


def test_answers_from_another_tokenizer_are_retokenized_and_have_no_kl(home, tiny_gemma, prompt_file, tmp_path):
    # seed 4: a random model whose answers are not all empty (seed 3's end at their first token, which
    # the tool rightly refuses to score); tiny models are the same in every process (testing/tiny_models.py)
    aligned = chat_model(tmp_path / "aligned", seed=4, gpt2_split=True)
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": a["id"], "query": a["query"]} for a in ANSWERS])
    out = tmp_path / "out"
    result = run_shift(queries, "-o", out, "-m", tiny_gemma, "-p", prompt_file, "--aligned-model", aligned,
                       "--aligned-max-tokens", 12)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["answers"]["retokenized"] is True and report["answers"]["kl"] is False
    assert "re-tokenized with gemma3's" in " ".join(report["notes"])
    assert "re-tokenized" in (out / "report.md").read_text() and "mean KL" not in (out / "report.md").read_text()
    generated = {json.loads(x)["id"]: json.loads(x) for x in (out / "aligned.jsonl").read_text().splitlines()}
    assert all(g["tokens"] <= 12 for g in generated.values())
    base = shift.Base(str(tiny_gemma))
    for line in (out / "scores.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert "kl" not in record
        assert base.tokenizer.decode(record["tokens"]) == generated[record["item"]]["answer"]


def test_kl_with_a_shared_tokenizer_matches_both_full_passes(home, tiny_gemma, prompt_file, tmp_path):
    aligned = chat_model(tmp_path / "aligned", seed=5, tokenizer_from=tiny_gemma)
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": a["id"], "query": a["query"]} for a in ANSWERS[:2]])
    out = tmp_path / "out"
    result = run_shift(queries, "-o", out, "-m", tiny_gemma, "-p", "none", "--aligned-model", aligned,
                       "--aligned-max-tokens", 10)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["answers"]["kl"] is True and report["answers"]["retokenized"] is False
    assert report["conditions"][0]["mean_kl"] > 0 and "mean KL" in result.stdout
    base, helper = shift.Base(str(tiny_gemma)), shift.Aligned(str(aligned))
    record = json.loads((out / "scores.jsonl").read_text().splitlines()[0])
    item = next(a for a in ANSWERS if a["id"] == record["item"])
    answer = record["tokens"]
    frame = base.tokenizer.encode(shift.urial.render_turn(item["query"]), bos=True)
    _, _, base_logp = full_pass(base.model, frame + answer, len(answer))
    _, _, their_logp = full_pass(helper.model, helper.prompt_ids(item["query"]) + answer, len(answer))
    kl = (np.exp(their_logp) * (their_logp - base_logp)).sum(axis=1)
    assert np.allclose(record["kl"], kl, atol=1e-4)


# -- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("line,message", [
    ('{"id": 2, "answer": "x"}', "missing field 'query'"),
    ('{"query": "q", "answer": "x"}', "missing field 'id'"),
    ('{"id": 2, "query": "q"}', "missing field 'answer'"),
    ('{"id": 2, "query": "q", "answer": "  \\n "}', "the answer is empty"),
    ('{"id": 2, "query": "q", "answer": 7}', "'answer' must be a string"),
    ('{"id": 1, "query": "q", "answer": "x"}', "duplicate id 1"),
    ('{"id": 2, "query": "q", "answer": "' + "a" * 2100 + '"}', "the answer does not fit: with the tiny prefix it "
                                                                "needs"),
    ("not json", "not valid JSON"),
])
def test_bad_input_is_a_one_line_error_naming_the_line_before_any_scoring(home, tiny_gemma, prompt_file, tmp_path,
                                                                           line, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [ANSWERS[0], line])
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["shift", str(path), "-o", str(out), "-m", str(tiny_gemma), "-p", prompt_file])
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith(f"error: {path}:2: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (out / "scores.jsonl").exists() and not (out / "report.json").exists()


def test_bad_conditions_and_usage(home, tiny_gemma, answers_file, tmp_path):
    for argv, code, match in ([["-p", "no-such-prompt"], 1, "unknown prompt 'no-such-prompt'"],
                              [["-p", "none", "-p", "none"], 1, "'none' is given twice"],
                              [["--batch-size", "0"], 2, "--batch-size"]):
        result = CliRunner().invoke(cli, ["shift", str(answers_file), "-o", str(tmp_path / "o"), "-m", str(tiny_gemma),
                                          *argv])
        assert result.exit_code == code and match in result.output, result.output


# -- the report -------------------------------------------------------------------------------------------


class Tags(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attrs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [name for name, _ in attrs]

    def handle_data(self, data):
        self.text.append(data)


def test_report_files_exist_and_the_html_needs_no_network(home, tiny_gemma, prompt_file, answers_file, tmp_path):
    out = tmp_path / "out"
    result = run_shift(answers_file, "-o", out, "-m", tiny_gemma, "-p", "none", "-p", prompt_file)
    assert result.exit_code == 0, result.output
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == ["none", "tiny"]
    for name in REPORT_FILES:
        assert (out / name).stat().st_size > 500, name
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] is True and [c["condition"] for c in report["conditions"]] == ["none", "tiny"]
    for c in report["conditions"]:
        assert c["tokens"] == sum(a["tokens"] for a in c["per_answer"]) and len(c["per_answer"]) == 3
        assert math.isclose(c["unshifted"] + c["marginal"] + c["shifted"], 1.0)
        assert sum(t["count"] for t in c["top_shifted"]) <= round(c["shifted"] * c["tokens"])
        assert sum(b["tokens"] for b in c["by_position"]) == c["tokens"]
    md = (out / "report.md").read_text()
    for heading in ("## Shares per condition", "## Shifted share by token position", "## Most frequent shifted tokens",
                    "## Per answer"):
        assert heading in md
    page = (out / "tokens.html").read_text()
    for external in ("http:", "https:", "//", "src=", "href=", "url(", "@import", "<script", "<link"):
        assert external not in page.replace("<!DOCTYPE html>", ""), external
    tags = Tags()
    tags.feed(page)
    assert "b" not in tags.tags and "<b>&amp;</b>" in "".join(tags.text)  # the answer's markup is shown, escaped
    assert tags.tags.count("details") == 3 and set(tags.attrs) <= {"lang", "charset", "class", "title", "open"}
    assert "\\```python" in "".join(tags.text)  # fences in an answer are scored as the frame escapes them


def test_interrupted_run_leaves_no_complete_report_and_resumes(home, tiny_gemma, prompt_file, answers_file,
                                                               tmp_path, monkeypatch):
    out = tmp_path / "out"
    assert run_shift(answers_file, "-o", out, "-m", tiny_gemma, "-p", "none").exit_code == 0
    real = shift.score

    def breaks_after_one(*args, **kwargs):
        for k, scored in enumerate(real(*args, **kwargs)):
            if k == 1:
                raise KeyboardInterrupt
            yield scored

    monkeypatch.setattr(shift, "score", breaks_after_one)
    stopped = CliRunner().invoke(cli, ["shift", str(answers_file), "-o", str(out), "-m", str(tiny_gemma), "-p",
                                       "none", "-p", prompt_file])
    assert stopped.exit_code == 130
    assert not any((out / name).exists() for name in REPORT_FILES)  # the earlier report is gone too
    assert len((out / "scores.jsonl").read_text().splitlines()) == 3 + 1
    monkeypatch.undo()
    again = run_shift(answers_file, "-o", out, "-m", tiny_gemma, "-p", "none", "-p", prompt_file)
    assert again.exit_code == 0, again.output
    assert "scoring tiny [##############################] 2/2" in again.stderr and "scoring none" not in again.stderr
    assert len((out / "scores.jsonl").read_text().splitlines()) == 3 + 3
    assert json.loads((out / "report.json").read_text())["complete"] is True


# -- eval --reference -------------------------------------------------------------------------------------


def test_eval_reference_columns_match_the_shift_figures(home, tiny_gemma, prompt_file, answers_file, tmp_path):
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"id": 1, "query": "Name a planet."}])
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli, ["eval", str(questions), "-o", str(out), "-m", str(tiny_gemma), "-p", prompt_file,
                                      "--preset", "default", "--preset", "urial-t0.5", "--max-tokens", "3",
                                      "--reference", str(answers_file)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "report.json").read_text())["configs"]
    figures = [(r["metrics"]["ref_unshifted"], r["metrics"]["ref_shifted"], r["metrics"]["ref_logprob"]) for r in rows]
    assert len(rows) == 2 and figures[0] == figures[1]  # decoding settings do not change teacher forcing
    md = (out / "report.md").read_text()
    assert "ref unshifted | ref shifted | ref log-prob/token" in md and "depend on the model and the prompt" in md
    assert "ref shifted" in result.stdout
    analysed = run_shift(answers_file, "-o", tmp_path / "shift", "-m", tiny_gemma, "-p", prompt_file)
    tiny = json.loads((tmp_path / "shift" / "report.json").read_text())["conditions"][0]
    assert figures[0] == (tiny["unshifted"], tiny["shifted"], tiny["mean_logprob"]), analysed.output
    without = CliRunner().invoke(cli, ["eval", str(questions), "-o", str(tmp_path / "e2"), "-m", str(tiny_gemma),
                                       "-p", prompt_file, "--max-tokens", "3"])
    assert without.exit_code == 0 and "ref shifted" not in (tmp_path / "e2" / "report.md").read_text()


def test_eval_bad_reference_fails_before_answering(home, tiny_gemma, prompt_file, tmp_path):
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"id": 1, "query": "Name a planet."}])
    bad = write_jsonl(tmp_path / "refs.jsonl", ['{"id": 1, "query": "q"}'])
    out = tmp_path / "eval"
    result = CliRunner().invoke(cli, ["eval", str(questions), "-o", str(out), "-m", str(tiny_gemma), "-p", prompt_file,
                                      "--reference", str(bad)])
    assert result.exit_code == 1 and f"{bad}:1: missing field 'answer'" in result.stderr
    assert not (out / "answers.jsonl").exists()
    both = CliRunner().invoke(cli, ["eval", "-o", str(out), "--reference", str(bad), "--no-reference"])
    assert both.exit_code == 2 and "exclude each other" in both.output


def test_our_references_answer_our_questions():
    from urial_edge.eval.questions import default_questions, load_questions

    references = shift.load_items(shift.default_references())
    first_turns = {q.id: q.turns[0] for q in load_questions(default_questions())}
    assert len(references) == 60 and {r.id: r.query for r in references} == first_turns


# -- the bundled model -------------------------------------------------------------------------------------


def bundled_items(n):
    return shift.load_items(shift.default_references())[:n]


@pytest.mark.slow
def test_bundled_cached_ranks_match_a_full_pass_except_near_ties(bundled):
    """On Gemma 3 270M (float32), from the urial-k4-direct prefix (longer than the 512-token sliding window), the
    cached, batched path and a plain full pass agree on log-probs within 1e-3, and on ranks wherever no other
    token's logit is within 1e-3 of the answer token's."""
    import mlx.core as mx

    base = shift.Base(None)
    items = bundled_items(3)
    prepared = shift.prepare(base, shift.conditions(["urial-k4-direct"])[0], items, "references")
    assert len(prepared.prefix) > 512
    cached = dict(scoring.score(base.scorer, prepared.seqs, prepared.state(), batch_size=3))
    compared = differ = 0
    for i, seq in enumerate(prepared.seqs):
        hidden = base.scorer.full_hidden(prepared.prefix + seq.tokens, seq.answer)
        plain = scoring.score_hidden(base.scorer, hidden, seq.tokens[-seq.answer:])
        assert np.allclose(cached[i].logprobs, plain.logprobs, atol=1e-3)
        for k in [k for k, (a, b) in enumerate(zip(cached[i].ranks, plain.ranks)) if a != b]:
            logits = np.array(base.scorer.head(hidden[k:k + 1]).astype(mx.float32))[0]
            target = logits[seq.tokens[-seq.answer + k]]
            assert abs(cached[i].ranks[k] - plain.ranks[k]) <= int((abs(logits - target) < 1e-3).sum())
            differ += 1
        compared += seq.answer
    assert compared > 250 and differ <= compared // 100


@pytest.mark.slow
def test_bundled_shift_and_eval_reference(bundled, tmp_path):
    refs = write_jsonl(tmp_path / "refs.jsonl", [{"id": i.id, "query": i.query, "answer": i.answer}
                                                 for i in bundled_items(3)])
    out = tmp_path / "shift"
    result = run_shift(refs, "-o", out, "-p", "none", "-p", "urial-k1")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    none, k1 = report["conditions"]
    assert none["tokens"] == k1["tokens"] > 300 and report["complete"]
    assert k1["mean_logprob"] > none["mean_logprob"]  # the prefix makes our restyled answers likelier
    assert k1["prefix_tokens"] > 400 and none["prefix_tokens"] == 0
    questions = write_jsonl(tmp_path / "questions.jsonl", [{"id": 1, "query": "Name a planet."}])
    ev = CliRunner().invoke(cli, ["eval", str(questions), "-o", str(tmp_path / "eval"), "-p", "urial-k1",
                                  "--max-tokens", "4", "--reference", str(refs)], catch_exceptions=False)
    assert ev.exit_code == 0, ev.output
    row = json.loads((tmp_path / "eval" / "report.json").read_text())["configs"][0]["metrics"]
    assert (row["ref_unshifted"], row["ref_shifted"], row["ref_logprob"]) == (k1["unshifted"], k1["shifted"],
                                                                              k1["mean_logprob"])


@pytest.mark.slow
def test_bundled_shift_of_smollm2_answers_retokenized(bundled, tmp_path):
    from urial_edge.model import gguf_import

    smol = tmp_path / "SmolLM2-135M-Instruct"
    gguf_import.import_gguf(smollm2_gguf(), smol)
    queries = write_jsonl(tmp_path / "q.jsonl", [{"id": 1, "query": "What is the capital of France?"},
                                                 {"id": 2, "query": "Name three primary colours."}])
    out = tmp_path / "out"
    result = run_shift(queries, "-o", out, "-p", "urial-k1", "--aligned-model", smol, "--aligned-max-tokens", 32)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["answers"] == {"source": "SmolLM2-135M-Instruct", "count": 2,
                                 "aligned_model": "SmolLM2-135M-Instruct", "retokenized": True, "kl": False}
    generated = [json.loads(x) for x in (out / "aligned.jsonl").read_text().splitlines()]
    assert "Paris" in generated[0]["answer"] and "<|im_end|>" not in generated[0]["answer"]
    assert generated[0]["finish_reason"] == "stop"  # it ended its turn (<|im_end|>) by itself
