"""Running ``urial-edge serve``: the routes, ``/health``, the chat page, the discovery record, a clean stop.

    urial-edge serve [--model M] [--prompt P] [--host 127.0.0.1] [--port 8412] [--api-key K]

Up to ``--max-batch`` answers decode together and ``--max-queue`` more wait;
past that a request gets 429 with ``Retry-After``. A client that goes away
(streaming or not) has its answer cancelled, which frees its slot at the next step.
"""

import os
import secrets
import signal
import threading
import time
from typing import Optional

from ..errors import UrialError
from . import discovery, openai, static
from .discovery import DEFAULT_PORT
from .http import Handler, Server, Watchdog

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def health(handler: Handler, body: Optional[dict] = None) -> None:
    """Load, answers by outcome and conversation-state memory; open to all (clients find servers by it)."""
    server = handler.server
    states = server.assistant.states
    handler.send_json(200, {"status": "ok", "model": server.model_name, "pid": os.getpid(), "token": server.token,
                            **server.assistant.engine.load,
                            "states": {"count": len(states), "bytes": states.nbytes, "max_bytes": states.max_bytes}})


class ServeHandler(Handler):
    routes = {("GET", "/health"): health, **openai.ROUTES}
    public = ("/health",)
    files = staticmethod(static.page_response)  # the chat page at / (serve/page/)


def check_host(host: str, api_key: Optional[str]) -> None:
    if host not in LOOPBACK and not api_key:
        raise UrialError(f"refusing to listen on {host} without --api-key (only loopback is safe without one)")


def serve(assistant, host: str = "127.0.0.1", port: int = DEFAULT_PORT, api_key: Optional[str] = None,
          verbose: bool = False, ready=None) -> None:
    """Run the server until SIGTERM/SIGINT; writes and removes its discovery record."""
    check_host(host, api_key)
    assistant.tokenizer.load_full()  # a long-lived process: no per-text tokenizer rebuilds
    assistant.start()  # the prefix is ready and the engine runs on its own thread
    try:
        httpd = Server((host, port), ServeHandler)
    except OSError as e:
        raise UrialError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    httpd.assistant, httpd.api_key, httpd.verbose = assistant, api_key, verbose
    httpd.model_name, httpd.started = assistant.model_path.name, int(time.time())
    httpd.token, httpd.watchdog = secrets.token_hex(16), Watchdog()
    info = {"key": discovery.server_key(assistant.model_path, assistant.prefix_text), "host": host,
            "port": httpd.server_address[1], "token": httpd.token, "model": str(assistant.model_path),
            "prompt": assistant.prompt.name, "kv_bits": assistant.kv_bits, "api_key": bool(api_key),
            "started": httpd.started}
    record = discovery.write_record(info)

    def stop(signum, frame):
        threading.Thread(target=httpd.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    if ready:
        ready(info)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
        record.unlink(missing_ok=True)
