"""The ``urial-edge`` command line.

stdout carries only answers (or JSON); progress, warnings and errors go to stderr.
Exit codes: 0 success, 1 error, 2 bad usage, 3 a batch finished with invalid lines,
130 interrupted. Heavy modules are imported inside commands so ``--help`` and
``--version`` start instantly.
"""

import json
import os
import sys
from pathlib import Path
from typing import Optional

import click

from . import __version__, distributed
from .errors import UrialError, one_line

EXIT_ERROR, EXIT_BATCH_INVALID, EXIT_INTERRUPTED = 1, 3, 130


def fail(message: str, code: int = EXIT_ERROR):
    click.echo(f"error: {' '.join(message.split())}", err=True)
    sys.exit(code)


class Group(click.Group):
    """A command group that turns expected failures into one-line errors."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UrialError as e:
            fail(str(e))
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED)
        except (click.exceptions.Exit, click.ClickException, click.Abort, SystemExit):
            raise
        except BrokenPipeError:
            sys.stderr.close()
            sys.exit(0)
        except Exception as e:
            if os.environ.get("URIAL_EDGE_DEBUG"):
                raise
            fail(f"unexpected {type(e).__name__}: {one_line(e)} "
                 "(set URIAL_EDGE_DEBUG=1 for a traceback)")


model_option = click.option("--model", "-m", default=None, metavar="MODEL",
                            help="Registry name, MLX model directory, .gguf file or HF repo id.")


def model_options(f):
    from .prompt import DEFAULT_PROMPT

    f = click.option("--prompt", "-p", default=None, metavar="NAME_OR_PATH",
                     help=f"URIAL prompt: a shipped name ({DEFAULT_PROMPT} default) or a file.")(f)
    return model_option(f)


class OptionValue(click.ParamType):
    """A generation option's value, checked by its declaration in options.py (bad values exit 2)."""

    def __init__(self, option: str):
        self.option = option
        self.name = option.replace("_", "-")

    def convert(self, value, param, ctx):
        from .options import check

        if isinstance(value, str) and self.option not in ("stop",):
            try:
                value = float(value) if any(c in value.lower() for c in ".ein") else int(value)
            except ValueError:
                self.fail(f"{value!r} is not a number", param, ctx)
        try:
            checked = check(self.option, [value] if self.option == "stop" else value)
        except UrialError as e:
            self.fail(str(e), param, ctx)
        return checked[0] if self.option == "stop" else checked


def declared_options(f):
    """The generation options of options.py as click options (derived from there, not listed here)."""
    from dataclasses import fields

    from .options import GenerationOptions

    for item in reversed(fields(GenerationOptions)):
        spec = item.metadata["spec"]
        default = "" if item.default in (None, ()) else f" [default: {item.default}]"
        metavar = {"stop": "TEXT", "seed": "INTEGER"}.get(item.name, type(item.default).__name__.upper())
        f = click.option(*spec.flags, item.name, type=OptionValue(item.name), default=None, metavar=metavar,
                         multiple=item.name == "stop", help=spec.help + default)(f)
    return f


def generation_options(f):
    """The declared generation options and --preset (a named set of them)."""
    from .options import PRESETS

    return click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
                        help="Start from a named set of options (see README); the options below override it.")(
        declared_options(f))


def load_options(f):
    """Options for loading a model and prompt (before any generation option)."""
    f = click.option("--no-cache", is_flag=True, help="Skip the prefix cache: full prefill every time.")(f)
    f = click.option("--kv-bits", type=click.Choice(["4", "8", "none"]), default="none", show_default=True,
                     help="Quantize the cached KV state.")(f)
    return model_options(f)


def split_generation(kwargs: dict):
    """Pop the generation options (and --preset) from ``kwargs``; return the GenerationOptions they make."""
    from .options import option_names, with_changes

    changes = {name: kwargs.pop(name) for name in option_names()}
    return with_changes(kwargs.pop("preset"), changes)


def kv_bits_of(value: str) -> Optional[int]:
    return None if value == "none" else int(value)


def load_assistant(model, prompt, kv_bits, no_cache, options=None, **load):
    from .assistant import Assistant

    assistant = Assistant.load(model, prompt, kv_bits=kv_bits_of(kv_bits), cache=not no_cache, **load)
    if options is not None:
        assistant.options = options
    return assistant


def read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UrialError(f"standard input is not valid UTF-8 (byte {e.start})") from None


def text_argument(value: Optional[str], name: str) -> Optional[str]:
    """A command-line text that survived the OS's decoding (exit 2 if it holds invalid UTF-8)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise click.BadParameter("not valid UTF-8", param_hint=name) from None
    return value


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="urial-edge")
def cli():
    """Aligned answers from base LLMs, offline, with a cached URIAL prefix."""


# -- ask / chat / batch ---------------------------------------------------------


@cli.command()
@click.argument("query", required=False)
@load_options
@generation_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with text, stats and options.")
@click.option("--verbose", "-v", is_flag=True, help="Print stats to stderr.")
@click.option("--no-daemon", is_flag=True, help="Never use a running `urial-edge serve`; answer in-process.")
def ask(query, as_json, verbose, no_daemon, **kwargs):
    """Answer QUERY (or standard input when QUERY is '-' or input is piped)."""
    query = text_argument(query, "QUERY")
    if query is None or query == "-":
        if query is None and sys.stdin.isatty():
            raise UrialError("no query: pass it as an argument, or pipe it on standard input")
        query = distributed.leader_stdin(read_stdin)  # under mlx.launch: rank 0 reads, every rank gets it
    if not query.strip():
        raise UrialError("the query is empty")
    options = split_generation(kwargs)
    stream = None
    if not (no_daemon or kwargs["no_cache"]):
        stream = daemon_stream(kwargs, [{"role": "user", "content": query}], options)
    if stream is None:
        stream = load_assistant(**kwargs, options=options).stream(query, no_cache=kwargs["no_cache"])
    show(stream, as_json, verbose)


def show(stream, as_json: bool, verbose: bool) -> None:
    """Print an answer stream: pieces as they come, or one JSON object at the end."""
    if as_json:
        answer = stream.finish()
        click.echo(json.dumps(answer.as_dict(), ensure_ascii=False))
    else:
        for piece in stream:
            click.echo(piece, nl=False)
        click.echo()
        answer = stream.answer
    if verbose:
        via = f" | via server {answer.server}" if answer.server else ""
        click.echo(format_stats(answer.stats.as_dict(), answer.finish_reason) + via, err=True)


def running_server_for(kwargs: dict):
    """A verified, answering server for the requested model, prompt and KV precision, if any."""
    from .paths import servers_dir

    if distributed.active() or not any(servers_dir().glob("*.json")):  # split models answer in-process
        return None
    from .log import warn
    from .models import resolve_model
    from .prompt import load_prompt, render_prefix
    from .servers import find_server

    prefix = render_prefix(load_prompt(kwargs["prompt"]))
    info, silent = find_server(resolve_model(kwargs["model"]), prefix, kv_bits_of(kwargs["kv_bits"]))
    if info is None:
        for s in silent:
            warn(f"the server at {s['host']}:{s['port']} (pid {s['pid']}) does not answer; answering here")
    return info


def daemon_stream(kwargs: dict, messages: list, options):
    """A stream of the answer from a running server; None if there is none or it cannot take the request."""
    info = running_server_for(kwargs)
    if info is None:
        return None
    from .log import warn
    from .servers import ServerBusy, remote_stream

    try:
        return remote_stream(info, messages, options)
    except (OSError, ServerBusy) as e:
        warn(f"the server at {info['host']}:{info['port']} cannot answer ({e}); answering here")
        return None


def format_stats(stats: dict, finish_reason: str) -> str:
    return (f"ttft {stats['ttft']:.3f}s (queue {stats.get('queue_seconds', 0):.3f}s) | prefill "
            f"{stats['prefill_tokens']} tok @ {stats['prefill_tps']:.1f} tok/s | "
            f"decode {stats['generation_tokens']} tok @ {stats['generation_tps']:.1f} tok/s | "
            f"cache {'hit' if stats['cache_hit'] else 'miss'} ({stats['cached_tokens']} tok) | "
            f"peak {stats['peak_memory_mb']:.0f} MB | finish {finish_reason}")


@cli.command()
@load_options
@generation_options
@click.option("--session", "-s", default=None, help="Persist the conversation and its KV state under this name.")
@click.option("--verbose", "-v", is_flag=True, help="Print stats after each answer.")
@click.option("--no-daemon", is_flag=True, help="Never use a running `urial-edge serve`; chat in-process.")
def chat(session, verbose, no_daemon, **kwargs):
    """Interactive multi-turn chat. Commands: /reset, /save [NAME], /exit."""
    from .sessions import check_name

    if session is not None:
        try:
            check_name(text_argument(session, "--session"))
        except UrialError as e:
            raise click.BadParameter(str(e), param_hint="--session") from None
    options = split_generation(kwargs)
    info = None if (no_daemon or session or kwargs["no_cache"]) else running_server_for(kwargs)
    if info is not None:
        from .servers import RemoteChat

        conversation = RemoteChat(info, options)
        click.echo(f"(using the server at {info['host']}:{info['port']})", err=True)
    else:
        conversation = load_assistant(**kwargs, options=options).chat(session)
    if conversation.turns:
        click.echo(f"(resumed session {session!r}: {len(conversation.turns)} turns)", err=True)
    click.echo("Type a message; /reset, /save [NAME], /exit. Ctrl-C stops an answer.", err=True)
    repl(conversation, session, verbose)


def repl(conversation, session: Optional[str], verbose: bool) -> None:
    while True:
        try:
            click.echo(">>> ", nl=False, err=True)
            line = distributed.leader_input(sys.stdin.readline)  # under mlx.launch: rank 0's line
        except KeyboardInterrupt:
            click.echo("", err=True)
            break
        if not line:
            break
        message = line.strip()
        if not message:
            continue
        try:
            if message.startswith("/"):
                if chat_command(conversation, message):
                    break
                continue
            stream = conversation.stream(message)
            try:
                for piece in stream:
                    click.echo(piece, nl=False)
                click.echo()
            except KeyboardInterrupt:
                click.echo("\n(stopped; this turn was not kept)", err=True)
                continue
            if verbose:
                click.echo(format_stats(stream.answer.stats.as_dict(), stream.answer.finish_reason), err=True)
            if session:
                conversation.save()
        except UrialError as e:  # the conversation goes on; nothing said so far is lost
            click.echo(f"error: {' '.join(str(e).split())}", err=True)


def chat_command(conversation, message: str) -> bool:
    """Run a /command; True to end the chat."""
    command, _, arg = message.partition(" ")
    if command in ("/exit", "/quit", "/bye"):
        return True
    if command == "/reset":
        conversation.reset()
        click.echo("(conversation cleared)", err=True)
    elif command == "/save":
        path = conversation.save(arg.strip() or None)
        click.echo(f"(saved to {path})", err=True)
    else:
        click.echo(f"unknown command {command}: use /reset, /save [NAME] or /exit", err=True)
    return False


def read_batch(path: Path):
    """Yield ``(line number, id, query, problem)`` for each non-blank line of a JSONL file."""
    try:
        handle = open(path, "rb")
    except OSError as e:
        raise UrialError(f"cannot read {path}: {e.strerror}") from None
    with handle:
        for number, raw in enumerate(handle, 1):
            if not raw.strip():
                continue
            try:
                item = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, ValueError) as e:
                yield number, None, None, f"not valid JSON ({type(e).__name__})"
                continue
            if not isinstance(item, dict):
                yield number, None, None, "not a JSON object"
                continue
            query, item_id = item.get("query"), item.get("id", number)
            if not isinstance(query, str) or not query.strip():
                yield number, item_id, None, "missing or empty 'query'"
            elif not isinstance(item_id, (str, int)) or isinstance(item_id, bool):
                yield number, None, None, "'id' must be a string or an integer"
            else:
                yield number, item_id, query, None


@cli.command()
@click.argument("infile", type=click.Path(path_type=Path))
@click.option("--output", "-o", "out", required=True, type=click.Path(path_type=Path), help="JSONL results file.")
@click.option("--batch-size", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Answers decoded together.")
@load_options
@generation_options
def batch(infile, out, batch_size, **kwargs):
    """Answer every {"id", "query"} line of INFILE into OUTPUT (resumable, in input order)."""
    from .results import append_results, read_results

    # under mlx.launch rank 0 alone reads (and writes) the files and hands the lines to every rank
    items, finished = distributed.leader_input(lambda: (list(read_batch(infile)), list(read_results(out))))
    finished = set(finished)
    invalid = [(n, problem) for n, _, _, problem in items if problem]
    todo, seen = [], set(finished)
    for n, item_id, query, problem in items:
        if problem:
            continue
        if item_id in seen:
            if item_id not in finished:
                invalid.append((n, f"duplicate id {item_id!r}"))
            continue
        seen.add(item_id)
        todo.append((n, item_id, query))
    requests, ids = [], []
    if todo:
        options = split_generation(kwargs)
        assistant = load_assistant(**kwargs, options=options, batch_size=batch_size)
        for n, item_id, query in todo:
            try:
                requests.append(assistant.request(query, no_cache=kwargs["no_cache"]))
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


# -- eval -----------------------------------------------------------------------------


def eval_options(f):
    """Repeatable -m/-p/--preset (their product makes the configs), the other generation options once."""
    from .options import PRESETS
    from .prompt import DEFAULT_PROMPT

    f = declared_options(f)
    f = click.option("--preset", "presets", multiple=True, type=click.Choice(sorted(PRESETS)),
                     help="A decoding setting to compare (repeatable; default: default). The options "
                     "below apply on top of each.")(f)
    f = click.option("--prompt", "-p", "prompts", multiple=True, metavar="NAME_OR_PATH",
                     help=f"URIAL prompt to compare (repeatable; default: {DEFAULT_PROMPT}).")(f)
    return click.option("--model", "-m", "models", multiple=True, metavar="MODEL",
                        help="Model to compare (repeatable; default: the bundled model).")(f)


def check_judge_url(ctx, param, value):
    from urllib.parse import urlsplit

    if value is not None and (urlsplit(value).scheme not in ("http", "https") or not urlsplit(value).hostname):
        raise click.BadParameter("must be an http:// or https:// URL (e.g. http://127.0.0.1:11434/v1)")
    return value


@cli.command("eval")
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
def evaluate(questions, out, batch_size, models, prompts, presets, judge_url, judge_model, judge_key, judge_mode,
             **options):
    """Answer QUESTIONS (JSONL; default: our own set) under every model x prompt x preset and compare.

    Judge-free metrics are always measured; with --judge-url a judge model scores the answers too.
    """
    from . import evaluation

    if judge_url and not judge_model:
        raise click.BadParameter("--judge-url needs --judge-model", param_hint="--judge-model")
    if out.exists() and not out.is_dir():
        raise UrialError(f"{out} is not a directory")
    questions = questions or evaluation.default_questions()
    items = evaluation.load_questions(questions)
    configs = [evaluation.Config(m, p, s, split_generation({**options, "preset": s}))
               for m in models or (None,) for p in prompts or (None,) for s in presets or ("default",)]
    names = [c.name for c in configs]
    if len(set(names)) < len(names):
        raise click.BadParameter("the same model, prompt or preset is given twice")
    records = evaluation.run(items, configs, out, batch_size)
    rows = evaluation.config_rows(items, configs, records)
    evaluation.write_report(rows, out, questions)
    if judge_url:
        from .judge import Judge

        judge = Judge(judge_url, judge_model, judge_key)
        evaluation.judge_rows(rows, judge, judge_mode, items, configs, records, out)
        evaluation.write_report(rows, out, questions)
    for row in rows:
        click.echo(evaluation.summary(row))
    click.echo(f"report in {out / 'report.md'}", err=True)


# -- models ---------------------------------------------------------------------------


@cli.group(cls=Group)
def models():
    """List, inspect, pull, import and remove models."""


@models.command("list")
def models_list():
    """Registry models and models in the store."""
    from .models import list_models

    for row in list_models():
        mark = "*" if row["default"] else " "
        click.echo(f"{mark} {row['name']:<16} {row['status']:<22} {row['description']}")


@models.command("info")
@click.argument("name", required=False)
@click.option("--path", "path_only", is_flag=True, help="Print only the local directory.")
def models_info(name, path_only):
    """Details of a model (the default when NAME is omitted); the directory is the last line."""
    from .models import model_info
    from .units import format_size

    info = model_info(name)
    if path_only and "path" not in info:
        raise UrialError(f"model {info['name']!r} is {info['status']}")
    if not path_only:
        for key, value in info.items():
            if key not in ("path",) and value is not None:
                click.echo(f"{key}: {format_size(value) if key == 'size_bytes' else value}")
    if "path" in info:
        click.echo(info["path"])


@models.command("pull")
@click.argument("name")
@click.option("--file", default=None, metavar="NAME.gguf", help="The GGUF file to take from a repo with several.")
def models_pull(name, file):
    """Download NAME (a registry name or a Hugging Face repo id) and convert it if it is a GGUF.

    Downloads go through huggingface-hub: its cache, its progress bars, and
    resuming where an interrupted download stopped. Prints the directory last.
    """
    from .files import dir_size
    from .models import pull_model
    from .units import format_size

    path = pull_model(text_argument(name, "NAME"), file)
    click.echo(f"{name}: {format_size(dir_size(path))} in {path}", err=True)
    click.echo(str(path))


@models.command("import")
@click.argument("file", type=click.Path(path_type=Path))
@click.option("--name", default=None, help="Store name (default: the file name).")
@click.option("--quantize", type=click.Choice(["4", "8", "none"]), default=None,
              help="MLX quantization (default: the platform's choice).")
@click.option("--force", is_flag=True, help="Replace a model of the same name.")
def models_import(file, name, quantize, force):
    """Convert a GGUF file into an MLX model in the store."""
    from .models import default_precision, import_into_store, is_model_dir, parse_precision
    from .files import dir_size
    from .paths import models_dir
    from .progress import progress_bar
    from .units import format_size

    name = name or file.stem
    if "/" in name or name.startswith(".") or not name.strip():
        raise UrialError(f"invalid model name {name!r}")
    if is_model_dir(models_dir() / name) and not force:
        raise UrialError(f"a model named {name!r} already exists; use --force to replace it")
    bits = default_precision() if quantize is None else parse_precision(quantize)
    target = import_into_store(file, name, bits, progress_bar("importing"))
    click.echo(f"imported {file} as {name!r} ({format_size(dir_size(target))})", err=True)
    click.echo(str(target))


@models.command("remove")
@click.argument("name")
def models_remove(name):
    """Delete a model from the store."""
    from .models import remove_model

    click.echo(f"removed {remove_model(name)}", err=True)


# -- prompts --------------------------------------------------------------------------


@cli.group(cls=Group)
def prompts():
    """List, show, count and validate URIAL prompts."""


@prompts.command("list")
def prompts_list():
    """The shipped prompts."""
    from .prompt import builtin_prompts, load_prompt

    for name in builtin_prompts():
        p = load_prompt(name)
        click.echo(f"{name:<10} K={len(p.examples):<2} {p.description}")


@prompts.command("show")
@click.argument("name")
@click.option("--rendered", is_flag=True, help="Print the exact prefix text that is cached.")
def prompts_show(name, rendered):
    """Print a prompt: its parts, or the rendered prefix."""
    from .prompt import load_prompt, render_prefix

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
    from .models import resolve_model
    from .prompt import load_prompt, render_prefix
    from .tokenizer import Tokenizer

    p = load_prompt(name)
    tok = Tokenizer(resolve_model(model))
    click.echo(f"{p.name}: {len(tok.encode(render_prefix(p), bos=True))} tokens")


@prompts.command("validate")
@click.argument("path")
@model_option
def prompts_validate(path, model):
    """Check a prompt file: format, empty or repeated examples, length and token boundary."""
    from .modeling import read_config
    from .models import resolve_model
    from .prompt import boundary_problems, check, load_prompt, render_prefix
    from .tokenizer import Tokenizer

    p = load_prompt(path)
    model_path = resolve_model(model)
    tok = Tokenizer(model_path)
    context = int(read_config(model_path).get("max_position_embeddings") or 4096)
    n = len(tok.encode(render_prefix(p), bos=True))
    problems = check(p) + boundary_problems(p, tok)
    if n >= context:
        problems.append(f"the prefix is {n} tokens, longer than the model's context of {context}")
    for problem in problems:
        click.echo(problem)
    if problems:
        sys.exit(EXIT_ERROR)
    click.echo(f"ok: {p.name}, {len(p.examples)} examples, {n} tokens", err=True)


# -- cache ----------------------------------------------------------------------------


@cli.group(cls=Group)
def cache():
    """Build, list, verify and clear prefix KV caches."""


@cache.command("build")
@model_options
@click.option("--kv-bits", type=click.Choice(["4", "8", "none"]), default="none", show_default=True)
def cache_build(model, prompt, kv_bits):
    """Build (or find) the prefix cache for a model and prompt."""
    assistant = load_assistant(model, prompt, kv_bits, no_cache=False)
    pc = assistant.prefix
    click.echo(f"{'found' if pc.hit else 'built'} {len(pc.tokens)}-token prefix in {pc.seconds:.2f}s", err=True)
    click.echo(str(pc.path))


@cache.command("list")
def cache_list():
    """Cache files, newest first."""
    from .prefix_cache import list_caches
    from .units import format_size

    for row in list_caches():
        if row.get("damaged"):
            click.echo(f"{row['key']}  {format_size(row['size']):>9}  DAMAGED")
        else:
            model = Path(str(row.get("model"))).name
            click.echo(f"{row['key']}  {format_size(row['size']):>9}  {row.get('prefix_tokens')} tok  "
                       f"kv={row.get('kv_bits')}  {model} / {row.get('prompt')}")


@cache.command("verify")
def cache_verify():
    """Check every cache file's integrity; exit 1 if any is damaged."""
    from .prefix_cache import verify_caches

    bad = 0
    for path, problem in verify_caches():
        click.echo(f"{'ok' if problem is None else 'BAD'}  {path.name}" + (f"  {problem}" if problem else ""))
        bad += problem is not None
    if bad:
        sys.exit(EXIT_ERROR)


@cache.command("clear")
@click.option("--older-than", default=None, metavar="DURATION", help="Only files unused for this long (7d, 12h).")
@click.option("--max-size", default=None, metavar="SIZE", help="Delete the oldest files beyond this total (500M).")
def cache_clear(older_than, max_size):
    """Delete cache files (all, or by age / total size)."""
    from .prefix_cache import clear_caches
    from .units import parse_duration, parse_size

    removed = clear_caches(parse_duration(older_than) if older_than else None,
                           parse_size(max_size) if max_size else None)
    click.echo(f"removed {len(removed)} cache file(s)", err=True)


@cache.command("path")
def cache_path():
    """Print the cache directory."""
    from .paths import cache_dir

    click.echo(str(cache_dir()))


@cli.command()
@model_options
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--out", type=click.Path(path_type=Path), default=Path("benchmarks/results"), show_default=True)
def bench(model, prompt, repeats, out):
    """Benchmark cold and warm latency, decode speed and memory against mlx-lm."""
    from .bench import run_suite

    result = run_suite(model, prompt, repeats, out)
    for key, value in result["ratios"].items():
        click.echo(f"{key:<42} {value:.2f}")
    click.echo(f"results in {out}", err=True)


# -- serve ----------------------------------------------------------------------------


@cli.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=8412, show_default=True)
@click.option("--api-key", default=None, envvar="URIAL_EDGE_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@click.option("--kv-bits", type=click.Choice(["4", "8", "none"]), default="none", show_default=True)
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Answers decoded together.")
@click.option("--max-queue", type=click.IntRange(0, 10000), default=32, show_default=True,
              help="Requests waiting beyond them; more get HTTP 429.")
@click.option("--state-cache", default="1G", show_default=True, metavar="SIZE",
              help="Memory for conversation states reused by follow-up requests.")
@click.option("--status", is_flag=True, help="List running servers and exit.")
@click.option("--stop", "stop_servers", is_flag=True, help="Stop running servers and exit.")
@click.option("--verbose", "-v", is_flag=True, help="Log each request to stderr.")
def serve(model, prompt, host, port, api_key, kv_bits, max_batch, max_queue, state_cache, status, stop_servers,
          verbose):
    """Run a local OpenAI-compatible server with the model and prefix kept warm."""
    if status or stop_servers:
        return server_status(stop_servers)
    from .server import check_host, serve as run_server
    from .units import parse_size

    check_host(host, api_key)
    state_bytes = parse_size(state_cache)
    assistant = load_assistant(model, prompt, kv_bits, no_cache=False, batch_size=max_batch, max_queued=max_queue,
                               state_bytes=state_bytes)
    if not distributed.is_leader():  # under mlx.launch: replay rank 0's requests in lock-step
        return distributed.follow(assistant)
    with distributed.serving(assistant) as served:
        run_server(served, host, port, api_key, verbose,
                   ready=lambda info: click.echo(f"serving {Path(info['model']).name} / {info['prompt']} on "
                                                 f"http://{info['host']}:{info['port']}/v1", err=True))


def server_status(stop: bool) -> None:
    """``serve --status`` / ``--stop``: only servers verified as ours are listed or signalled."""
    from .servers import running_servers, stop as stop_server

    found = running_servers()
    for info in found:
        note = "" if info["state"] == "ok" else "  (not answering)"
        click.echo(f"pid {info['pid']}  http://{info['host']}:{info['port']}  {Path(info['model']).name} / "
                   f"{info['prompt']}{note}")
        if stop and stop_server(info):
            click.echo(f"stopped pid {info['pid']}", err=True)
    if not found:
        click.echo("no server running", err=True)


# -- doctor ---------------------------------------------------------------------------


@cli.command()
def doctor():
    """Describe the platform, MLX, BLAS, versions and storage; flag misconfiguration."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import mlx.core as mx

    from .models import default_precision, load_registry, models_dir
    from .startup import blas_in_use
    from .files import dir_size
    from .paths import cache_dir, home, sessions_dir
    from .units import format_size

    problems = []

    def line(key, value):
        click.echo(f"{key:<16} {value}")

    line("platform", f"{platform.system()} {platform.release()} {platform.machine()}, Python {platform.python_version()}")
    line("mlx device", f"{mx.default_device()} (Metal {'available' if mx.metal.is_available() else 'not available'})")
    blas = blas_in_use()
    line("blas", blas)
    if sys.platform.startswith("linux") and "slow" in blas and os.environ.get("URIAL_EDGE_BLAS", "").lower() != "off":
        problems.append("no optimised BLAS found: pip install mkl (x86_64) or apt install libopenblas0-pthread")
    for package in ("urial-edge", "mlx", "mlx-lm", "huggingface-hub", "click", "gguf", "tokenizers", "mkl"):
        try:
            line(package, version(package))
        except PackageNotFoundError:
            line(package, "not installed")
    bits = default_precision()
    line("precision", f"{'q' + str(bits) if bits else 'float32'} for new conversions")
    line("distributed", distributed.describe())
    line("home", str(home()))
    for label, folder in (("models", models_dir()), ("cache", cache_dir()), ("sessions", sessions_dir())):
        size = format_size(dir_size(folder)) if folder.exists() else "empty"
        line(label, f"{folder} ({size})")
        if folder.exists() and not os.access(folder, os.W_OK):
            problems.append(f"{folder} is not writable")
    default, _ = load_registry()
    line("default model", f"{default} ({'ready' if (models_dir() / default).exists() else 'converts on first use'})")
    if os.environ.get("HF_HUB_OFFLINE"):
        line("hub", "offline (HF_HUB_OFFLINE set): only cached Hugging Face models resolve")
    for problem in problems:
        click.echo(f"problem          {problem}")
    if problems:
        sys.exit(EXIT_ERROR)


def main():
    distributed.quiet_followers()  # under mlx.launch only rank 0 prints
    cli(prog_name="urial-edge")


if __name__ == "__main__":
    main()
