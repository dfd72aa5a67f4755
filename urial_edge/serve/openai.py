"""The OpenAI endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Chat messages become the URIAL multi-turn frame (``runtime/messages.py``); a
completion is a raw continuation. Both take ``response_format`` (structured
output: :func:`response_constraint`). Both hand the request to the assistant's
public API (``Assistant.stream``/``complete``) and answer with one JSON object
or with server-sent events; every answer also carries the options used and its
stats (``ttft``, ``queue_seconds``, tokens/s, cached tokens).
"""

import socket
import time
import uuid
from dataclasses import asdict
from typing import List, Optional, Tuple

from ..errors import UrialError
from ..runtime.constraints import from_response_format
from ..runtime.messages import MessageError, conversation
from ..runtime.options import GenerationOptions, OptionError
from .http import BadRequest, Handler

MAX_TOKENS_LIMIT = 4096
CHAT, TEXT = "chat.completion", "text_completion"


def parse_messages(messages) -> Tuple[str, List[Tuple[str, str]], str]:
    """OpenAI messages -> (extra system text, finished turns, the last user message)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise BadRequest(f"messages[{i}] needs a 'role' and a string 'content'", param="messages")
        pairs.append((m.get("role"), m["content"]))
    try:
        return conversation(pairs)
    except MessageError as e:
        raise BadRequest(str(e), param="messages") from None


def parse_options(body: dict, defaults: GenerationOptions) -> GenerationOptions:
    """The request's generation options on top of the server's (every option in options.py)."""
    try:
        options = GenerationOptions.from_json(body, defaults)
    except OptionError as e:
        raise BadRequest(str(e), param=e.param) from None
    if options.max_tokens > MAX_TOKENS_LIMIT:
        raise BadRequest(f"'max_tokens' must be between 1 and {MAX_TOKENS_LIMIT}", param="max_tokens")
    return options


def response_constraint(body: dict) -> dict:
    """What ``response_format`` asks the answer to be, as keyword arguments of ``Assistant.stream``/``complete``
    (none: free text): OpenAI's ``{"type": "json_object"}`` and ``{"type": "json_schema", "json_schema":
    {"schema": ...}}``, or ``regex``, ``choice`` and ``grammar`` (runtime/constraints.py). A bad one is a 400
    naming ``response_format``, before any generation. Plain JSON, as the ranks of a split model receive it."""
    try:
        constraint = from_response_format(body.get("response_format"))
    except UrialError as e:
        raise BadRequest(f"'response_format': {e}", param="response_format") from None
    return constraint.arguments() if constraint is not None else {}


def chat_completions(handler: Handler, body: dict) -> None:
    assistant = handler.server.assistant
    system, history, query = parse_messages(body.get("messages"))
    options = parse_options(body, assistant.options)
    stream = assistant.stream(query, history=history, system=system, remember=True, **response_constraint(body),
                              **asdict(options))
    respond(handler, body, CHAT, stream)


def completions(handler: Handler, body: dict) -> None:
    assistant = handler.server.assistant
    text = body.get("prompt")
    if not isinstance(text, str) or not text:
        raise BadRequest("'prompt' must be a non-empty string", param="prompt")
    options = parse_options(body, assistant.options.replace(stop=()))
    respond(handler, body, TEXT, assistant.complete(text, **response_constraint(body), **asdict(options)))


def models(handler: Handler, body: Optional[dict] = None) -> None:
    handler.send_json(200, {"object": "list", "data": [
        {"id": handler.server.model_name, "object": "model", "created": handler.server.started,
         "owned_by": "local"}]})


def respond(handler: Handler, body: dict, kind: str, stream) -> None:
    """Send the answer as one JSON object, or as server-sent events with ``"stream": true``."""
    rid = f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    created = int(time.time())
    model = handler.server.model_name
    watchdog = handler.server.watchdog
    watchdog.watch(handler.connection, stream)
    try:
        if not body.get("stream"):
            answer = stream.finish()
            if answer.finish_reason == "cancelled":
                handler.close_connection = True
                return
            return handler.send_json(200, payload(kind, rid, created, model, answer))
        handler.start_events()
        for piece in stream:
            handler.send_event(chunk(kind, rid, created, model, piece, None))
        answer = stream.answer
        handler.send_event(chunk(kind, rid, created, model, "", answer.finish_reason, answer))
        handler.wfile.write(b"data: [DONE]\n\n")
        handler.wfile.flush()
    except (ConnectionError, TimeoutError, socket.timeout):
        stream.cancel()  # the client left: its slot frees at the next step
        handler.close_connection = True
    finally:
        watchdog.forget(handler.connection)


def usage(answer) -> dict:
    s = answer.stats
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": answer.tokens,
            "total_tokens": s.prompt_tokens + answer.tokens,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}


def payload(kind: str, rid: str, created: int, model: str, answer) -> dict:
    choice = ({"index": 0, "message": {"role": "assistant", "content": answer.text}} if kind == CHAT
              else {"index": 0, "text": answer.text, "logprobs": None})
    choice["finish_reason"] = answer.finish_reason
    return {"id": rid, "object": kind, "created": created, "model": model, "choices": [choice],
            "usage": usage(answer), "stats": answer.stats.as_dict(), "options": answer.options}


def chunk(kind: str, rid: str, created: int, model: str, text: str, finish: Optional[str], answer=None) -> dict:
    if kind == CHAT:
        choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = TEXT
    data = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
    if answer is not None:
        data["usage"] = usage(answer)
        data["stats"] = answer.stats.as_dict()
        data["options"] = answer.options
    return data


ROUTES = {("POST", "/v1/chat/completions"): chat_completions, ("POST", "/v1/completions"): completions,
          ("GET", "/v1/models"): models}
