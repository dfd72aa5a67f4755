"""HTTP plumbing for ``urial-edge serve``: connections, request bodies, JSON errors, routing, disconnects.

Endpoints live in their own modules (``openai.py``; ``run.py`` adds ``/health``)
as functions ``route(handler, body)`` registered in a table; this module knows
nothing of what they answer. Every error has the OpenAI JSON shape, and a
client that closes its connection has its answer cancelled (:class:`Watchdog`).
"""

import json
import secrets
import select
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Optional, Tuple

from ..errors import UrialError
from ..runtime.engine import EngineBusy

MAX_BODY = 1 << 20
DRAIN_LIMIT = 8 << 20  # a refused body up to this size is read and dropped before the 413 answer
READ_TIMEOUT = 30.0  # seconds a client may take to send its request
LISTEN_BACKLOG = 128
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               429: "rate_limit_error"}

Route = Callable[["Handler", Optional[dict]], None]  # POST routes get the JSON body, GET routes None
Files = Callable[[str], Optional[Tuple[int, Dict[str, str], bytes]]]  # a path -> (status, headers, body) or None


class BadRequest(Exception):
    """A request we refuse, with its HTTP status (and the request key at fault, if one is)."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, headers: dict = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers or {}


class Server(ThreadingHTTPServer):
    """One thread per connection; a deep listen backlog; no tracebacks for clients that leave."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError, socket.timeout)):
            return
        super().handle_error(request, client_address)


class Watchdog:
    """Cancels the answers of clients that close their connection, streaming or not."""

    def __init__(self):
        self.watched = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._run, name="urial-edge-watchdog", daemon=True).start()

    def watch(self, sock: socket.socket, stream) -> None:
        with self.lock:
            self.watched[sock] = stream

    def forget(self, sock: socket.socket) -> None:
        with self.lock:
            self.watched.pop(sock, None)

    def _run(self) -> None:
        while True:
            with self.lock:
                socks = list(self.watched)
            if not socks:
                time.sleep(0.1)
                continue
            try:
                readable, _, broken = select.select(socks, [], socks, 0.1)
            except (OSError, ValueError):
                readable, broken = [], [s for s in socks if s.fileno() < 0]
            for sock in set(readable) | set(broken):
                if sock in broken or _closed(sock):
                    with self.lock:
                        stream = self.watched.pop(sock, None)
                    if stream is not None:
                        stream.cancel()
            time.sleep(0.05)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


class Handler(BaseHTTPRequestHandler):
    """Routes ``(method, path)`` through :attr:`routes`; paths in :attr:`public` need no API key, and
    neither do the static files :attr:`files` serves (a page must load before it can ask for a key)."""

    server_version = "urial-edge"
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT
    routes: Dict[Tuple[str, str], Route] = {}
    public: Tuple[str, ...] = ()
    files: Optional[Files] = None

    def log_message(self, format, *args):  # quiet: one line per request on stderr only when verbose
        if self.server.verbose:
            super().log_message(format, *args)

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True

    # -- responses ------------------------------------------------------------------------

    def send_json(self, status: int, data: dict, headers: dict = None) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, status: int, message: str, param: Optional[str] = None, headers: dict = None) -> None:
        kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        code = "rate_limit_exceeded" if status == 429 else None
        try:
            self.send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": code}},
                           headers)
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, oversized headers, ...) in the same JSON shape."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparseable request line: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        self.send_error_json(code, message or self.responses.get(code, ("error",))[0])

    def start_events(self) -> None:
        """Begin a server-sent-events answer (the connection closes after it)."""
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def send_event(self, data: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()

    # -- requests ---------------------------------------------------------------------------

    def authorized(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        if secrets.compare_digest(self.headers.get("Authorization", ""), f"Bearer {key}"):
            return True
        self.send_error_json(401, "invalid or missing API key (use 'Authorization: Bearer <key>')")
        return False

    def read_body(self) -> dict:
        raw = self.headers.get("Content-Length")
        if self.headers.get("Transfer-Encoding"):
            raise BadRequest("chunked request bodies are not supported; send Content-Length", status=411)
        if raw is None:
            raise BadRequest("a Content-Length header is required", status=411)
        if not raw.strip().isdigit():
            raise BadRequest(f"invalid Content-Length {raw[:20]!r}")
        length = int(raw)
        if length > MAX_BODY:
            self.discard(length)
            raise BadRequest(f"request body larger than {MAX_BODY} bytes", status=413)
        data = self.rfile.read(length)
        if len(data) < length:
            raise BadRequest("the request body is shorter than its Content-Length")
        try:
            body = json.loads(data or b"null")
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def discard(self, length: int) -> None:
        """Read and drop a refused body that is not absurdly large, so that the client can read our answer."""
        if length > DRAIN_LIMIT:
            return
        self.connection.settimeout(2.0)
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
        except (socket.timeout, OSError):
            pass

    # -- routing ------------------------------------------------------------------------------

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def send_file(self, status: int, headers: Dict[str, str], body: bytes) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(body)

    def dispatch(self, method: str) -> None:
        try:
            found = self.files(self.path) if method == "GET" and self.files is not None else None
            if found is not None:
                return self.send_file(*found)
            if self.path not in self.public and not self.authorized():
                self.close_connection = method != "GET"
                return
            route = self.routes.get((method, self.path))
            if route is None:
                self.close_connection = method != "GET"
                return self.send_error_json(404, f"no route {self.path}")
            route(self, self.read_body() if method == "POST" else None)
        except BadRequest as e:
            self.close_connection = True  # the body may be unread: the connection cannot be reused
            self.send_error_json(e.status, str(e), e.param, e.headers)
        except EngineBusy as e:
            self.send_error_json(429, str(e), headers={"Retry-After": str(e.retry_after)})
        except UrialError as e:
            self.send_error_json(400, str(e))
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True

    def not_allowed(self):
        self.close_connection = True
        self.send_error_json(405, f"method {self.command} is not allowed on {self.path}")

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = not_allowed
