"""Answering: ``ask`` (one query) and ``chat`` (a conversation); ``batch`` is in ``batch.py``.

Both answer in-process through the Python API, or through a running
``urial-edge serve`` for the same model, prompt and ``--kv-bits`` when there is
one (``ask`` and ``chat``; ``--no-server`` never uses one).
"""

import json
from typing import Optional

import click

from ..disk.paths import servers_dir
from ..distributed import world as distributed
from ..errors import UrialError, one_line
from ..log import warn
from ..model.store import resolve_model
from ..runtime.prompt import load_prompt, render_prefix
from ..serve.discovery import find_server
from .group import fail
from .options import (constraint_options, generation_options, load_assistant, load_options, read_stdin,
                      split_constraint, split_generation, standard_input, text_argument)
from .serve import open_chat_page, serve

# --no-daemon is the 0.1 spelling, still accepted
no_server_option = click.option("--no-server", "--no-daemon", "no_server", is_flag=True,
                                help="Never use a running `urial-edge serve`; answer in-process.")


@click.command()
@click.argument("query", required=False)
@load_options
@generation_options
@constraint_options
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object with text, stats and options (and "
              "with a constraint, the answer's parsed value).")
@click.option("--verbose", "-v", is_flag=True, help="Print stats to stderr.")
@no_server_option
def ask(query, as_json, verbose, no_server, **kwargs):
    """Answer QUERY (or standard input when QUERY is '-' or input is piped)."""
    query = text_argument(query, "QUERY")
    constraint = split_constraint(kwargs)
    if query is None or query == "-":
        stdin = standard_input("no query: standard input is closed; pass the query as an argument")
        if query is None and stdin.isatty():
            raise UrialError("no query: pass it as an argument, or pipe it on standard input")
        query = distributed.leader_stdin(read_stdin)  # under mlx.launch: rank 0 reads, every rank gets it
    if not query.strip():
        raise UrialError("the query is empty")
    options = split_generation(kwargs)
    stream = None
    if not (no_server or kwargs["no_cache"]):
        stream = server_stream(kwargs, [{"role": "user", "content": query}], options, constraint)
    if stream is None:
        stream = load_assistant(**kwargs, options=options).stream(query, no_cache=kwargs["no_cache"],
                                                                  constraint=constraint)
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
    if distributed.active() or not any(servers_dir().glob("*.json")):  # split models answer in-process
        return None
    prefix = render_prefix(load_prompt(kwargs["prompt"]))
    info, silent = find_server(resolve_model(kwargs["model"]), prefix, kwargs["kv_bits"])
    if info is None:
        for s in silent:
            warn(f"the server at {s['host']}:{s['port']} (pid {s['pid']}) does not answer; answering here")
    return info


def server_stream(kwargs: dict, messages: list, options, constraint=None):
    """A stream of the answer from a running server; None if there is none or it cannot take the request."""
    info = running_server_for(kwargs)
    if info is None:
        return None
    from ..serve.client import ServerBusy, remote_stream  # imports MLX (the Answer type)

    try:
        return remote_stream(info, messages, options, constraint=constraint)
    except (OSError, ServerBusy) as e:
        warn(f"the server at {info['host']}:{info['port']} cannot answer ({e}); answering here")
        return None


def format_stats(stats: dict, finish_reason: str) -> str:
    return (f"ttft {stats['ttft']:.3f}s (queue {stats.get('queue_seconds', 0):.3f}s) | prefill "
            f"{stats['prefill_tokens']} tok @ {stats['prefill_tps']:.1f} tok/s | "
            f"decode {stats['generation_tokens']} tok @ {stats['generation_tps']:.1f} tok/s | "
            f"cache {'hit' if stats['cache_hit'] else 'miss'} ({stats['cached_tokens']} tok) | "
            f"peak {stats['peak_memory_mb']:.0f} MB | finish {finish_reason}")


@click.command()
@load_options
@generation_options
@constraint_options
@click.option("--session", "-s", default=None, help="Persist the conversation and its KV state under this name.")
@click.option("--verbose", "-v", is_flag=True, help="Print stats after each answer.")
@no_server_option
@click.option("--web", is_flag=True, help="Chat in the browser: the chat page of a running server for the model, "
              "or of a new one (as `serve --open`).")
def chat(session, verbose, no_server, web, **kwargs):
    """Interactive multi-turn chat. Commands: /reset, /save [NAME], /exit."""
    constraint = split_constraint(kwargs)  # every answer of the chat follows it
    if web:
        if constraint is not None:
            raise click.BadParameter("the chat page's answers take no constraint", param_hint="--web")
        return chat_page(kwargs)
    from ..runtime.sessions import check_name  # imports MLX, as loading the model will

    if session is not None:
        try:
            check_name(text_argument(session, "--session"))
        except UrialError as e:
            raise click.BadParameter(str(e), param_hint="--session") from None
    stdin = standard_input("standard input is closed: no message to answer")
    options = split_generation(kwargs)
    info = None if (no_server or session or kwargs["no_cache"]) else running_server_for(kwargs)
    if info is not None:
        from ..serve.client import RemoteChat

        conversation = RemoteChat(info, options)
        click.echo(f"(using the server at {info['host']}:{info['port']})", err=True)
    else:
        conversation = load_assistant(**kwargs, options=options).chat(session)
    if conversation.turns:
        click.echo(f"(resumed session {session!r}: {len(conversation.turns)} turns)", err=True)
    click.echo("Type a message; /reset, /save [NAME], /exit. Ctrl-C stops an answer.", err=True)
    if not repl(conversation, stdin, session, verbose, constraint):
        fail("the conversation was not saved (see the error above)")


def chat_page(kwargs: dict) -> None:
    """``chat --web``: open a running server's page, or serve the model and open the page (until Ctrl-C)."""
    info = running_server_for(kwargs)
    if info is not None:
        click.echo(f"(the chat page of the server at {info['host']}:{info['port']})", err=True)
        return open_chat_page(info)
    click.get_current_context().invoke(serve, model=kwargs["model"], prompt=kwargs["prompt"],
                                       kv_bits=kwargs["kv_bits"], open_page=True)


def repl(conversation, stdin, session: Optional[str], verbose: bool, constraint=None) -> bool:
    """Chat until /exit or the end of ``stdin``; False if the conversation's last save failed."""
    saved = True
    while True:
        try:
            click.echo(">>> ", nl=False, err=True)
            line = distributed.leader_input(stdin.readline)  # under mlx.launch: rank 0's line
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
                command, _, arg = message.partition(" ")
                if command in ("/exit", "/quit", "/bye"):
                    break
                if command == "/save":
                    saved = save(conversation, arg.strip() or None)
                else:
                    chat_command(conversation, command)
                continue
            stream = conversation.stream(message, constraint=constraint)
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
                saved = save(conversation, quiet=True)
        except UrialError as e:  # the conversation goes on; nothing said so far is lost
            click.echo(f"error: {one_line(e)}", err=True)
    return saved


def save(conversation, name: Optional[str] = None, quiet: bool = False) -> bool:
    """Save the conversation (under ``name``); a failure is one line and the chat goes on. True if saved."""
    try:
        path = conversation.save(name)
    except UrialError as e:
        click.echo(f"error: {one_line(e)}", err=True)
        return False
    if not quiet:
        click.echo(f"(saved to {path})", err=True)
    return True


def chat_command(conversation, command: str) -> None:
    """Run a /command other than /save and /exit."""
    if command == "/reset":
        conversation.reset()
        click.echo("(conversation cleared)", err=True)
    else:
        click.echo(f"unknown command {command}: use /reset, /save [NAME] or /exit", err=True)
