"""A local OpenAI-compatible server that keeps the model and the URIAL prefix warm.

    urial-edge serve [--model M] [--prompt P] [--host 127.0.0.1] [--port 8412] [--api-key K]

Endpoints: ``POST /v1/chat/completions`` (messages become the URIAL multi-turn
frame; streamed with server-sent events or plain), ``POST /v1/completions``
(raw text continuation), ``GET /v1/models``, ``GET /health``.

One model runs one request at a time (requests queue for its worker thread). KV states of
recent conversations are kept in an LRU bounded by memory; a request that
continues a conversation starts from the longest stored state whose tokens are
a prefix of its own. A record in ``$URIAL_EDGE_HOME/servers/`` lets ``ask`` and
``chat`` find a running server for the same model and prompt.
"""

import hashlib
import itertools
import json
import os
import queue
import signal
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

from . import prompt as urial
from .store import UrialError, servers_dir, write_text_atomic

DEFAULT_PORT = 8412
MAX_BODY = 1 << 20
MAX_TOKENS_LIMIT = 4096
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, param: Optional[str] = None):
        super().__init__(message)
        self.status, self.param = status, param


# -- conversation states ----------------------------------------------------------------


class StateCache:
    """An LRU of KV states keyed by the token ids they hold, bounded by bytes."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.states: "OrderedDict[Tuple[int, ...], list]" = OrderedDict()

    @staticmethod
    def nbytes(cache: list) -> int:
        return sum(c.nbytes for c in cache)

    def longest_prefix(self, ids: Sequence[int]) -> Tuple[int, Optional[list]]:
        """The stored state with the most tokens that are all a strict prefix of ``ids``."""
        best, state = 0, None
        for key, cache in self.states.items():
            n = len(key)
            if best < n < len(ids) and tuple(ids[:n]) == key:
                best, state = n, cache
        if state is not None:
            self.states.move_to_end(tuple(ids[:best]))
        return best, state

    def put(self, ids: Sequence[int], cache: list) -> None:
        self.states[tuple(ids)] = cache
        self.states.move_to_end(tuple(ids))
        while len(self.states) > 1 and sum(self.nbytes(c) for c in self.states.values()) > self.max_bytes:
            self.states.popitem(last=False)


class Engine:
    """The loaded assistant plus conversation states.

    MLX streams belong to the thread that made them, so every model call runs
    on one worker thread; requests queue for it and receive their text pieces
    through a queue of their own.
    """

    def __init__(self, assistant, max_state_bytes: int = 2 << 30):
        self.assistant = assistant
        self.states = StateCache(max_state_bytes)
        self.prefixes: Dict[str, object] = {}
        self.jobs: "queue.Queue" = queue.Queue()
        threading.Thread(target=self._work, daemon=True, name="urial-edge-model").start()

    def _work(self) -> None:
        while True:
            start, out = self.jobs.get()
            try:
                stream = start()
                for piece in stream:
                    out.put(("piece", piece))
                out.put(("done", stream.answer))
            except Exception as e:  # handed to the request's thread, which reports it
                out.put(("error", e))

    def run(self, start) -> Iterator[Tuple[str, object]]:
        """Queue ``start`` (which returns an AnswerStream) and yield its events as they come."""
        out: "queue.Queue" = queue.Queue()
        self.jobs.put((start, out))
        while True:
            kind, value = out.get()
            if kind == "error":
                raise value
            yield kind, value
            if kind == "done":
                return

    def prefix_for(self, system_extra: str):
        """The prefix cache for the prompt with an optional extra system text (built once, saved to disk)."""
        from .prefix_cache import load_or_build

        a = self.assistant
        if not system_extra:
            return a.prefix
        if system_extra not in self.prefixes:
            ids = a.tokenizer.encode(urial.render_prefix(a.prompt, system_extra), bos=True)
            self.prefixes[system_extra] = load_or_build(
                a.model, ids, a.model_id, a.tokenizer.fingerprint,
                {"model": str(a.model_path), "prompt": a.prompt.name, "system_extra": system_extra[:200]},
                kv_bits=a.kv_bits, progress=lambda done, total: None)
        return self.prefixes[system_extra]

    def chat(self, system_extra: str, history: List[Tuple[str, str]], query: str, options, cancelled):
        """An AnswerStream for a chat turn; call it on the worker thread (see :meth:`run`)."""
        from .assistant import AnswerStream, _Run
        from .generate import Stats, prefill
        from .prefix_cache import copy_cache

        a = self.assistant
        start = time.perf_counter()
        prefix = self.prefix_for(system_extra)
        if not prefix.tokens:
            raise BadRequest("empty prefix")
        rest = a.tokenizer.encode(urial.render_history(history, query))
        ids = list(prefix.tokens) + rest
        a._check_fits(len(prefix.tokens), len(rest))
        self.states.put(prefix.tokens, prefix.state)
        start_len, state = self.states.longest_prefix(ids)
        cache = copy_cache(state)
        stats = Stats(cache_hit=True, cached_tokens=start_len, prefill_tokens=len(ids) - start_len)
        if len(ids) - start_len > 1:  # prefill all but the last token, then remember that state
            prefill(a.model, ids[start_len:-1], cache)
            self.states.put(ids[:-1], copy_cache(cache))
            start_len = len(ids) - 1
        run = _Run()
        pieces = a._generate(cache, ids[:start_len], ids[start_len:], options, stats, run, start)
        return AnswerStream(_until(pieces, cancelled), stats, run)

    def complete(self, text: str, options, cancelled):
        """Raw continuation of ``text`` (no URIAL frame), reusing any stored state it extends."""
        from .assistant import AnswerStream, _Run
        from .generate import Stats
        from .prefix_cache import copy_cache, make_cache

        a = self.assistant
        start = time.perf_counter()
        ids = a.tokenizer.encode(text, bos=True)
        a._check_fits(0, len(ids))
        n, state = self.states.longest_prefix(ids)
        cache = copy_cache(state) if state is not None else make_cache(a.model, a.kv_bits)
        stats, run = Stats(cache_hit=state is not None, cached_tokens=n), _Run()
        pieces = a._generate(cache, ids[:n], ids[n:], options, stats, run, start, framed=False)
        return AnswerStream(_until(pieces, cancelled), stats, run)


def _until(pieces: Iterator[str], cancelled) -> Iterator[str]:
    for piece in pieces:
        if cancelled():
            return
        yield piece


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


def parse_options(body: dict, defaults):
    from .generate import GenerationOptions

    fields = {}
    for name, key, kind in [("max_tokens", "max_tokens", int), ("temperature", "temperature", (int, float)),
                            ("top_p", "top_p", (int, float)), ("seed", "seed", int),
                            ("repetition_penalty", "repetition_penalty", (int, float))]:
        value = body.get(key)
        if key == "max_tokens" and value is None:
            value = body.get("max_completion_tokens")
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, kind):
            raise BadRequest(f"'{key}' must be a number", param=key)
        fields[name] = value
    if fields.get("max_tokens", 1) > MAX_TOKENS_LIMIT or fields.get("max_tokens", 1) < 1:
        raise BadRequest(f"'max_tokens' must be between 1 and {MAX_TOKENS_LIMIT}", param="max_tokens")
    stop = body.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 8:
            raise BadRequest("'stop' must be a string or a list of up to 8 non-empty strings", param="stop")
        fields["stop"] = tuple(stop)
    try:
        return replace(defaults, **fields) if fields else defaults
    except UrialError as e:
        raise BadRequest(str(e)) from None


# -- HTTP ----------------------------------------------------------------------------------


class Handler(BaseHTTPRequestHandler):
    server_version = "urial-edge"
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # quiet: one line per request on stderr only when verbose
        if self.server.verbose:
            super().log_message(format, *args)

    # responses
    def send_json(self, status: int, data: dict) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_error_json(self, status: int, message: str, param: Optional[str] = None) -> None:
        kind = {401: "authentication_error", 404: "not_found_error", 413: "invalid_request_error"}.get(
            status, "invalid_request_error" if status < 500 else "server_error")
        self.send_json(status, {"error": {"message": message, "type": kind, "param": param, "code": None}})

    def authorized(self) -> bool:
        key = self.server.api_key
        if not key:
            return True
        if self.headers.get("Authorization", "") == f"Bearer {key}":
            return True
        self.send_error_json(401, "invalid or missing API key (use 'Authorization: Bearer <key>')")
        return False

    def read_body(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            raise BadRequest("invalid Content-Length") from None
        if length > MAX_BODY:
            raise BadRequest(f"request body larger than {MAX_BODY} bytes", status=413)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise BadRequest("the request body must be a JSON object")
        return body

    # routes
    def do_GET(self):
        if self.path == "/health":
            return self.send_json(200, {"status": "ok", "model": self.server.model_name})
        if not self.authorized():
            return
        if self.path == "/v1/models":
            return self.send_json(200, {"object": "list", "data": [
                {"id": self.server.model_name, "object": "model", "created": self.server.started, "owned_by": "local"}]})
        self.send_error_json(404, f"no route {self.path}")

    def do_POST(self):
        if not self.authorized():
            return
        routes = {"/v1/chat/completions": self.chat_completions, "/v1/completions": self.completions}
        route = routes.get(self.path)
        if route is None:
            return self.send_error_json(404, f"no route {self.path}")
        try:
            route(self.read_body())
        except BadRequest as e:
            self.send_error_json(e.status, str(e), e.param)
        except UrialError as e:
            self.send_error_json(400, str(e))
        except (BrokenPipeError, ConnectionResetError):
            pass

    def chat_completions(self, body: dict) -> None:
        system, history, query = parse_messages(body.get("messages"))
        options = parse_options(body, self.server.engine.assistant.options)
        self.respond(body, "chat.completion", lambda cancelled: self.server.engine.chat(
            system, history, query, options, cancelled))

    def completions(self, body: dict) -> None:
        text = body.get("prompt")
        if not isinstance(text, str) or not text:
            raise BadRequest("'prompt' must be a non-empty string", param="prompt")
        options = parse_options(body, replace(self.server.engine.assistant.options, stop=()))
        self.respond(body, "text_completion", lambda cancelled: self.server.engine.complete(text, options, cancelled))

    def respond(self, body: dict, kind: str, start) -> None:
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        gone = threading.Event()
        events = self.server.engine.run(lambda: start(gone.is_set))
        first = next(events)  # an error before the first piece still gets a JSON error response
        if not body.get("stream"):
            answer = [value for event, value in itertools.chain([first], events) if event == "done"][0]
            return self.send_json(200, self.payload(kind, rid, created, answer.text, answer))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        try:
            for event, value in itertools.chain([first], events):
                if event == "piece":
                    self.send_event(self.chunk(kind, rid, created, value, None))
                elif value is not None:
                    self.send_event(self.chunk(kind, rid, created, "", value.finish_reason, value))
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            gone.set()  # the client left: the worker stops at its next piece; stored states stay intact
            for _ in events:
                pass

    def send_event(self, data: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
        self.wfile.flush()

    def usage(self, answer) -> dict:
        s = answer.stats
        return {"prompt_tokens": s.prompt_tokens, "completion_tokens": answer.tokens,
                "total_tokens": s.prompt_tokens + answer.tokens,
                "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}

    def payload(self, kind, rid, created, text, answer) -> dict:
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if kind == "chat.completion"
                  else {"index": 0, "text": text, "logprobs": None})
        choice["finish_reason"] = answer.finish_reason
        return {"id": rid, "object": kind, "created": created, "model": self.server.model_name,
                "choices": [choice], "usage": self.usage(answer), "stats": answer.stats.as_dict()}

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
        return data


# -- running and finding servers -------------------------------------------------------------


def server_key(model_path: Path, prefix_text: str) -> str:
    return hashlib.sha256(f"{Path(model_path).resolve()}\n{prefix_text}".encode()).hexdigest()[:16]


def check_host(host: str, api_key: Optional[str]) -> None:
    if host not in LOOPBACK and not api_key:
        raise UrialError(f"refusing to listen on {host} without --api-key (only loopback is safe without one)")


def serve(assistant, host: str = "127.0.0.1", port: int = DEFAULT_PORT, api_key: Optional[str] = None,
          verbose: bool = False, ready=None) -> None:
    """Run the server until SIGTERM/SIGINT; writes and removes its discovery record."""
    check_host(host, api_key)
    assistant.prefix  # load or build the prefix before accepting requests
    assistant.tokenizer.load_full()  # a long-lived process: no per-text tokenizer rebuilds
    try:
        httpd = ThreadingHTTPServer((host, port), Handler)
    except OSError as e:
        raise UrialError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    httpd.daemon_threads = True
    httpd.engine, httpd.api_key, httpd.verbose = Engine(assistant), api_key, verbose
    httpd.model_name, httpd.started = assistant.model_path.name, int(time.time())
    record = servers_dir() / f"{server_key(assistant.model_path, assistant.prefix_text)}.json"
    info = {"pid": os.getpid(), "host": host, "port": httpd.server_address[1], "model": str(assistant.model_path),
            "prompt": assistant.prompt.name, "api_key": bool(api_key), "started": httpd.started}
    write_text_atomic(record, json.dumps(info))

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


def running_servers() -> List[dict]:
    """Records of servers whose process is alive (stale records are removed)."""
    out = []
    folder = servers_dir()
    for f in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            info = json.loads(f.read_text())
            os.kill(info["pid"], 0)
        except (OSError, ValueError, KeyError):
            f.unlink(missing_ok=True)
            continue
        out.append({**info, "record": str(f)})
    return out


def find_server(model_path: Path, prefix_text: str) -> Optional[dict]:
    record = servers_dir() / f"{server_key(model_path, prefix_text)}.json"
    for info in running_servers():
        if info["record"] == str(record) and not info.get("api_key"):
            return info
    return None


def ask_server(info: dict, messages: List[dict], options, timeout: float = 600) -> Iterator[dict]:
    """Stream a chat completion from a running server: yields the SSE chunks as dicts."""
    import http.client

    body = {"messages": messages, "stream": True, "max_tokens": options.max_tokens,
            "temperature": options.temperature, "top_p": options.top_p,
            "repetition_penalty": options.repetition_penalty}
    if options.seed is not None:
        body["seed"] = options.seed
    if options.stop:
        body["stop"] = list(options.stop)
    conn = http.client.HTTPConnection(info["host"], info["port"], timeout=timeout)
    conn.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = conn.getresponse()
    if response.status != 200:
        message = json.loads(response.read() or b"{}").get("error", {}).get("message", f"HTTP {response.status}")
        raise UrialError(message)
    for raw in response:
        line = raw.decode().strip()
        if line.startswith("data: ") and line != "data: [DONE]":
            yield json.loads(line[6:])
    conn.close()


class RemoteChat:
    """A chat whose KV state lives in a running server (which reuses it turn by turn)."""

    def __init__(self, info: dict, options):
        self.info, self.options = info, options
        self.turns: List[Tuple[str, str]] = []

    def reset(self) -> None:
        self.turns = []

    def save(self, name: Optional[str] = None):
        raise UrialError("this chat runs in a server; use --session (or --no-daemon) for sessions saved to disk")

    def stream(self, message: str):
        from .assistant import AnswerStream, _Run
        from .generate import Stats

        messages = [m for q, a in self.turns for m in ({"role": "user", "content": q},
                                                        {"role": "assistant", "content": a})]
        messages.append({"role": "user", "content": message})
        stats, run = Stats(), _Run()

        def pieces() -> Iterator[str]:
            for chunk in ask_server(self.info, messages, self.options):
                choice = chunk["choices"][0]
                if choice.get("delta", {}).get("content"):
                    yield choice["delta"]["content"]
                if choice.get("finish_reason"):
                    run.finish_reason = choice["finish_reason"]
                    stats.__dict__.update({k: v for k, v in chunk.get("stats", {}).items() if k in stats.__dict__})

        return AnswerStream(pieces(), stats, run, on_done=lambda answer: self.turns.append((message, answer.text)))
