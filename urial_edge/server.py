"""A local OpenAI-compatible server that keeps the model and the URIAL prefix warm.

    urial-edge serve [--model M] [--prompt P] [--host 127.0.0.1] [--port 8412] [--api-key K]

Endpoints: ``POST /v1/chat/completions`` (messages become the URIAL multi-turn
frame; streamed with server-sent events or plain), ``POST /v1/completions``
(raw text continuation), ``GET /v1/models``, ``GET /health``, and the chat page
(``GET /``, ``GET /page/<file>``: serve/static.py).

This module only speaks HTTP: it parses a request, hands it to the assistant's
public API (``Assistant.stream``/``complete``), whose engine batches every
answer in flight, and streams the result back. Up to ``--max-batch`` answers
decode together and ``--max-queue`` more wait; past that a request gets 429 with
``Retry-After``. A client that goes away (streaming or not) has its answer
cancelled, which frees its slot at the next step.
"""

import json
import os
import secrets
import select
import signal
import socket
import threading
import time
import uuid
from dataclasses import asdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional, Tuple

from . import servers
from .engine import EngineBusy
from .errors import UrialError
from .options import GenerationOptions, OptionError
from .serve.static import page_response

DEFAULT_PORT = 8412
MAX_BODY = 1 << 20
DRAIN_LIMIT = 8 << 20  # a refused body up to this size is read and dropped before the 413 answer
MAX_TOKENS_LIMIT = 4096
READ_TIMEOUT = 30.0  # seconds a client may take to send its request
LISTEN_BACKLOG = 128
LOOPBACK = ("127.0.0.1", "localhost", "::1")
ERROR_TYPES = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               429: "rate_limit_error"}


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None, headers: dict = None):
        super().__init__(message)
        self.status, self.param, self.headers = status, param, headers or {}


# -- request parsing ---------------------------------------------------------------------


def parse_messages(messages) -> Tuple[str, List[Tuple[str, str]], str]:
    """OpenAI messages -> (extra system text, finished turns, the last user message)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    system, turns, pending = [], [], None
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] needs a 'role' and a string 'content'", param="messages")
        role, content = m.get("role"), m["content"]
        if role in ("system", "developer"):
            system.append(content)
        elif role == "user":
            if pending is not None:
                turns.append((pending, ""))
            pending = content
        elif role == "assistant":
            if pending is None:
                raise BadRequest(f"messages[{i}]: an assistant message must follow a user message", param="messages")
            turns.append((pending, content))
            pending = None
        else:
            raise BadRequest(f"messages[{i}]: unknown role {role!r}", param="messages")
    if pending is None or not pending.strip():
        raise BadRequest("the last message must be a non-empty user message", param="messages")
    return "\n\n".join(s.strip() for s in system if s.strip()), turns, pending


def parse_options(body: dict, defaults: GenerationOptions) -> GenerationOptions:
    """The request's generation options on top of the server's (every option in options.py)."""
    try:
        options = GenerationOptions.from_json(body, defaults)
    except OptionError as e:
        raise BadRequest(str(e), param=e.param) from None
    if options.max_tokens > MAX_TOKENS_LIMIT:
        raise BadRequest(f"'max_tokens' must be between 1 and {MAX_TOKENS_LIMIT}", param="max_tokens")
    return options


# -- HTTP ----------------------------------------------------------------------------------


class Server(ThreadingHTTPServer):
    """One thread per connection; a deep listen backlog; no tracebacks for clients that leave."""

    daemon_threads = True
    request_queue_size = LISTEN_BACKLOG

    def handle_error(self, request, client_address):
        import sys

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
    server_version = "urial-edge"
    protocol_version = "HTTP/1.1"
    timeout = READ_TIMEOUT

    def log_message(self, format, *args):  # quiet: one line per request on stderr only when verbose
        if self.server.verbose:
            super().log_message(format, *args)

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, TimeoutError, socket.timeout):
            self.close_connection = True

    # responses
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

    # routes
    def do_GET(self):
        page = page_response(self.path)  # the chat page and its files: no API key (it asks for one)
        if page is not None:
            status, headers, body = page
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            return self.wfile.write(body)
        if self.path == "/health":
            states = self.server.assistant.states
            return self.send_json(200, {"status": "ok", "model": self.server.model_name, "pid": os.getpid(),
                                        "token": self.server.token, **self.server.assistant.engine.load,
                                        "states": {"count": len(states), "bytes": states.nbytes,
                                                   "max_bytes": states.max_bytes}})
        if not self.authorized():
            return
        if self.path == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.started, "owned_by": "local"}]})
        self.send_error_json(404, f"no route {self.path}")

    def do_POST(self):
        routes = {"/v1/chat/completions": self.chat_completions, "/v1/completions": self.completions}
        try:
            if not self.authorized():
                self.close_connection = True
                return
            route = routes.get(self.path)
            if route is None:
                self.close_connection = True
                return self.send_error_json(404, f"no route {self.path}")
            route(self.read_body())
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

    def chat_completions(self, body: dict) -> None:
        system, history, query = parse_messages(body.get("messages"))
        options = parse_options(body, self.server.assistant.options)
        stream = self.server.assistant.stream(query, history=history, system=system, remember=True,
                                              **asdict(options))
        self.respond(body, "chat.completion", stream, options)

    def completions(self, body: dict) -> None:
        text = body.get("prompt")
        if not isinstance(text, str) or not text:
            raise BadRequest("'prompt' must be a non-empty string", param="prompt")
        options = parse_options(body, self.server.assistant.options.replace(stop=()))
        self.respond(body, "text_completion", self.server.assistant.complete(text, **asdict(options)), options)

    def respond(self, body: dict, kind: str, stream, options: GenerationOptions) -> None:
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        watchdog = self.server.watchdog
        watchdog.watch(self.connection, stream)
        try:
            if not body.get("stream"):
                answer = stream.finish()
                if answer.finish_reason == "cancelled":
                    self.close_connection = True
                    return
                return self.send_json(200, self.payload(kind, rid, created, answer))
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.send_header("Cache-Control", "no-cache")
            self.send_header("Connection", "close")
            self.end_headers()
            self.close_connection = True
            for piece in stream:
                self.send_event(self.chunk(kind, rid, created, piece, None))
            answer = stream.answer
            self.send_event(self.chunk(kind, rid, created, "", answer.finish_reason, answer))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (ConnectionError, TimeoutError, socket.timeout):
            stream.cancel()  # the client left: its slot frees at the next step
            self.close_connection = True
        finally:
            watchdog.forget(self.connection)

    def send_event(self, data: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()

    def usage(self, answer) -> dict:
        s = answer.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": answer.tokens,
                "total_tokens": s.prompt_tokens + answer.tokens,
                "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}

    def payload(self, kind, rid, created, answer) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": answer.text}} if kind == "chat.completion"
                  else {"index": 0, "text": answer.text, "logprobs": None})
        choice["finish_reason"] = answer.finish_reason
        return {"id": rid, "object": kind, "created": created, "model": self.server.model_name,
                "choices": [choice], "usage": self.usage(answer), "stats": answer.stats.as_dict(),
                "options": answer.options}

    def chunk(self, kind, rid, created, text, finish, answer=None) -> dict:
        if kind == "chat.completion":
            choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
            obj = "chat.completion.chunk"
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            obj = "text_completion"
        data = {"id": rid, "object": obj, "created": created, "model": self.server.model_name, "choices": [choice]}
        if answer is not None:
            data["usage"] = self.usage(answer)
            data["stats"] = answer.stats.as_dict()
            data["options"] = answer.options
        return data


# -- running -------------------------------------------------------------------------------


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
        httpd = Server((host, port), Handler)
    except OSError as e:
        raise UrialError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    httpd.assistant, httpd.api_key, httpd.verbose = assistant, api_key, verbose
    httpd.model_name, httpd.started = assistant.model_path.name, int(time.time())
    httpd.token, httpd.watchdog = secrets.token_hex(16), Watchdog()
    info = {"key": servers.server_key(assistant.model_path, assistant.prefix_text), "host": host,
            "port": httpd.server_address[1], "token": httpd.token, "model": str(assistant.model_path),
            "prompt": assistant.prompt.name, "kv_bits": assistant.kv_bits, "api_key": bool(api_key),
            "started": httpd.started}
    record = servers.write_record(info)

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
