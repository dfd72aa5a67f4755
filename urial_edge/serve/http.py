"""HTTP plumbing for ``urial-edge serve``: connections, request bodies, JSON errors, routing, disconnects.

Endpoints live in the module of their API (``openai.py``, ``ollama.py``;
``run.py`` adds ``/health``) as functions ``route(handler, body)`` registered in
a table; this module knows nothing of what they answer. Every request gets an
HTTP answer: errors have the JSON shape of the API the path belongs to (Ollama's
``{"error": "..."}`` under ``/api/``, OpenAI's elsewhere), unexpected failures
included.

Slow or hostile clients are bounded: a request's head and body must arrive
within ``request_timeout`` seconds of its first byte however the client trickles
them in (else 408), an idle connection is closed after the same time, and past
``max_connections`` open connections a new one is answered 503 at once. A
client that closes its connection has its answer cancelled (:class:`Watchdog`).
"""

import contextlib
import io
import json
import os
import secrets
import select
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable, Dict, Iterator, Optional, Tuple

from ..errors import UrialError, one_line
from ..log import warn
from ..runtime.engine import EngineBusy
from ..runtime.validate import loads

MAX_BODY = 1 << 20
DRAIN_LIMIT = 8 << 20  # a refused body up to this size is read and dropped before the 413 answer
REQUEST_TIMEOUT = 30.0  # seconds for a request's head and body, and for an idle connection
WRITE_TIMEOUT = 60.0  # seconds a client may leave our answer unread before we give up on it
MAX_CONNECTIONS = 256
LINGER = 2.0  # seconds a refused connection is read from (and dropped) before it is closed
LISTEN_BACKLOG = 128
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               429: "rate_limit_error"}
ERROR_CODES = {429: "rate_limit_exceeded", 503: "unavailable", 408: "timeout"}

Route = Callable[["Handler", Optional[dict]], None]  # POST routes get the JSON body, GET routes None
Files = Callable[[str], Optional[Tuple[int, Dict[str, str], bytes]]]  # a path -> (status, headers, body) or None


class BadRequest(Exception):
    """A request we refuse, with its HTTP status (and the request key at fault, if one is)."""

    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, headers: dict = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers or {}


class RequestTimeout(Exception):
    """The request's head and body did not arrive before its deadline (deliberately not a TimeoutError,
    which http.server swallows without an answer)."""


def ollama_path(path: str) -> bool:
    return path.startswith("/api/")


def error_body(path: str, status: int, message: str, param: Optional[str] = None) -> dict:
    """An error in the shape of the API ``path`` belongs to."""
    if ollama_path(path):
        return {"error": message}
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": ERROR_CODES.get(status)}}


class DeadlineReader(io.RawIOBase):
    """A connection's reads, bounded by the current request's deadline as a whole.

    A socket timeout bounds each read alone, so a client that sends one byte a
    second (slowloris) would hold its connection for ever; here every read gets
    only what is left of the request's time. Between requests (``deadline`` None)
    a read waits at most ``idle`` seconds, then the connection closes.
    """

    def __init__(self, sock: socket.socket, idle: float):
        self.sock, self.idle = sock, idle
        self.deadline: Optional[float] = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        wait = self.idle if self.deadline is None else self.deadline - time.monotonic()
        if wait <= 0:
            raise RequestTimeout()
        self.sock.settimeout(wait)
        try:
            return self.sock.recv_into(buffer)
        except socket.timeout:
            if self.deadline is not None:
                raise RequestTimeout() from None
            raise


class Server(ThreadingHTTPServer):
    """One thread per connection up to a cap; IPv4 or IPv6 by the host; no tracebacks for clients that leave."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def __init__(self, address: Tuple[str, int], handler, max_connections: int = MAX_CONNECTIONS,
                 request_timeout: float = REQUEST_TIMEOUT):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.max_connections, self.request_timeout = max_connections, request_timeout
        self.connections = 0
        self.requests = 0  # requests being handled: read, and not yet answered
        self._count = threading.Lock()
        self.stopping = threading.Event()  # set on SIGTERM: answers end with a final event, new ones get 503
        self.watchdog = Watchdog()
        self.api_key: Optional[str] = None
        self.verbose = False
        super().__init__(address, handler)

    def process_request(self, request, client_address):
        with self._count:
            full = self.connections >= self.max_connections
            if not full:
                self.connections += 1
        if full:
            return self.refuse(request)
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self._count:
            self.connections -= 1

    @contextlib.contextmanager
    def handling(self) -> Iterator[None]:
        """Count a request as in flight until its answer is sent (a server that stops waits for them)."""
        with self._count:
            self.requests += 1
        try:
            yield
        finally:
            with self._count:
                self.requests -= 1

    def refuse(self, request: socket.socket) -> None:
        """Answer 503 without a thread; the watchdog drains and closes the socket (closing it with the
        request unread would reset the connection before the client reads the answer)."""
        body = json.dumps(error_body("", 503, f"too many open connections (at most {self.max_connections}); "
                                              "try again")).encode()
        head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: "
                f"{len(body)}\r\nRetry-After: 1\r\nConnection: close\r\n\r\n").encode()
        try:
            request.setblocking(False)
            request.send(head + body)  # a few hundred bytes: the socket's buffer takes them at once
            request.shutdown(socket.SHUT_WR)
        except OSError:
            request.close()
            return
        self.watchdog.linger(request)

    def handle_error(self, request, client_address):
        error = sys.exc_info()[1]
        if isinstance(error, (ConnectionError, TimeoutError, socket.timeout)):
            return
        super().handle_error(request, client_address)


class Watchdog:
    """Cancels the answers of clients that close their connection, streaming or not; and drains, then
    closes, connections refused at the door."""

    def __init__(self):
        self.watched: Dict[socket.socket, object] = {}
        self.lingering: Dict[socket.socket, float] = {}
        self.lock = threading.Lock()
        threading.Thread(target=self._run, name="urial-edge-watchdog", daemon=True).start()

    def watch(self, sock: socket.socket, answers) -> None:
        """Cancel ``answers`` (anything with ``cancel()``) if ``sock``'s client goes away."""
        with self.lock:
            self.watched[sock] = answers

    def forget(self, sock: socket.socket) -> None:
        with self.lock:
            self.watched.pop(sock, None)

    def linger(self, sock: socket.socket) -> None:
        with self.lock:
            self.lingering[sock] = time.monotonic() + LINGER

    def cancel_all(self) -> None:
        with self.lock:
            answers = list(self.watched.values())
        for a in answers:
            a.cancel()

    def _run(self) -> None:
        while True:
            with self.lock:
                watched, lingering = list(self.watched), dict(self.lingering)
            socks = watched + list(lingering)
            if not socks:
                time.sleep(0.1)
                continue
            try:
                readable, _, broken = select.select(socks, [], socks, 0.1)
            except (OSError, ValueError):
                readable, broken = [], [s for s in socks if s.fileno() < 0]
            ready = set(readable) | set(broken)
            for sock in watched:
                if sock in ready and (sock in broken or _closed(sock)):
                    with self.lock:
                        answers = self.watched.pop(sock, None)
                    if answers is not None:
                        answers.cancel()
            for sock, until in lingering.items():
                if time.monotonic() > until or (sock in ready and _drained(sock)):
                    with self.lock:
                        self.lingering.pop(sock, None)
                    sock.close()
            time.sleep(0.05)


def _closed(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _drained(sock: socket.socket) -> bool:
    """Read and drop what a refused client sent; True once it has closed its side."""
    try:
        return sock.recv(1 << 16) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def matches(pattern: str, path: str) -> bool:
    """``path`` is ``pattern``, or lies under a pattern that ends in ``/*``."""
    return path == pattern or (pattern.endswith("/*") and path.startswith(pattern[:-1]))


class Handler(BaseHTTPRequestHandler):
    """Routes ``(method, path)`` through :attr:`routes`; paths in :attr:`public` need no API key, and
    neither do the static files :attr:`files` serves (a page must load before it can ask for a key).

    A route key or a public path ending in ``/*`` (``("GET", "/v1/models/*")``) covers every path under it.
    """

    server_version = "urial-edge"
    protocol_version = "HTTP/1.1"
    routes: Dict[Tuple[str, str], Route] = {}
    public: Tuple[str, ...] = ()
    files: Optional[Files] = None

    def log_message(self, format, *args):  # quiet: one line per request on stderr only when verbose
        if self.server.verbose:
            super().log_message(format, *args)

    def setup(self):
        super().setup()
        self.rfile.close()  # http.server's own buffered reader: ours bounds the whole request instead
        self.reader = DeadlineReader(self.connection, self.server.request_timeout)
        self.rfile = io.BufferedReader(self.reader)

    def handle(self):
        try:
            super().handle()
        except RequestTimeout:
            self.request_timed_out()
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True

    def handle_one_request(self):
        """Wait (at most the idle time) for a request's first byte, then give it the request deadline."""
        self.reader.deadline = None
        self.requestline, self.request_version, self.command, self.path = "", "HTTP/1.1", None, ""
        if not self.rfile.peek(1):
            self.close_connection = True
            return
        self.reader.deadline = time.monotonic() + self.server.request_timeout
        super().handle_one_request()

    def request_received(self) -> None:
        """The head and body are in: from now on only writes are timed (a client must read its answer)."""
        self.reader.deadline = None
        self.connection.settimeout(WRITE_TIMEOUT)

    def request_timed_out(self) -> None:
        self.close_connection = True
        self.send_error_json(408, f"the request was not received within {self.server.request_timeout:g} seconds")

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
        try:
            self.send_json(status, error_body(self.path, status, message, param), headers)
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True

    def send_error(self, code, message=None, explain=None):
        """http.server's own errors (a bad request line, oversized headers, ...) in the same JSON shape."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # an unparseable request line: answer with a status line anyway
            self.request_version = "HTTP/1.0"
        self.send_error_json(code, message or self.responses.get(code, ("error",))[0])

    def start_stream(self, content_type: str) -> None:
        """Begin an answer sent as it is generated (the connection closes after it)."""
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True

    def send_event(self, data: dict) -> None:
        """One server-sent event (OpenAI streaming)."""
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()

    def send_line(self, data: dict) -> None:
        """One line of newline-delimited JSON (Ollama streaming)."""
        self.wfile.write(json.dumps(data).encode() + b"\n")
        self.wfile.flush()

    # -- requests ---------------------------------------------------------------------------

    def has_key(self) -> bool:
        """Whether the request carries the server's API key (``Authorization: Bearer KEY``, any case)."""
        key = self.server.api_key
        scheme, _, token = self.headers.get("Authorization", "").strip().partition(" ")
        # header text is decoded as Latin-1: its bytes are what the client sent, the key's are UTF-8
        return bool(key) and scheme.lower() == "bearer" and secrets.compare_digest(
            token.strip().encode("latin-1", "replace"), key.encode("utf-8", "surrogateescape"))

    def authorized(self) -> bool:
        if not self.server.api_key or self.has_key():
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
            body = loads(data or b"null", "the request body")
        except UrialError as e:
            raise BadRequest(str(e)) from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    def discard(self, length: int) -> None:
        """Read and drop a refused body that is not absurdly large, so that the client can read our answer."""
        if length > DRAIN_LIMIT:
            return
        self.reader.deadline = min(self.reader.deadline or float("inf"), time.monotonic() + 2.0)
        try:
            while length > 0:
                chunk = self.rfile.read(min(length, 1 << 16))
                if not chunk:
                    break
                length -= len(chunk)
        except (RequestTimeout, OSError):
            pass

    def answering(self, answers):
        """While an answer is sent: a client that leaves has it cancelled (so does a server that stops)."""
        return _Watched(self, answers)

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
        with self.server.handling():
            self._dispatch(method)

    def _dispatch(self, method: str) -> None:
        self.path = self.path.split("?", 1)[0]
        try:
            found = self.files(self.path) if method == "GET" and self.files is not None else None
            if found is not None:
                return self.send_file(*found)
            if not any(matches(p, self.path) for p in self.public) and not self.authorized():
                self.close_connection = method != "GET"
                return
            route = next((r for (m, p), r in self.routes.items() if m == method and matches(p, self.path)), None)
            if route is None:
                self.close_connection = method != "GET"
                return self.send_error_json(404, f"no route {self.path}")
            body = self.read_body() if method == "POST" else None
            self.request_received()
            if self.server.stopping.is_set():
                raise BadRequest("the server is shutting down", status=503)
            route(self, body)
        except BadRequest as e:
            self.close_connection = True  # the body may be unread: the connection cannot be reused
            self.send_error_json(e.status, str(e), e.param, e.headers)
        except EngineBusy as e:
            self.send_error_json(429, str(e), headers={"Retry-After": str(e.retry_after)})
        except UrialError as e:
            self.send_error_json(400, one_line(e))
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True
        except RequestTimeout:
            raise
        except Exception as e:  # never a dropped connection: a one-line log entry and a 500
            self.internal_error(e)

    def internal_error(self, error: Exception) -> None:
        if os.environ.get("URIAL_EDGE_DEBUG"):
            traceback.print_exc()
        warn(f"{self.command} {self.path} failed: {type(error).__name__}: {one_line(error)}")
        self.close_connection = True
        self.send_error_json(500, f"internal error: {type(error).__name__}: {one_line(error)}")

    def not_allowed(self):
        self.close_connection = True
        self.send_error_json(405, f"method {self.command} is not allowed on {self.path}")

    do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = do_TRACE = do_CONNECT = not_allowed


class _Watched:
    def __init__(self, handler: Handler, answers):
        self.handler, self.answers = handler, answers

    def __enter__(self):
        self.handler.server.watchdog.watch(self.handler.connection, self.answers)
        return self.answers

    def __exit__(self, *exc):
        self.handler.server.watchdog.forget(self.handler.connection)
        return False
