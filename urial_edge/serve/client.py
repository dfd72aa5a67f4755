"""Talking to a running server: a streamed chat completion as an :class:`AnswerStream`.

``ask`` and ``chat`` use a verified server for their model (``discovery.py``)
through this client; the benchmarks use it to load a server with clients.
"""

import http.client
import json
from typing import Iterator, List, Optional, Tuple

from ..errors import UrialError
from ..runtime.answer import Answer, AnswerStream, constrained_value
from ..runtime.engine import Stats

READ_TIMEOUT = 300.0  # between two chunks of a streamed answer (a busy server queues requests)


class ServerBusy(UrialError):
    pass


def stream_chat(info: dict, body: dict, path: str = "/v1/chat/completions") -> Iterator[dict]:
    """POST a streamed (chat) completion and check its status now; the chunks are read as iterated.

    A server that cannot be reached raises OSError, a busy one ServerBusy, before anything is read.
    """
    conn = http.client.HTTPConnection(info["host"], info["port"], timeout=READ_TIMEOUT)
    try:
        conn.request("POST", path, json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
        response = conn.getresponse()
    except http.client.HTTPException as e:
        conn.close()
        raise ConnectionError(f"no answer from the server ({type(e).__name__})") from None
    except BaseException:
        conn.close()
        raise
    if response.status != 200:
        try:
            message = json.loads(response.read() or b"{}").get("error", {}).get("message")
        except (ValueError, OSError, AttributeError):
            message = None
        conn.close()
        error = ServerBusy if response.status == 429 else UrialError
        raise error(message or f"the server answered HTTP {response.status}")
    return _chunks(conn, response)


def _chunks(conn, response) -> Iterator[dict]:
    try:
        for raw in response:
            line = raw.decode("utf-8", "replace").strip()
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])
    except (http.client.HTTPException, ValueError) as e:
        raise ConnectionError(f"the server's answer broke off ({type(e).__name__})") from None
    finally:
        conn.close()


def chat_body(messages: List[dict], options, model: Optional[str] = None, constraint=None) -> dict:
    """The request body for ``messages`` with every generation option (see options.py) and the constraint,
    for ``model`` (``name`` or ``name:prompt``; None: the server's default)."""
    return {"messages": messages, **options.to_json(), **({"model": model} if model else {}),
            **({"response_format": constraint.response_format()} if constraint is not None else {})}


def remote_stream(info: dict, messages: List[dict], options, on_done=None, constraint=None):
    """An ``AnswerStream`` of a server's answer to ``messages`` (the request is sent now) from the model
    and prompt the server's record named (``info["request_model"]``)."""
    final: dict = {}
    chunks = stream_chat(info, chat_body(messages, options, info.get("request_model"), constraint))

    def pieces() -> Iterator[str]:
        for chunk in chunks:
            if "error" in chunk:  # the server ended the stream early (it is stopping, or generation failed)
                raise UrialError(f"the server stopped the answer: {chunk['error'].get('message')}")
            choice = chunk["choices"][0]
            piece = choice.get("delta", {}).get("content") or ""
            if piece:
                yield piece
            if choice.get("finish_reason"):
                final.update(chunk)

    def result(text: str) -> Answer:
        known = {k: v for k, v in final.get("stats", {}).items() if k in Stats.__dataclass_fields__}
        tokens = final.get("usage", {}).get("completion_tokens", 0)
        reason = final["choices"][0]["finish_reason"]
        return Answer(text, tokens, reason, Stats(**known), [], final.get("options") or {},
                      f"{info['host']}:{info['port']}", constraint=constraint and constraint.digest,
                      value=constrained_value(constraint, text, reason))

    return AnswerStream(pieces(), result, on_done, strip=constraint is None)


class RemoteChat:
    """A chat whose KV state lives in a running server (which reuses it turn by turn)."""

    def __init__(self, info: dict, options):
        self.info, self.options = info, options
        self.turns: List[Tuple[str, str]] = []

    def reset(self) -> None:
        self.turns = []

    def save(self, name: Optional[str] = None):
        raise UrialError("this chat runs in a server; use --session (or --no-daemon) for sessions saved to disk")

    def stream(self, message: str, constraint=None):
        messages = [m for q, a in self.turns for m in ({"role": "user", "content": q},
                                                        {"role": "assistant", "content": a})]
        messages.append({"role": "user", "content": message})
        return remote_stream(self.info, messages, self.options, constraint=constraint,
                             on_done=lambda answer: self.turns.append((message, answer.text)))
