"""``urial-edge eval``: answer a question set under every model x prompt x preset, and compare the configs."""

from pathlib import Path
from urllib.parse import urlsplit

import click

from ..errors import UrialError
from ..runtime.options import PRESETS
from ..runtime.prompt import DEFAULT_PROMPT
from .options import constraint_options, declared_options, split_constraint, split_generation


def eval_options(f):
    """Repeatable -m/-p/--preset (their product makes the configs), the other generation options once."""
    f = constraint_options(declared_options(f))
    f = click.option("--preset", "presets", multiple=True, type=click.Choice(sorted(PRESETS)),
                     help="A decoding setting to compare (repeatable; default: default). The options "
                     "below apply on top of each.")(f)
    f = click.option("--prompt", "-p", "prompts", multiple=True, metavar="NAME_OR_PATH",
                     help=f"URIAL prompt to compare (repeatable; default: {DEFAULT_PROMPT}).")(f)
    return click.option("--model", "-m", "models", multiple=True, metavar="MODEL",
                        help="Model to compare (repeatable; default: the bundled model).")(f)


def check_judge_url(ctx, param, value):
    if value is not None and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
        raise click.BadParameter("must be an http:// or https:// URL (e.g. http://127.0.0.1:11434/v1)")
    return value


@click.command("eval")
@click.argument("questions", required=False, type=click.Path(path_type=Path))
@click.option("--output", "-o", "out", required=True, type=click.Path(path_type=Path),
              help="Directory for answers.jsonl, judgments.jsonl and the reports (resumable).")
@click.option("--batch-size", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Answers decoded together.")
@eval_options
@click.option("--judge-url", default=None, callback=check_judge_url, metavar="URL",
              help="An OpenAI-compatible endpoint (.../v1) that scores the answers.")
@click.option("--judge-model", default=None, metavar="NAME", help="The judge's model name.")
@click.option("--judge-key", default=None, envvar="URIAL_EDGE_JUDGE_KEY", metavar="KEY",
              help="The judge's API key (or URIAL_EDGE_JUDGE_KEY).")
@click.option("--judge", "judge_mode", type=click.Choice(["aspects", "grade", "pairwise"]), default="aspects",
              show_default=True, help="Six aspects 1-5, one grade 1-10, or each config against the first.")
@click.option("--reference", type=click.Path(path_type=Path), default=None, metavar="FILE",
              help='Reference answers ({"id", "query", "answer"} JSONL) ranked in each config\'s distribution: '
              "unshifted and shifted shares, mean log-prob per token (default with our question set: ours).")
@click.option("--no-reference", is_flag=True, help="Score no reference answers.")
def evaluate(questions, out, batch_size, models, prompts, presets, judge_url, judge_model, judge_key, judge_mode,
             reference, no_reference, **options):
    """Answer QUESTIONS (JSONL; default: our own set) under every model x prompt x preset and compare.

    Judge-free metrics are always measured; with --judge-url a judge model scores the answers too.
    A constraint (--schema, ...) applies to every answer but those of questions with their own "schema".
    """
    constraint = split_constraint(options)
    from ..eval import judge, questions as question_sets, report, run, shift  # imports MLX: only when evaluating

    if judge_url and not judge_model:
        raise click.BadParameter("--judge-url needs --judge-model", param_hint="--judge-model")
    if reference and no_reference:
        raise click.BadParameter("--reference and --no-reference exclude each other", param_hint="--no-reference")
    if out.exists() and not out.is_dir():
        raise UrialError(f"{out} is not a directory")
    if reference is None and questions is None and not no_reference:
        reference = shift.default_references()  # our references answer our questions' first turns
    references = shift.load_items(reference) if reference else None  # a bad line fails before any answering
    questions = questions or question_sets.default_questions()
    items = question_sets.load_questions(questions)
    configs = [run.Config(m, p, s, split_generation({**options, "preset": s}))
               for m in models or (None,) for p in prompts or (None,) for s in presets or ("default",)]
    names = [c.name for c in configs]
    if len(set(names)) < len(names):
        raise click.BadParameter("the same model, prompt or preset is given twice")
    records = run.run(items, configs, out, batch_size, constraint)
    rows = report.config_rows(items, configs, records)
    if references:
        scores = shift.reference_metrics(configs, reference, references, out, batch_size)
        for row in rows:
            row.metrics.update(scores[row.config])
    report.write_report(rows, out, questions)
    if judge_url:
        judge.judge_rows(rows, judge.Judge(judge_url, judge_model, judge_key), judge_mode, items, configs, records,
                         out)
        report.write_report(rows, out, questions)
    for row in rows:
        click.echo(report.summary(row))
    click.echo(f"report in {out / 'report.md'}", err=True)
