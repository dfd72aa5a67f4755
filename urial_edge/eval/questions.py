"""Question sets for ``urial-edge eval``: MT-Bench's shape or ``{"id", "query"}`` lines, checked line by line."""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Union

from ..disk.paths import package_data
from ..errors import UrialError

Id = Union[str, int]


@dataclass
class Question:
    id: Id
    category: str
    turns: List[str]
    harmful: bool = False
    schema: Optional[dict] = None  # a JSON Schema every answer to it must follow (structured output)


def default_questions() -> Path:
    """Our own question set, shipped with the package."""
    return package_data("eval", "questions.jsonl")


class QuestionError(ValueError):
    """A question line that is valid JSON but not a question."""


def load_questions(path: Path) -> List[Question]:
    """Questions in MT-Bench's shape (``question_id``, ``category``, ``turns``) or as ``{"id", "query"}``.

    Optional ``category``, ``harmful`` (true for requests an aligned assistant should decline) and ``schema``
    (a JSON Schema the answers must follow). Any bad line is a one-line error naming it.
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
    category, harmful, schema = item.get("category", ""), item.get("harmful", False), item.get("schema")
    if not isinstance(category, str) or not isinstance(harmful, bool):
        raise QuestionError("'category' must be a string and 'harmful' true or false")
    if schema is not None and not isinstance(schema, dict):
        raise QuestionError("'schema' must be a JSON Schema (an object)")
    return Question(qid, category, turns, harmful, schema)
