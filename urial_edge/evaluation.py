"""``urial-edge eval``: answer a question set under many configs and compare them.

A *config* is one model, one URIAL prompt and one decoding setting (a preset
plus any option given on the command line). Every config answers every
question through the batched engine; multi-turn questions run as conversations
(turn k of every question is one batch, each request carrying its own history).

Everything lands in an output directory, so an interrupted run continues where
it stopped and a report can be rebuilt from the files alone:

- ``answers.jsonl``: one line per config, question and turn (text, finish reason, stats, options);
- ``judgments.jsonl``: one line per judge verdict (when a judge is given);
- ``report.json``, ``report.md`` and ``report.png``: one row per config.
"""

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Union

from . import metrics
from .errors import UrialError
from .files import atomic_file, write_text_atomic
from .options import GenerationOptions
from .paths import ensure_dir, package_data
from .prompt import DEFAULT_PROMPT
from .results import append_results, read_results

Id = Union[str, int]
ANSWERS, JUDGMENTS = "answers.jsonl", "judgments.jsonl"


@dataclass
class Question:
    id: Id
    category: str
    turns: List[str]
    harmful: bool = False


@dataclass
class Config:
    """One model, prompt and decoding setting; ``name`` labels its answers and its report row."""

    model: Optional[str]
    prompt: Optional[str]
    setting: str
    options: GenerationOptions
    model_label: str = field(init=False)
    name: str = field(init=False)

    def __post_init__(self):
        self.model_label = _label(self.model, default_model())
        self.name = f"{self.model_label} / {_label(self.prompt, DEFAULT_PROMPT, stem=True)} / {self.setting}"


def _label(spec: Optional[str], default: str, stem: bool = False) -> str:
    if not spec:
        return default
    path = Path(spec)
    return (path.stem if stem else path.name) if path.exists() else spec


def default_model() -> str:
    from .models import load_registry

    return load_registry()[0]


def default_questions() -> Path:
    """Our own question set, shipped with the package."""
    return package_data("eval", "questions.jsonl")


# -- questions -----------------------------------------------------------------------------


class QuestionError(ValueError):
    """A question line that is valid JSON but not a question."""


def load_questions(path: Path) -> List[Question]:
    """Questions in MT-Bench's shape (``question_id``, ``category``, ``turns``) or as ``{"id", "query"}``.

    Optional ``category`` and ``harmful`` (true for requests an aligned assistant should decline).
    Any bad line is a one-line error naming it.
    """
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise UrialError(f"cannot read {path}: {e.strerror}") from None
    questions, seen = [], set()
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            q = _question(json.loads(raw.decode("utf-8")))
        except (UnicodeDecodeError, ValueError) as e:
            raise UrialError(f"{path}:{number}: {e if isinstance(e, QuestionError) else 'not valid JSON'}") from None
        if q.id in seen:
            raise UrialError(f"{path}:{number}: duplicate id {q.id!r}")
        seen.add(q.id)
        questions.append(q)
    if not questions:
        raise UrialError(f"{path} has no questions")
    return questions


def _question(item) -> Question:
    if not isinstance(item, dict):
        raise QuestionError("not a JSON object")
    if "turns" in item:
        qid, turns = item.get("question_id", item.get("id")), item["turns"]
    else:
        qid, turns = item.get("id"), [item.get("query")]
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise QuestionError("needs a 'question_id' (or 'id') that is a string or an integer")
    if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
        raise QuestionError("needs 'turns' (a list of non-empty strings) or a non-empty 'query'")
    category, harmful = item.get("category", ""), item.get("harmful", False)
    if not isinstance(category, str) or not isinstance(harmful, bool):
        raise QuestionError("'category' must be a string and 'harmful' true or false")
    return Question(qid, category, turns, harmful)


# -- answering -----------------------------------------------------------------------------


def answer_id(config: Config, question: Question, turn: int) -> str:
    return f"{config.name} #{question.id} #{turn}"


def check_options(records: Dict[Id, dict], configs: Sequence[Config], path: Path) -> None:
    """A config's earlier answers must have been made with the same options."""
    wanted = {c.name: c.options.to_json() for c in configs}
    for r in records.values():
        if r.get("config") in wanted and r.get("options") != wanted[r["config"]]:
            raise UrialError(f"{path} holds answers of {r['config']!r} made with other options; "
                             "use another output directory or the same options")


def run(questions: List[Question], configs: List[Config], out: Path, batch_size: int = 8) -> Dict[Id, dict]:
    """Answer every question under every config, appending to ``out/answers.jsonl``; skip what is there."""
    path = ensure_dir(out) / ANSWERS
    records = read_results(path)
    check_options(records, configs, path)
    groups: Dict[tuple, List[Config]] = {}
    for c in configs:
        groups.setdefault((c.model, c.prompt), []).append(c)
    for (model, prompt), group in groups.items():
        if all(answer_id(c, q, t) in records for c in group for q in questions for t in range(1, len(q.turns) + 1)):
            continue
        from .assistant import Assistant

        bot = Assistant.load(model, prompt, batch_size=batch_size)
        for turn in range(1, max(len(q.turns) for q in questions) + 1):
            todo = [(c, q) for c in group for q in questions
                    if len(q.turns) >= turn and answer_id(c, q, turn) not in records]
            if todo:
                _answer_turn(bot, todo, turn, records, path, batch_size)
    return records


def _answer_turn(bot, todo, turn: int, records: Dict[Id, dict], path: Path, batch_size: int) -> None:
    """Turn ``turn`` of every (config, question) in ``todo``, in one batched run, each line saved as it ends."""
    from dataclasses import asdict

    requests = []
    for c, q in todo:
        history = [(q.turns[k - 1], records[answer_id(c, q, k)]["text"]) for k in range(1, turn)]
        try:
            requests.append(bot.request(q.turns[turn - 1], history=history, remember=False, **asdict(c.options)))
        except UrialError as e:
            raise UrialError(f"question {q.id!r}, turn {turn}: {e}") from None

    def lines() -> Iterator[dict]:
        for (c, q), answer in zip(todo, bot.run(requests, batch_size)):
            record = {"config": c.name, "model": c.model_label,
                      "prompt": bot.prompt.name, "setting": c.setting, "question_id": q.id, "turn": turn,
                      "category": q.category, "harmful": q.harmful, "query": q.turns[turn - 1], **answer.as_dict()}
            records[answer_id(c, q, turn)] = {"id": answer_id(c, q, turn), **record}
            yield record

    append_results(path, [answer_id(c, q, turn) for c, q in todo], lines())


# -- the report ------------------------------------------------------------------------------


@dataclass
class Row:
    """One config's line of the report."""

    config: str
    model: str
    prompt: str
    setting: str
    options: dict
    metrics: dict
    judge: dict = field(default_factory=dict)


def config_rows(questions: List[Question], configs: List[Config], records: Dict[Id, dict]) -> List[Row]:
    """Judge-free metrics of every config, from its answers."""
    from .prompt import load_prompt

    rows = []
    for c in configs:
        grams = metrics.example_grams(load_prompt(c.prompt).examples)
        found = [records[i] for q in questions for t in range(1, len(q.turns) + 1)
                 if (i := answer_id(c, q, t)) in records]
        per_answer = [{**metrics.answer_metrics(r["text"], r["finish_reason"], r["harmful"], grams),
                       "tokens": r["tokens"], "ttft": _ttft(r["stats"]), "tps": r["stats"]["generation_tps"],
                       "category": r["category"]} for r in found]
        total = metrics.aggregate(per_answer)
        total["sensitive_refused"] = metrics.aggregate(
            [m for m in per_answer if m["category"] == "sensitive"])["unwarranted_apology"]
        rows.append(Row(c.name, c.model_label, found[0]["prompt"] if found else str(c.prompt),
                        c.setting, c.options.to_json(), total))
    return rows


def _ttft(stats: dict) -> float:
    """From admission into the batch to the first token: an eval submits everything at once, so the
    time a request waits for its turn says how long the run is, not how fast an answer starts."""
    return stats["ttft"] - stats.get("queue_seconds", 0.0)


COLUMNS = (  # (metrics key, heading, as a percentage)
    ("frame_held", "frame held", True), ("clean_stop", "clean stop", True), ("empty", "empty", True),
    ("copying", "example copying", True), ("copying_4", "copying (4-grams)", True),
    ("unwarranted_apology", "apology/refusal on harmless", True),
    ("sensitive_refused", "of which sensitive-sounding", True), ("declined", "harmful declined", True),
    ("distinct_2", "distinct-2", False), ("tokens", "tokens", False), ("ttft", "ttft s", False),
    ("tps", "tok/s", False),
)


def _cell(value, percent: bool) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}%" if percent else f"{value:.2f}" if value < 10 else f"{value:.0f}"


def write_report(rows: List[Row], out: Path, questions_file: Path, name: str = "report", notes: str = "") -> dict:
    """``NAME.json``, ``NAME.md`` and (with matplotlib) ``NAME.png`` in ``out``; ``notes`` go under the title."""
    report = {"questions": str(questions_file), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
              "configs": [vars(r) for r in rows]}
    write_text_atomic(out / f"{name}.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    write_text_atomic(out / f"{name}.md", markdown(rows, questions_file, notes))
    chart(rows, out / f"{name}.png")
    return report


def markdown(rows: List[Row], questions_file: Path, notes: str = "") -> str:
    judge_keys = sorted({k for r in rows for k in r.judge})
    head = ["config", "answers"] + [h for _, h, _ in COLUMNS] + [f"judge {k}" for k in judge_keys]
    lines = [f"# urial-edge eval on {questions_file.name}", ""] + ([notes, ""] if notes else []) + \
        ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r.config, str(r.metrics["answers"])] + [_cell(r.metrics[k], p) for k, _, p in COLUMNS]
        cells += [_cell(r.judge.get(k), k.endswith("rate")) for k in judge_keys]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Rates are shares of the answers they apply to (see README, \"Measuring answer quality\"); "
              "ttft is the median, tokens and tok/s are means."]
    return "\n".join(lines) + "\n"


CHART = ("frame_held", "clean_stop", "copying", "unwarranted_apology", "declined")


def chart(rows: List[Row], path: Path) -> None:
    """Grouped bars of the rate metrics, one group per config (skipped, with a warning, without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        from .log import warn

        warn(f"{path.name} not drawn: matplotlib is not installed (pip install matplotlib)")
        return
    headings = dict((k, h) for k, h, _ in COLUMNS)
    fig, ax = plt.subplots(figsize=(12, 1.2 + 0.9 * len(rows)))
    height = 0.8 / len(CHART)
    for j, key in enumerate(CHART):
        values = [100 * (r.metrics[key] or 0) for r in rows]
        ax.barh([i + j * height for i in range(len(rows))], values, height, label=headings[key])
    ax.set_yticks([i + 0.4 - height / 2 for i in range(len(rows))], [r.config for r in rows])
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("% of answers")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")
    ax.set_title("Judge-free metrics per config")
    fig.tight_layout()
    with atomic_file(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def summary(row: Row) -> str:
    """One line per config for the terminal."""
    m = row.metrics
    return (f"{row.config}: frame {_cell(m['frame_held'], True)}, clean stop {_cell(m['clean_stop'], True)}, "
            f"copying {_cell(m['copying'], True)}, apology/refusal on harmless "
            f"{_cell(m['unwarranted_apology'], True)}, harmful declined {_cell(m['declined'], True)}"
            + "".join(f", {k} {_cell(v, k.endswith('rate'))}" for k, v in row.judge.items()))


# -- judging ---------------------------------------------------------------------------------


def judge_rows(rows: List[Row], judge, mode: str, questions: List[Question], configs: List[Config],
               records: Dict[Id, dict], out: Path) -> None:
    """Score the answers with ``judge`` (``aspects``, ``grade`` or ``pairwise``) and put the totals in ``rows``.

    Each verdict is appended to ``out/judgments.jsonl`` as it comes, so a judge that fails midway
    loses nothing: the next run asks only for the verdicts still missing.
    """
    path = out / JUDGMENTS
    verdicts = read_results(path)
    todo = [(c, q, t) for c in configs for q in questions for t in range(1, len(q.turns) + 1)
            if answer_id(c, q, t) in records]
    if mode == "pairwise":  # each config against the first, on first turns (later turns' contexts differ)
        todo = [(c, q, 1) for c, q, t in todo if c is not configs[0] and t == 1
                and answer_id(configs[0], q, 1) in records]
    against = f" vs {configs[0].name}" if mode == "pairwise" else ""  # another first config: other verdicts
    ids = [f"{mode} {answer_id(c, q, t)}{against}" for c, q, t in todo]

    def lines() -> Iterator[dict]:
        for i, (c, q, t) in zip(ids, todo):
            if i not in verdicts:
                verdicts[i] = {"id": i, "mode": mode, "config": c.name, "question_id": q.id, "turn": t,
                               **_verdict(judge, mode, q, t, records, c, configs[0])}
                yield {k: v for k, v in verdicts[i].items() if k != "id"}

    append_results(path, [i for i in ids if i not in verdicts], lines(), "judging")
    for row, c in zip(rows, configs):
        row.judge = judge_totals(mode, [verdicts[i] for i, (d, _, _) in zip(ids, todo) if d is c])


def _verdict(judge, mode: str, q: Question, turn: int, records: Dict[Id, dict], c: Config, base: Config) -> dict:
    from . import judge as j

    if mode == "pairwise":
        return j.compare(judge, q.turns[0], records[answer_id(c, q, 1)]["text"],
                         records[answer_id(base, q, 1)]["text"])
    turns = [(q.turns[k - 1], records[answer_id(c, q, k)]["text"]) for k in range(1, turn + 1)]
    messages, parse = (j.aspect_messages(turns), j.parse_aspects) if mode == "aspects" else \
        (j.grade_messages(turns), j.parse_grade)
    value, replies = j.verdict(judge, messages, parse)
    return {"value": value, "unparseable": int(value is None), "replies": replies}


def judge_totals(mode: str, verdicts: List[dict]) -> dict:
    """Mean scores of one config's verdicts, and the share the judge left unreadable."""
    from .judge import ASPECTS

    if not verdicts:
        return {}
    if mode == "pairwise":
        scores = [v["x_score"] for v in verdicts]
        return {"win rate vs first": metrics.mean(scores),
                "unparseable rate": sum(v["unparseable"] for v in verdicts) / (2 * len(verdicts))}
    values = [v["value"] for v in verdicts if v["value"] is not None]
    totals = {a: metrics.mean(v[a] for v in values) for a in ASPECTS} if mode == "aspects" else {}
    totals["score"] = metrics.mean(sum(v.values()) / len(v) for v in values) if mode == "aspects" else \
        metrics.mean(values)
    totals["unparseable rate"] = sum(v["unparseable"] for v in verdicts) / len(verdicts)
    return totals
