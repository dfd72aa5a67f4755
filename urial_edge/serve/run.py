"""Running ``urial-edge serve``: the routes, ``/health``, the chat page, the discovery record, a clean stop.

    urial-edge serve [--model M] [--prompt P] [--host 127.0.0.1] [--port 8412] [--api-key K]

The model and prompt given are loaded at start and are the default for
requests that name none; others load on demand (``pool.py``). Up to
``--max-batch`` answers of a model decode together and ``--max-queue`` more
wait; past that a request gets 429 with ``Retry-After``. A client that goes away
(streaming or not) has its answer cancelled, which frees its slot at the next
step. On SIGTERM the server stops taking requests, ends every answer in flight
with a final event (and 503 for answers not streamed), lets the model loads under
way finish (no MLX work may run at exit; their requests get 503), and exits.
"""

import os
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import mlx.core as mx

from ..errors import UrialError
from ..runtime.assistant import Assistant
from ..runtime.prompt import Prompt, load_prompt, render_prefix
from . import discovery, ollama, openai, static
from .discovery import DEFAULT_PORT
from .http import MAX_CONNECTIONS, REQUEST_TIMEOUT, Handler, Server
from .pool import Pool

LOOPBACK = ("127.0.0.1", "localhost", "::1")
STOP_WAIT = 10.0  # seconds to let the answers in flight send their final event on SIGTERM
AFTER_LOADS_WAIT = 2.0  # then, once the loads under way are over, for their requests' 503


@dataclass
class Settings:
    """How the server runs: where it listens, who may use it, what it may load and how long clients may take."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_key: Optional[str] = None
    verbose: bool = False
    keep_alive: Optional[float] = 300.0  # models loaded on demand: seconds after their last answer (None: ever)
    max_models: int = 3
    max_memory: Optional[int] = None
    max_connections: int = MAX_CONNECTIONS
    request_timeout: float = REQUEST_TIMEOUT


def health(handler: Handler, body: Optional[dict] = None) -> None:
    """Load, answers by outcome, loaded models and conversation-state memory; open to all, but with an
    API key set only ``status`` (and the proof of identity clients ask for) without the key.

    A client that read the server's record proves it talks to that server by sending a random challenge
    (``X-Urial-Edge-Challenge``); the answer holds an HMAC of it under the record's token, which itself is
    never sent.
    """
    server = handler.server
    data = {"status": "ok"}
    challenge = handler.headers.get(discovery.CHALLENGE_HEADER)
    if challenge:
        data["proof"] = discovery.proof(server.token, challenge)
    if server.api_key and not handler.has_key():
        return handler.send_json(200, data)
    pool = server.pool
    loaded = pool.loaded()
    states = [m.first.states for m in loaded]
    default = loaded[0].engine if loaded else None
    handler.send_json(200, {
        **data, "pid": os.getpid(), "model": pool.default_name, "prompt": pool.default_prompt.name,
        **pool.load_report(), "max_active": default.max_active if default else None,
        "max_queued": default.max_queued if default else None,
        "states": {"count": sum(len(s) for s in states), "bytes": sum(s.nbytes for s in states),
                   "max_bytes": sum(s.max_bytes for s in states)},
        "memory": {"mlx_active": mx.get_active_memory(), "mlx_cache": mx.get_cache_memory()},
        "models": [{"name": m.name, "prompts": list(m.prompts), "answering": m.users, "bytes": m.nbytes(),
                    "keep_alive": m.keep_alive, "expires_at": m.expires_at(), **m.engine.load} for m in loaded]})


class ServeHandler(Handler):
    routes = {("GET", "/health"): health, **openai.ROUTES, **ollama.ROUTES}
    public = ("/health",)
    files = staticmethod(static.page_response)  # the chat page at / (serve/page/)


def check_host(host: str, api_key: Optional[str]) -> None:
    if host not in LOOPBACK and not api_key:
        raise UrialError(f"refusing to listen on {host} without --api-key (only loopback is safe without one)")


def loader(default) -> Callable[[Path, Prompt], Assistant]:
    """How the server loads a model on demand: as the default one was, with the server's settings."""
    def load(path: Path, prompt: Prompt):
        assistant = Assistant.load(str(path), str(prompt.path), kv_bits=default.kv_bits,
                                   batch_size=default.batch_size, max_queued=default.engine.max_queued,
                                   state_bytes=default.states.max_bytes)
        assistant.options = default.options
        # the whole tokenizer, as for the default model: the lazy one rebuilds itself as new texts come, for
        # as long as the server runs. (Building it holds the GIL: 0.3 s for SmolLM2's, 1.5 s for Gemma's.)
        assistant.tokenizer.load_full()
        assistant.start()  # loads or builds the prefix state
        return assistant

    return load


def record_info(httpd: Server, assistant, settings: Settings) -> dict:
    """The discovery record: who we are, and every model and prompt ``ask`` and ``chat`` may ask of us."""
    pool = httpd.pool
    models = {str(path.resolve()): row["name"] for row in pool.servable()
              if (path := pool.ready_path(row)) is not None}
    prompts = {discovery.prefix_digest(render_prefix(load_prompt(str(path)))): name
               for name, path in pool.prompts().items()} if pool.load is not None else \
        {discovery.prefix_digest(assistant.prefix_text): assistant.prompt.name}
    return {"key": discovery.server_key(assistant.model_path, assistant.prefix_text), "host": settings.host,
            "port": httpd.server_address[1], "token": httpd.token, "model": str(assistant.model_path),
            "name": pool.default_name, "prompt": assistant.prompt.name, "kv_bits": assistant.kv_bits,
            "api_key": bool(settings.api_key), "started": int(time.time()), "models": models, "prompts": prompts}


def serve(assistant, name: str, settings: Settings, on_demand: bool = True, ready=None) -> None:
    """Run the server until SIGTERM/SIGINT; writes and removes its discovery record.

    ``assistant`` (the default model and prompt) is loaded and kept; with ``on_demand`` other models and
    prompts load when asked for (not under a launcher, whose ranks replay one assistant's calls)."""
    check_host(settings.host, settings.api_key)
    assistant.tokenizer.load_full()  # a long-lived process: no per-text tokenizer rebuilds
    assistant.start()  # the prefix is ready and the engine runs on its own thread
    try:
        httpd = Server((settings.host, settings.port), ServeHandler, settings.max_connections,
                       settings.request_timeout)
    except OSError as e:
        raise UrialError(f"cannot listen on {settings.host}:{settings.port}: {e.strerror}") from None
    httpd.api_key, httpd.verbose, httpd.token = settings.api_key, settings.verbose, secrets.token_hex(16)
    httpd.pool = Pool(assistant, name, loader(assistant) if on_demand else None, settings.keep_alive,
                      settings.max_models, settings.max_memory)
    httpd.pool.stopping = httpd.stopping
    info = record_info(httpd, assistant, settings)
    record = discovery.write_record(info)

    def stop(signum, frame):
        httpd.stopping.set()
        print(f"stopping (requests in flight: {httpd.requests})", file=sys.stderr, flush=True)
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    if ready:
        ready(info)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        httpd.stopping.set()
    finally:
        end_requests(httpd)
        httpd.server_close()
        httpd.pool.close()  # after the loads under way, whose requests get 503
        end_requests(httpd, AFTER_LOADS_WAIT)
        record.unlink(missing_ok=True)


def end_requests(httpd: Server, wait: float = STOP_WAIT) -> None:
    """Cancel every answer in flight and give the handlers of every request a moment to send their final
    event or their error (a request whose model is loading waits for it, then gets 503)."""
    deadline = time.monotonic() + wait
    while httpd.requests and time.monotonic() < deadline:
        httpd.watchdog.cancel_all()  # again and again: a request may have started its answer just now
        time.sleep(0.05)
