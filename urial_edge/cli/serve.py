"""``urial-edge serve``: the local server, and ``--status`` / ``--stop`` for the running ones."""

import webbrowser
from pathlib import Path

import click

from ..distributed import lockstep
from ..distributed import world as distributed
from ..serve.discovery import DEFAULT_PORT, running_servers, stop as stop_server
from ..units import parse_size
from .options import kv_bits_option, load_assistant, model_options


@click.command()
@model_options
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=click.IntRange(0, 65535), default=DEFAULT_PORT, show_default=True)
@click.option("--api-key", default=None, envvar="URIAL_EDGE_API_KEY", help="Require 'Authorization: Bearer KEY'.")
@kv_bits_option
@click.option("--max-batch", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Answers decoded together.")
@click.option("--max-queue", type=click.IntRange(0, 10000), default=32, show_default=True,
              help="Requests waiting beyond them; more get HTTP 429.")
@click.option("--state-cache", default="1G", show_default=True, metavar="SIZE",
              help="Memory for conversation states reused by follow-up requests.")
@click.option("--status", is_flag=True, help="List running servers and exit.")
@click.option("--stop", "stop_servers", is_flag=True, help="Stop running servers and exit.")
@click.option("--open", "open_page", is_flag=True, help="Open the chat page in the default browser once serving.")
@click.option("--verbose", "-v", is_flag=True, help="Log each request to stderr.")
def serve(model, prompt, host, port, api_key, kv_bits, max_batch, max_queue, state_cache, status, stop_servers,
          open_page, verbose):
    """Run a local OpenAI-compatible server with the model and prefix kept warm, and a chat page at /."""
    if status or stop_servers:
        return server_status(stop_servers)
    from ..serve.run import check_host, serve as run_server  # imports MLX

    check_host(host, api_key)
    state_bytes = parse_size(state_cache)
    assistant = load_assistant(model, prompt, kv_bits, no_cache=False, batch_size=max_batch, max_queued=max_queue,
                               state_bytes=state_bytes)
    if not distributed.is_leader():  # under mlx.launch: replay rank 0's requests in lock-step
        return lockstep.follow(assistant)
    with lockstep.serving(assistant) as served:
        run_server(served, host, port, api_key, verbose, ready=lambda info: ready(info, open_page))


def ready(info: dict, open_page: bool) -> None:
    """Say where the server listens (tests and benchmarks read this line), and open the page if asked."""
    click.echo(f"serving {Path(info['model']).name} / {info['prompt']} on http://{info['host']}:{info['port']}/v1",
               err=True)
    if open_page:
        open_chat_page(info)


def page_url(info: dict) -> str:
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(info["host"], info["host"])
    return f"http://{f'[{host}]' if ':' in host else host}:{info['port']}/"


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
        click.echo(f"pid {info['pid']}  http://{info['host']}:{info['port']}  {Path(info['model']).name} / "
                   f"{info['prompt']}{note}")
        if stop and stop_server(info):
            click.echo(f"stopped pid {info['pid']}", err=True)
    if not found:
        click.echo("no server running", err=True)
