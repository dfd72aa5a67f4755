"""The OpenAI endpoints: ``/v1/chat/completions``, ``/v1/completions``, ``/v1/models``.

Chat messages become the URIAL multi-turn frame (``runtime/messages.py``); a
completion is a raw continuation. ``model`` picks the model and prompt
(``serve/pool.py``). Both hand the request to the assistant's public API
(``Assistant.stream``/``complete``) and answer with one JSON object or with
server-sent events; every answer also carries the options used and its stats
(``ttft``, ``queue_seconds``, tokens/s, cached tokens).

Beyond the basics: ``content`` as a list of text parts, ``n`` answers decoded
together (with a seed, answer i uses seed + i), ``stream_options.include_usage``
(a last chunk with ``choices: []`` and the usage),
``usage.prompt_tokens_details.cached_tokens`` (prompt tokens that came from a
cached state), and ``logprobs`` (chat: ``logprobs: true, top_logprobs: k``;
completions: ``logprobs: k``) from the distribution each token was drawn
from. Both take ``response_format`` (structured output:
:func:`response_constraint`). A stream the server has to end early (SIGTERM, a failed step) ends with
an error event and ``[DONE]``.
"""

import socket
import time
import uuid
from urllib.parse import unquote
from dataclasses import asdict, dataclass
from typing import List, Optional, Tuple

from ..runtime.messages import MessageError, conversation
from ..runtime.options import GenerationOptions
from .answers import (Choices, StreamStopped, TokenLogprobs, answer_events, checked_text, choice_count,
                      constraint_arguments, finished,
                      generation_options, logprobs_asked, logprobs_count, seeded)
from .http import BadRequest, Handler, error_body

CHAT, TEXT = "chat.completion", "text_completion"


def message_text(content, where: str) -> str:
    """A message's ``content``: a string, or a list of text parts (joined by newlines); other parts are refused."""
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                raise BadRequest(f"{where}.content[{j}]: only text parts are supported, got "
                                 f"{kind or type(part).__name__!r} (this model reads text only)", param="messages")
            texts.append(checked_text(part.get("text"), f"{where}.content[{j}].text", "messages"))
        return "\n".join(texts)
    return checked_text(content, f"{where}.content", "messages")


def parse_messages(messages) -> Tuple[str, List[Tuple[str, str]], str]:
    """OpenAI messages -> (extra system text, finished turns, the last user message)."""
    if not isinstance(messages, list) or not messages:
        raise BadRequest("'messages' must be a non-empty list", param="messages")
    pairs = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise BadRequest(f"messages[{i}] needs a 'role' and a 'content'", param="messages")
        if m.get("tool_calls"):
            raise BadRequest(f"messages[{i}]: tool calls are not supported", param="messages")
        content = "" if m.get("content") is None and m["role"] == "assistant" else m.get("content")
        pairs.append((m["role"], message_text(content, f"messages[{i}]")))
    try:
        return conversation(pairs)
    except MessageError as e:
        raise BadRequest(str(e), param="messages") from None


def unsupported(body: dict) -> None:
    """Refuse, with a clear 400, what would otherwise be silently ignored (the key is named)."""
    if body.get("tools") or body.get("functions"):
        raise BadRequest("tools and function calling are not supported by this server", param="tools")
    if body.get("echo"):
        raise BadRequest("echo (the prompt's own log-probabilities) is not supported", param="echo")


def include_usage(body: dict) -> bool:
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest("'stream_options' must be an object", param="stream_options")
    return bool(options and options.get("include_usage"))


def response_constraint(body: dict) -> dict:
    """What ``response_format`` asks the answer to be: OpenAI's ``{"type": "json_object"}`` and ``{"type":
    "json_schema", "json_schema": {"schema": ...}}``, or ``regex``, ``choice`` and ``grammar``."""
    return constraint_arguments(body.get("response_format"), "response_format")


def chat_completions(handler: Handler, body: dict) -> None:
    system, history, query = parse_messages(body.get("messages"))
    constraint = response_constraint(body)
    asked = requested(handler, body, handler.server.pool.default_options,
                      logprobs_asked(body.get("logprobs"), body.get("top_logprobs")))
    with handler.server.pool.use(body.get("model"), body.get("keep_alive")) as served:
        a = served.assistant
        choices = Choices.start(lambda i: a.stream(query, history=history, system=system, remember=i == 0,
                                                   logprobs=asked.logprobs, **constraint,
                                                   **asdict(seeded(asked.options, i))),
                                asked.n)
        respond(handler, body, Reply(CHAT, served.name, TokenLogprobs(a.tokenizer, choices), asked.usage), choices)


def completions(handler: Handler, body: dict) -> None:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:  # the client library's batch form, with one prompt
        prompt = prompt[0]
    text = checked_text(prompt, "'prompt'", "prompt")
    if not text:
        raise BadRequest("'prompt' must be a non-empty string", param="prompt")
    constraint = response_constraint(body)
    asked = requested(handler, body, handler.server.pool.default_options.replace(stop=()),
                      logprobs_count(body.get("logprobs"), "logprobs"))
    with handler.server.pool.use(body.get("model"), body.get("keep_alive")) as served:
        a = served.assistant
        choices = Choices.start(lambda i: a.complete(text, logprobs=asked.logprobs, **constraint,
                                                     **asdict(seeded(asked.options, i))), asked.n)
        respond(handler, body, Reply(TEXT, served.name, TokenLogprobs(a.tokenizer, choices), asked.usage), choices)


@dataclass
class Asked:
    """What a request asks for besides its text, checked before any model is loaded for it."""

    options: GenerationOptions
    n: int
    logprobs: Optional[int]
    usage: bool  # stream_options.include_usage


def requested(handler: Handler, body: dict, defaults: GenerationOptions, logprobs: Optional[int]) -> Asked:
    unsupported(body)
    return Asked(generation_options(body, defaults), choice_count(body.get("n"), handler.server.pool.max_batch),
                 logprobs, include_usage(body))


def model_entries(row: dict, pool) -> List[dict]:
    """``/v1/models`` entries of one servable model: the model (its default prompt) and model:prompt for each."""
    loaded = row["loaded"]
    prompts = pool.prompt_names()
    info = {"model": row["name"], "prompts": prompts, "default_prompt": pool.default_prompt.name}
    created = int(loaded.loaded_at) if loaded else 0
    entries = [{"id": row["name"], "object": "model", "created": created, "owned_by": "urial-edge",
                "urial": {**info, "prompt": None, "loaded": loaded is not None}}]
    for p in prompts:
        entries.append({"id": f"{row['name']}:{p}", "object": "model", "created": created, "owned_by": "urial-edge",
                        "urial": {**info, "prompt": p, "loaded": loaded is not None and p in loaded.prompts}})
    return entries


def models(handler: Handler, body: Optional[dict] = None) -> None:
    pool = handler.server.pool
    handler.send_json(200, {"object": "list", "data": [e for row in pool.servable() for e in model_entries(row, pool)]})


def model(handler: Handler, body: Optional[dict] = None) -> None:
    """``GET /v1/models/{id}``."""
    wanted = unquote(handler.path[len("/v1/models/"):])
    pool = handler.server.pool
    entry = next((e for row in pool.servable() for e in model_entries(row, pool) if e["id"] == wanted), None)
    if entry is None:
        raise BadRequest(f"model {wanted!r} not found", 404, "model")
    handler.send_json(200, entry)


def respond(handler: Handler, body: dict, reply: "Reply", choices: Choices) -> None:
    """Send the answers as one JSON object, or as server-sent events with ``"stream": true``."""
    with handler.answering(choices):
        if not body.get("stream"):
            answers = finished(handler, choices)
            if answers is not None:
                handler.send_json(200, reply.payload(answers))
            return
        handler.start_stream("text/event-stream")
        try:
            reply.stream(handler, choices)
        except StreamStopped as e:
            handler.send_event(error_body("", 503, str(e)))
            handler.wfile.write(b"data: [DONE]\n\n")
        except (ConnectionError, TimeoutError, socket.timeout):
            choices.cancel()  # the client left: the slots free at the next step
            handler.close_connection = True


class Reply:
    """The JSON of one request's answers, whole or in chunks, in OpenAI's shapes."""

    def __init__(self, kind: str, model: str, logprobs: TokenLogprobs, include_usage: bool):
        self.kind, self.model, self.logprobs, self.include_usage = kind, model, logprobs, include_usage
        self.id = f"{'chatcmpl' if kind == CHAT else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.offsets: dict = {}  # completions: each choice's text offset so far, for text_offset

    def envelope(self, obj: str, choices: list) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}

    def payload(self, answers) -> dict:
        choices = []
        for i, a in enumerate(answers):
            choice = ({"index": i, "message": {"role": "assistant", "content": a.text}} if self.kind == CHAT
                      else {"index": i, "text": a.text})
            choice.update(logprobs=self.token_logprobs(i), finish_reason=a.finish_reason)
            if len(answers) > 1:
                choice["stats"] = a.stats.as_dict()
            choices.append(choice)
        return {**self.envelope(self.kind, choices), "usage": usage(answers), "stats": answers[0].stats.as_dict(),
                "options": answers[0].options}

    def token_logprobs(self, i: int) -> Optional[dict]:
        """Choice ``i``'s new tokens' log-probabilities as OpenAI gives them (chat or legacy completions)."""
        entries = self.logprobs.new(i)
        if entries is None:
            return None
        if self.kind == CHAT:
            def item(token: str, logprob: float) -> dict:
                return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}

            return {"content": [{**item(t, lp), "top_logprobs": [item(a, b) for a, b in top]}
                                for t, lp, top in entries], "refusal": None}
        offsets = []
        for t, _, _ in entries:
            offsets.append(self.offsets.get(i, 0))
            self.offsets[i] = offsets[-1] + len(t)
        return {"tokens": [t for t, _, _ in entries], "token_logprobs": [lp for _, lp, _ in entries],
                "top_logprobs": [dict(top) for _, _, top in entries], "text_offset": offsets}

    def chunk(self, i: int, text: Optional[str], finish: Optional[str] = None, first: bool = False) -> dict:
        if self.kind == CHAT:
            delta = {"role": "assistant", "content": text or ""} if first else ({"content": text} if text else {})
            data = self.envelope("chat.completion.chunk", [{"index": i, "delta": delta}])
        else:
            data = self.envelope(TEXT, [{"index": i, "text": text or ""}])
        data["choices"][0].update(logprobs=self.token_logprobs(i), finish_reason=finish)
        if self.include_usage:
            data["usage"] = None
        return data

    def stream(self, handler: Handler, choices: Choices) -> None:
        """Every chunk, each choice's last with its stats, then (with include_usage) the usage, then [DONE]."""
        started, answers = set(), []
        for i, piece, answer in answer_events(handler, choices):
            first = self.kind == CHAT and i not in started
            started.add(i)
            if answer is None:
                handler.send_event(self.chunk(i, piece, first=first))
                continue
            answers.append(answer)
            last = self.chunk(i, None, answer.finish_reason, first=first)
            last.update(stats=answer.stats.as_dict(), options=answer.options)
            if not self.include_usage:
                last["usage"] = usage([answer])
            handler.send_event(last)
        if self.include_usage:
            tail = {**self.envelope("chat.completion.chunk" if self.kind == CHAT else TEXT, []),
                    "usage": usage(answers)}
            if len(answers) == 1:
                tail.update(stats=answers[0].stats.as_dict(), options=answers[0].options)
            handler.send_event(tail)
        handler.wfile.write(b"data: [DONE]\n\n")
        handler.wfile.flush()


def usage(answers) -> dict:
    """Token counts of a request: the prompt once, every answer's tokens; cached = prompt tokens from a stored state."""
    s = answers[0].stats
    completion = sum(a.tokens for a in answers)
    return {"prompt_tokens": s.prompt_tokens, "completion_tokens": completion,
            "total_tokens": s.prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": s.cached_tokens}}


ROUTES = {("POST", "/v1/chat/completions"): chat_completions, ("POST", "/v1/completions"): completions,
          ("GET", "/v1/models"): models, ("GET", "/v1/models/*"): model}
