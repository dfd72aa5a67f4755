"""``urial-edge batch``: answer every ``{"id", "query"}`` line of a JSONL file (or standard input), resumably.

Lines are answered in input order into a results file (``disk/results.py``), each flushed to disk
before the next; a rerun skips the ids already answered. Nothing is written over data that is not
ours: the output may not be the input itself, an existing output must hold our results only, and a
rerun with other generation options or another constraint is refused (its lines would mix two setups).
A bad line is that line's error (exit 3); the others are answered. A line's own ``"schema"`` (a JSON
Schema) constrains its answer instead of the command line's constraint.
"""

import sys
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

import click

from ..disk.results import append_results, other_setup, read_results
from ..distributed import world as distributed
from ..errors import UrialError
from ..runtime import validate
from ..runtime.constraints import Constraint, for_item, item_digest
from ..runtime.options import GenerationOptions
from .group import EXIT_BATCH_INVALID
from .options import (constraint_options, generation_options, load_assistant, load_options, split_constraint,
                      split_generation, standard_input)

BOM = b"\xef\xbb\xbf"
Line = Tuple[int, object, Optional[str], object, Optional[str]]  # (line number, id, query, schema, problem)


def input_lines(path: Path) -> Iterable[bytes]:
    """The lines of ``path`` (``-``: standard input), a UTF-8 byte order mark dropped."""
    if str(path) == "-":
        data = standard_input("standard input is closed: nothing to answer").buffer.read()
    else:
        try:
            data = path.read_bytes()
        except OSError as e:
            raise UrialError(f"cannot read {path}: {e.strerror}") from None
    return (data[len(BOM):] if data.startswith(BOM) else data).splitlines()


def parse_line(number: int, raw: bytes) -> Tuple[Line, bool]:
    """One line as ``(number, id, query, schema, problem)`` (``schema``: the line's own, or None), and whether its
    id was given (else it is ``number``)."""
    try:
        item = validate.loads(raw, "the line")
    except UrialError as e:
        return (number, None, None, None, str(e)), False
    if not isinstance(item, dict):
        return (number, None, None, None, "not a JSON object"), False
    query, item_id = item.get("query"), item.get("id", number)
    try:
        if isinstance(item_id, str):
            validate.text(item_id, "'id'")
        if isinstance(query, str):
            validate.text(query, "'query'")
    except UrialError as e:
        return (number, None, None, None, str(e)), False
    if not isinstance(query, str) or not query.strip():
        return (number, item_id, None, None, "missing or empty 'query'"), "id" in item
    if not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
        return (number, None, None, None, "'id' must be a string or an integer"), False
    return (number, item_id, query, item.get("schema"), None), "id" in item


def read_batch(path: Path) -> List[Line]:
    """Every non-blank line of a JSONL file. A line without an ``id`` is known by its line number, unless
    that number is another line's id (then it is refused: its answer would be taken for that line's)."""
    parsed = [parse_line(n, raw) for n, raw in enumerate(input_lines(path), 1) if raw.strip()]
    given = {}
    for (n, item_id, _, _, _), explicit in parsed:
        if explicit:
            given.setdefault(item_id, n)
    lines = []
    for (n, item_id, query, schema, problem), explicit in parsed:
        if not explicit and problem is None and given.get(n, n) != n:
            problem = f"no 'id', and its line number {n} is the id of line {given[n]}; give this line an id"
        lines.append((n, item_id, query, schema, problem))
    return lines


def read_inputs(infile: Path, out: Path, options: GenerationOptions,
                constraint: Optional[Constraint]) -> Tuple[List[Line], list]:
    """The input lines and the ids already answered in ``out``, checked before anything is written: each
    line's earlier answer was made with these options and the constraint it gets now."""
    finished = read_results(out, source=None if str(infile) == "-" else infile)
    items = read_batch(infile)
    wanted = options.to_json()
    setups = {item_id: {"options": wanted, "constraint": item_digest(schema, constraint)}
              for _, item_id, _, schema, problem in items if not problem}
    other = other_setup(finished, lambda record: setups.get(record["id"]))
    if other is not None:
        raise UrialError(f"{out} holds answers made with other options or another constraint (id {other['id']!r}); "
                         "use another output file or the same options")
    return items, list(finished)


def plan(items: List[Line], finished: set) -> Tuple[list, list]:
    """The lines still to answer, and the invalid ones (with their problems)."""
    invalid = [(n, problem) for n, _, _, _, problem in items if problem]
    todo, seen = [], set(finished)
    for n, item_id, query, schema, problem in items:
        if problem:
            continue
        if item_id in seen:
            if item_id not in finished:
                invalid.append((n, f"duplicate id {item_id!r}"))
            continue
        seen.add(item_id)
        todo.append((n, item_id, query, schema))
    return todo, invalid


@click.command()
@click.argument("infile", type=click.Path(path_type=Path))
@click.option("--output", "-o", "out", required=True, type=click.Path(path_type=Path), help="JSONL results file.")
@click.option("--batch-size", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Answers decoded together.")
@load_options
@generation_options
@constraint_options
def batch(infile, out, batch_size, **kwargs):
    """Answer every {"id", "query"} line of INFILE ('-': standard input) into OUTPUT (resumable, in order).

    A line's own "schema" (a JSON Schema) constrains its answer instead of the command line's constraint.
    """
    constraint = split_constraint(kwargs)
    options = split_generation(kwargs)
    # under mlx.launch rank 0 alone reads (and writes) the files and hands the lines to every rank
    read = distributed.leader_stdin if str(infile) == "-" else distributed.leader_input
    items, finished = read(lambda: read_inputs(infile, out, options, constraint))
    finished = set(finished)
    todo, invalid = plan(items, finished)
    requests, ids = [], []
    if todo:
        assistant = load_assistant(**kwargs, options=options, batch_size=batch_size)
        for n, item_id, query, schema in todo:
            try:
                requests.append(assistant.request(query, no_cache=kwargs["no_cache"], **for_item(schema, constraint)))
                ids.append(item_id)
            except UrialError as e:
                invalid.append((n, str(e)))
    for n, problem in sorted(invalid):
        click.echo(f"{infile}:{n}: {problem}", err=True)
    if requests and distributed.is_leader():
        append_results(out, ids, (answer.as_dict() for answer in assistant.run(requests, batch_size)))
    elif requests:  # the other ranks compute the same answers in step with rank 0
        for _ in assistant.run(requests, batch_size):
            pass
    click.echo(f"{len(requests)} answered, {len(finished)} already done, {len(invalid)} invalid", err=True)
    if invalid:
        sys.exit(EXIT_BATCH_INVALID)
