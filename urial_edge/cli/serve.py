"""``urial-edge serve``: the local server, and ``--status`` / ``--stop`` for the running ones."""

import os
import webbrowser
from pathlib import Path
from typing import Optional

import click

from ..distributed import lockstep
from ..distributed import world as distributed
from ..serve.discovery import DEFAULT_PORT, running_servers, stop as stop_server
from ..units import parse_keep_alive, parse_size
from .options import SIZE, Checked, kv_bits_option, load_assistant, model_options


def parse_budget(text: str) -> Optional[int]:
    """A memory budget: a size (``8G``), ``none``, or ``auto`` (3/4 of this machine's memory)."""
    if text == "none":
        return None
    if text == "auto":
        return int(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 0.75)
    return parse_size(text)


# Ollama's keep-alive: a duration (5m), seconds, 0 (unload at once) or a negative value (for ever)
KEEP_ALIVE = Checked(parse_keep_alive, "duration")


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--api-key", default=None, envvar="URIAL_EDGE_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@kv_bits_option
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Answers of a model decoded together.")
@click.option("--max-queue", type=click.IntRange(0, 10000), default=32, show_default=True,
              help="Requests waiting beyond them; more get HTTP 429.")
@click.option("--state-cache", type=SIZE, default="1G", show_default=True, metavar="SIZE",
              help="Memory per model for conversation states reused by follow-up requests.")
@click.option("--keep-alive", type=KEEP_ALIVE, default="5m", show_default=True,
              help="How long a model loaded on demand stays after its last answer (0: unload at once; -1: for ever).")
@click.option("--max-models", type=click.IntRange(1, 64), default=3, show_default=True,
              help="Models loaded at once; the least recently used idle one makes room.")
@click.option("--max-memory", type=Checked(parse_budget, "size"), default="auto", show_default=True, metavar="SIZE",
              help="Memory budget for loaded models (weights, prefix and conversation states); 'auto' is 3/4 "
                   "of this machine's memory, 'none' no budget.")
@click.option("--max-connections", type=click.IntRange(1, 100000), default=256, show_default=True,
              help="Open connections; more get HTTP 503 at once.")
@click.option("--request-timeout", type=click.FloatRange(0.1, 3600), default=30.0, show_default=True,
              metavar="SECONDS", help="Deadline for a request's head and body (slower clients get 408), and for "
                                      "an idle connection.")
@click.option("--status", is_flag=True, help="List running servers and exit.")
@click.option("--stop", "stop_servers", is_flag=True, help="Stop running servers and exit.")
@click.option("--open", "open_page", is_flag=True, help="Open the chat page in the default browser once serving.")
@click.option("--verbose", "-v", is_flag=True, help="Log each request to stderr.")
def serve(model, prompt, host, port, api_key, kv_bits, max_batch, max_queue, state_cache, keep_alive, max_models,
          max_memory, max_connections, request_timeout, status, stop_servers, open_page, verbose):
    """Run a local server (OpenAI and Ollama APIs, a chat page at /) with the model and prefix kept warm;
    other models and prompts load on demand."""
    if status or stop_servers:
        return server_status(stop_servers)
    from ..serve.pool import model_name  # imports MLX
    from ..serve.run import Settings, check_host, serve as run_server

    check_host(host, api_key)
    assistant = load_assistant(model, prompt, kv_bits, no_cache=False, batch_size=max_batch, max_queued=max_queue,
                               state_bytes=state_cache)
    if not distributed.is_leader():  # under mlx.launch: replay rank 0's requests in lock-step
        return lockstep.follow(assistant)
    settings = Settings(host, port, api_key, verbose, keep_alive, max_models, max_memory, max_connections,
                        request_timeout)
    with lockstep.serving(assistant) as served:
        run_server(served, model_name(model, assistant.model_path), settings, on_demand=not distributed.active(),
                   ready=lambda info: ready(info, open_page))


def ready(info: dict, open_page: bool) -> None:
    """Say where the server listens (tests and benchmarks read this line), and open the page if asked."""
    click.echo(f"serving {info['name']} / {info['prompt']} on http://{url_host(info['host'])}:{info['port']}/v1",
               err=True)
    if open_page:
        open_chat_page(info)


def url_host(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def page_url(info: dict) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(info["host"], info["host"])
    return f"http://{url_host(host)}:{info['port']}/"


def open_chat_page(info: dict) -> None:
    """The chat page in the default browser (``$BROWSER`` if set); a note, not a failure, if there is none."""
    url = page_url(info)
    if not webbrowser.open(url):
        click.echo(f"no browser found: open {url}", err=True)


def server_status(stop: bool) -> None:
    """``serve --status`` / ``--stop``: only servers verified as ours are listed or signalled."""
    found = running_servers()
    for info in found:
        note = "" if info["state"] == "ok" else "  (not answering)"
        click.echo(f"pid {info['pid']}  http://{url_host(info['host'])}:{info['port']}  "
                   f"{info.get('name') or Path(info['model']).name} / {info['prompt']}{note}")
        if stop and stop_server(info):
            click.echo(f"stopped pid {info['pid']}", err=True)
    if not found:
        click.echo("no server running", err=True)
