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

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

from ..disk.paths import ensure_dir
from ..disk.results import append_results, other_setup, read_results
from ..errors import UrialError
from ..model.registry import load_registry
from ..runtime.assistant import Assistant
from ..runtime.constraints import Constraint, for_item, item_digest
from ..runtime.options import GenerationOptions
from ..runtime.prompt import DEFAULT_PROMPT
from .questions import Id, Question

ANSWERS = "answers.jsonl"


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
    return load_registry()[0]


def answer_id(config: Config, question: Question, turn: int) -> str:
    return f"{config.name} #{question.id} #{turn}"


def check_setup(records: Dict[Id, dict], configs: Sequence[Config], questions: Sequence[Question],
                constraint: Optional[Constraint], path: Path) -> None:
    """A config's earlier answers must have been made with the same options, and each question's with the
    constraint it gets now (its own schema, or the run's constraint)."""
    options = {c.name: c.options.to_json() for c in configs}
    constraints = {q.id: item_digest(q.schema, constraint) for q in questions}

    def wanted(record: dict) -> Optional[dict]:
        if record.get("config") not in options or record.get("question_id") not in constraints:
            return None
        return {"options": options[record["config"]], "constraint": constraints[record["question_id"]]}

    other = other_setup(records, wanted)
    if other is not None:
        raise UrialError(f"{path} holds answers of {other['config']!r} made with other options or another "
                         "constraint; use another output directory or the same options")


def run(questions: List[Question], configs: List[Config], out: Path, batch_size: int = 8,
        constraint=None) -> Dict[Id, dict]:
    """Answer every question under every config, appending to ``out/answers.jsonl``; skip what is there.

    ``constraint`` (structured output) applies to every answer but those of questions with their own schema.
    """
    path = ensure_dir(out) / ANSWERS
    records = read_results(path)
    check_setup(records, configs, questions, constraint, path)
    groups: Dict[tuple, List[Config]] = {}
    for c in configs:
        groups.setdefault((c.model, c.prompt), []).append(c)
    for (model, prompt), group in groups.items():
        if all(answer_id(c, q, t) in records for c in group for q in questions for t in range(1, len(q.turns) + 1)):
            continue
        bot = Assistant.load(model, prompt, batch_size=batch_size)
        for turn in range(1, max(len(q.turns) for q in questions) + 1):
            todo = [(c, q) for c in group for q in questions
                    if len(q.turns) >= turn and answer_id(c, q, turn) not in records]
            if todo:
                _answer_turn(bot, todo, turn, records, path, batch_size, constraint)
    return records


def _answer_turn(bot, todo, turn: int, records: Dict[Id, dict], path: Path, batch_size: int, constraint) -> None:
    """Turn ``turn`` of every (config, question) in ``todo``, in one batched run, each line saved as it ends."""
    requests = []
    for c, q in todo:
        history = [(q.turns[k - 1], records[answer_id(c, q, k)]["text"]) for k in range(1, turn)]
        try:
            requests.append(bot.request(q.turns[turn - 1], history=history, remember=False,
                                        **for_item(q.schema, constraint), **asdict(c.options)))
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
