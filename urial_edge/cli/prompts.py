"""``urial-edge prompts``: list, show, count and validate URIAL prompts."""

import sys

import click

from ..model.loading import context_length, read_config
from ..model.store import resolve_model
from ..runtime.prompt import DEFAULT_PROMPT, boundary_problems, builtin_prompts, check, load_prompt, render_prefix
from .group import EXIT_ERROR, Group
from .options import model_option


def tokenizer_of(model_path):
    from ..model.tokenizer import Tokenizer  # imports MLX: only for the commands that count tokens

    return Tokenizer(model_path)


@click.group(cls=Group)
def prompts():
    """List, show, count and validate URIAL prompts."""


@prompts.command("list")
def prompts_list():
    """The shipped prompts; the default is marked with '*'."""
    for name in builtin_prompts():
        p = load_prompt(name)
        mark = "*" if name == DEFAULT_PROMPT else " "
        click.echo(f"{mark} {name:<16} K={len(p.examples):<2} {p.description}")


@prompts.command("show")
@click.argument("name")
@click.option("--rendered", is_flag=True, help="Print the exact prefix text that is cached.")
def prompts_show(name, rendered):
    """Print a prompt: its parts, or the rendered prefix."""
    p = load_prompt(name)
    if rendered:
        click.echo(render_prefix(p), nl=False)
        return
    click.echo(f"name: {p.name}\nversion: {p.version}\ndescription: {p.description}\n\nsystem:\n{p.system}")
    for k, ex in enumerate(p.examples, 1):
        click.echo(f"\nexample {k} query:\n{ex.query}\n\nexample {k} answer:\n{ex.answer}")


@prompts.command("tokens")
@click.argument("name")
@model_option
def prompts_tokens(name, model):
    """Count the prefix tokens of prompt NAME with a model's tokenizer."""
    p = load_prompt(name)
    click.echo(f"{p.name}: {len(tokenizer_of(resolve_model(model)).encode(render_prefix(p), bos=True))} tokens")


@prompts.command("validate")
@click.argument("path")
@model_option
def prompts_validate(path, model):
    """Check a prompt file: format, empty or repeated examples, length and token boundary."""
    p = load_prompt(path)
    model_path = resolve_model(model)
    tok = tokenizer_of(model_path)
    context = context_length(read_config(model_path))
    n = len(tok.encode(render_prefix(p), bos=True))
    problems = check(p) + boundary_problems(p, tok)
    if n >= context:
        problems.append(f"the prefix is {n} tokens, longer than the model's context of {context}")
    for problem in problems:
        click.echo(problem)
    if problems:
        sys.exit(EXIT_ERROR)
    click.echo(f"ok: {p.name}, {len(p.examples)} examples, {n} tokens", err=True)
