"""The Ollama API, for the apps that speak it: ``/api/chat``, ``/api/generate``, ``/api/tags``, ``/api/ps``,
``/api/show``, ``/api/version``.

Answers stream as newline-delimited JSON unless ``"stream": false`` (Ollama's
default is to stream); the last object has ``done: true``, ``done_reason`` and
Ollama's counts and timings in nanoseconds. ``options`` map onto our generation
options (``num_predict`` -> ``max_tokens``, ``temperature``, ``top_p``,
``repeat_penalty``, ``repeat_last_n``, ``seed``, ``stop``); the others Ollama
knows (``num_ctx``, ``top_k``, ...) are ignored, as Ollama ignores options a
model does not use. A request with no messages (or no prompt) loads the model,
and with ``keep_alive: 0`` unloads it, as in Ollama. Errors are ``{"error": "..."}``.
"""

import json
import socket
import struct
import time
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

from .. import __version__
from ..model.loading import read_config, weight_files
from ..model.store import model_fingerprint
from ..runtime.prompt import render_prefix, render_turn
from .answers import (MAX_TOKENS_LIMIT, Choices, StreamStopped, TokenLogprobs, answer_events, checked_text,
                      constraint_arguments, finished, generation_options, logprobs_asked)
from .http import BadRequest, Handler
from .openai import parse_messages
from ..units import parse_keep_alive
from .pool import split_name

OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p",
           "repeat_penalty": "repetition_penalty", "repeat_last_n": "repetition_context", "seed": "seed",
           "stop": "stop"}
FOREVER_SECONDS = 2 ** 63 / 1e9  # Go's longest duration: what Ollama reports for a model kept for ever
NS = 1e9
DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


def rfc3339(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).isoformat().replace("+00:00", "Z")


def options_of(body: dict, defaults):
    """Ollama's ``options`` as our generation options; a bad value is a 400 naming Ollama's key."""
    given = body.get("options") or {}
    if not isinstance(given, dict):
        raise BadRequest("'options' must be an object", param="options")
    values = {ours: given[theirs] for theirs, ours in OPTIONS.items() if given.get(theirs) is not None}
    if values.get("max_tokens") in (-1, -2):  # Ollama: no limit / fill the context; ours: the server's limit
        values["max_tokens"] = MAX_TOKENS_LIMIT
    if values.get("repetition_context") == -1:  # Ollama: the whole context, our 0
        values["repetition_context"] = 0
    elif values.get("repetition_context") == 0:  # Ollama: no penalty
        values.pop("repetition_context")
        values["repetition_penalty"] = 1.0
    try:
        return generation_options(values, defaults)
    except BadRequest as e:
        theirs = next((t for t, o in OPTIONS.items() if o == e.param), e.param)
        raise BadRequest(str(e).replace(f"'{e.param}'", f"'options.{theirs}'"), param=theirs) from None


def format_constraint(body: dict) -> dict:
    """Ollama's ``format``: ``"json"`` (any JSON object) or a JSON schema, as constraint keyword arguments."""
    fmt = body.get("format")
    if fmt in (None, ""):
        return {}
    if fmt == "json":
        return constraint_arguments({"type": "json_object"}, "format")
    if isinstance(fmt, dict):
        return constraint_arguments({"type": "json_schema", "json_schema": {"schema": fmt}}, "format")
    raise BadRequest("'format' must be \"json\" or a JSON schema object", param="format")


def unsupported(body: dict, messages: list = ()) -> None:
    """What Ollama would do with a model that cannot: refuse it with a 400 that says so."""
    if body.get("tools"):
        raise BadRequest("this model does not support tools")
    if body.get("think"):
        raise BadRequest("this model does not support thinking")
    for key in ("suffix", "images", "context", "template"):
        if body.get(key):
            raise BadRequest(f"{key!r} is not supported (the URIAL prompt is the template: name one as model:prompt)")
    if any(isinstance(m, dict) and m.get("images") for m in messages):
        raise BadRequest("this model does not support images")


def chat(handler: Handler, body: dict) -> None:
    started = time.perf_counter()
    messages = body.get("messages") or []
    if not isinstance(messages, list):
        raise BadRequest("'messages' must be a list")
    unsupported(body, messages)
    if not messages:
        return load_only(handler, body, {"message": {"role": "assistant", "content": ""}})
    system, history, query = parse_messages(messages)
    top = logprobs_asked(body.get("logprobs"), body.get("top_logprobs"))
    constraint = format_constraint(body)
    options = options_of(body, handler.server.pool.default_options)
    with handler.server.pool.use(body.get("model"), body.get("keep_alive")) as served:
        a = served.assistant
        choices = Choices.start(lambda i: a.stream(query, history=history, system=system, remember=True,
                                                   logprobs=top, **constraint, **asdict(options)))
        respond(handler, body, served, choices, started, lambda text: {"message": {"role": "assistant",
                                                                                    "content": text}})


def generate(handler: Handler, body: dict) -> None:
    started = time.perf_counter()
    unsupported(body)
    prompt = checked_text(body.get("prompt") or "", "'prompt'", "prompt")
    if not prompt:
        return load_only(handler, body, {"response": ""})
    system = checked_text(body.get("system") or "", "'system'", "system")
    top = logprobs_asked(body.get("logprobs"), body.get("top_logprobs"))
    constraint = format_constraint(body)
    raw = bool(body.get("raw"))  # the prompt as it is, no frame: a continuation
    defaults = handler.server.pool.default_options
    options = options_of(body, defaults.replace(stop=()) if raw else defaults)
    with handler.server.pool.use(body.get("model"), body.get("keep_alive")) as served:
        a = served.assistant
        if raw:
            choices = Choices.start(lambda i: a.complete(prompt, logprobs=top, **constraint, **asdict(options)))
        else:
            choices = Choices.start(lambda i: a.stream(prompt, system=system, logprobs=top, **constraint,
                                                       **asdict(options)))
        respond(handler, body, served, choices, started, lambda text: {"response": text})


def load_only(handler: Handler, body: dict, empty: dict) -> None:
    """Ollama's way to load a model (no messages or prompt), or to unload it (and ``keep_alive: 0``)."""
    keep = body.get("keep_alive")
    pool = handler.server.pool
    if keep is not None and parse_keep_alive(keep) == 0:
        pool.expire(body.get("model"))
        reason = "unload"
    else:
        with pool.use(body.get("model"), keep):
            pass
        reason = "load"
    handler.send_json(200, {"model": body.get("model") or pool.default_name, "created_at": rfc3339(time.time()),
                            **empty, "done": True, "done_reason": reason})


def respond(handler: Handler, body: dict, served, choices: Choices, started: float, content) -> None:
    """The answer as NDJSON lines, or one object with ``"stream": false``; ``content(text)`` shapes its text."""
    logprobs = TokenLogprobs(served.assistant.tokenizer, choices)

    def line(text: str, answer=None) -> dict:
        out = {"model": served.name, "created_at": rfc3339(time.time()), **content(text), "done": answer is not None}
        entries = logprobs.new(0)
        if entries is not None:
            out["logprobs"] = [{"token": t, "logprob": lp, "top_logprobs": [{"token": a, "logprob": b} for a, b in top]}
                               for t, lp, top in entries]
        if answer is not None:
            out.update(done_reason=answer.finish_reason, **timings(answer, served.load_seconds, started))
        return out

    with handler.answering(choices):
        if body.get("stream") is False:
            answers = finished(handler, choices)
            if answers is not None:
                handler.send_json(200, line(answers[0].text, answers[0]))
            return
        handler.start_stream("application/x-ndjson")
        try:
            for _, piece, answer in answer_events(handler, choices):
                handler.send_line(line(piece or "", answer))
        except StreamStopped as e:
            handler.send_line({"error": str(e)})
        except (ConnectionError, TimeoutError, socket.timeout):
            choices.cancel()
            handler.close_connection = True


def timings(answer, load_seconds: float, started: float) -> dict:
    """Ollama's final counts and durations (nanoseconds): prompt tokens evaluated (those not from a cached
    state), their time from admission to the first token, generated tokens and their time."""
    s = answer.stats
    return {"total_duration": int((time.perf_counter() - started) * NS), "load_duration": int(load_seconds * NS),
            "prompt_eval_count": s.prefill_tokens, "prompt_eval_duration": int(max(s.ttft - s.queue_seconds, 0) * NS),
            "eval_count": answer.tokens, "eval_duration": int(max(s.total_seconds - s.ttft, 0) * NS)}


# -- models ---------------------------------------------------------------------------------------


def parameter_count(path: Path, config: dict) -> int:
    """Parameters counted from the safetensors headers (packed quantized weights unpacked, scales left out)."""
    bits = (config.get("quantization") or {}).get("bits")
    total = 0
    for f in weight_files(path):
        with open(f, "rb") as handle:
            (size,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(size))
        for name, t in header.items():
            if name == "__metadata__" or name.endswith((".scales", ".biases")):
                continue
            n = 1
            for d in t["shape"]:
                n *= d
            total += n * (32 // bits if bits and t["dtype"] == "U32" else 1)
    return total


def details(path: Path) -> dict:
    config = read_config(path)
    n = parameter_count(path, config)
    quant = config.get("quantization")
    size = f"{n / 1e9:.1f}B" if n >= 1e9 else f"{n / 1e6:.0f}M" if n >= 1e6 else f"{n / 1e3:.0f}K"
    kind = config.get("model_type", "")
    return {"parent_model": "", "format": "mlx", "family": kind, "families": [kind], "parameter_size": size,
            "quantization_level": f"Q{quant['bits']}" if quant else DTYPES.get(config.get("torch_dtype"), "F32")}


def described(name: str, path: Optional[Path]) -> dict:
    """An entry of /api/tags or /api/ps (size, digest and details only for a model already on disk)."""
    entry = {"name": name, "model": name}
    if path is not None:
        files = weight_files(path)
        entry.update(modified_at=rfc3339(max(f.stat().st_mtime for f in files)),
                     size=sum(f.stat().st_size for f in files), digest=model_fingerprint(path), details=details(path))
    return entry


def tags(handler: Handler, body: Optional[dict] = None) -> None:
    pool = handler.server.pool
    out = []
    for row in pool.servable():
        path = pool.ready_path(row)
        base = described(row["name"], path)
        out.append(base)
        out += [{**base, "name": f"{row['name']}:{p}", "model": f"{row['name']}:{p}"} for p in pool.prompt_names()]
    handler.send_json(200, {"models": out})


def ps(handler: Handler, body: Optional[dict] = None) -> None:
    out = []
    for m in handler.server.pool.loaded():
        expires = m.expires_at()
        left = FOREVER_SECONDS if expires is None else expires - time.time()
        out.append({**described(m.name, m.path), "size": m.nbytes(), "size_vram": 0,
                    "expires_at": rfc3339(time.time() + max(left, 0)),
                    "context_length": m.first.context_length,
                    "urial": {"prompts": list(m.prompts), "answering": m.users, "keep_alive": m.keep_alive}})
    handler.send_json(200, {"models": out})


def show(handler: Handler, body: dict) -> None:
    pool = handler.server.pool
    requested = body.get("model") or body.get("name")
    if not isinstance(requested, str) or not requested:
        raise BadRequest("'model' must name a model")
    name, prompt_name = split_name(requested)
    path, prompt = pool.resolve(name), pool.prompt(prompt_name)
    config = read_config(path)
    options = pool.default_options
    handler.send_json(200, {
        "modelfile": f"# served by urial-edge: {name} with the URIAL prompt {prompt.name}\nFROM {path}\n",
        "parameters": "\n".join(f"{k} {json.dumps(v)}" for k, v in options.to_json().items() if v not in (None, [])),
        "template": render_prefix(prompt) + render_turn("{{ .Prompt }}"),
        "system": prompt.system, "details": details(path), "capabilities": ["completion"],
        "model_info": {"general.architecture": config.get("model_type"),
                       "general.parameter_count": parameter_count(path, config),
                       f"{config.get('model_type')}.context_length": config.get("max_position_embeddings")},
        "modified_at": described(name, path)["modified_at"]})


def version(handler: Handler, body: Optional[dict] = None) -> None:
    handler.send_json(200, {"version": __version__})


ROUTES = {("POST", "/api/chat"): chat, ("POST", "/api/generate"): generate, ("GET", "/api/tags"): tags,
          ("GET", "/api/ps"): ps, ("POST", "/api/show"): show, ("GET", "/api/version"): version}
