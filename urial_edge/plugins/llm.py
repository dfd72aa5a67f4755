"""A plugin for ``llm`` (simonw/llm): every local model as ``urial-edge/<name>``.

    llm models                                              # lists urial-edge/gemma-3-270m, ...
    llm -m urial-edge/gemma-3-270m "What is a prime number?"
    llm chat -m urial-edge/gemma-3-270m -o temperature 0.3
    llm -m urial-edge/gemma-3-270m -o urial_prompt urial-k1 -o kv_bits 8 "..."

llm finds this module through the ``llm`` entry point in pyproject.toml.
Listing models imports no MLX; a prompt loads its Assistant (weights,
tokenizer, prefix KV state) once per (model, prompt, kv_bits) per process.
Each llm conversation gets a ChatSession, so in ``llm chat`` a turn only
prefills its own tokens; a conversation llm reloads from its log (``llm -c``)
is rebuilt from its turns with one prefill. The usage llm logs counts the
prompt tokens that came from stored KV state as ``cached_tokens``. ``llm
--schema`` constrains the answer to the schema (structured output,
``runtime/constraints.py``), so the JSON llm records always parses. Needs
llm 0.36 or later (``prompt.messages``).
"""

from dataclasses import asdict, fields
from typing import Dict, List, Optional, Tuple

import llm
from pydantic import Field, create_model, field_validator

from ..errors import UrialError
from ..model.backend import prepare
from ..model.store import list_models
from ..runtime.messages import conversation
from ..runtime.options import (PRESETS, GenerationOptions, check, option_names, option_spec, parse_kv_bits, preset,
                               with_changes)
from ..runtime.prompt import DEFAULT_PROMPT

MODEL_PREFIX = "urial-edge/"
LOAD_OPTIONS = {
    # not "prompt": llm passes options as keyword arguments beside its own prompt argument
    "urial_prompt": (str, f"URIAL prompt: a shipped name (default {DEFAULT_PROMPT}) or a .toml/.txt file."),
    "kv_bits": (int, "Quantize the cached KV state to 4 or 8 bits (default: not quantized)."),
    "preset": (str, f"Start from a named set of generation options ({', '.join(PRESETS)}); the options given "
               "override it."),
}

_assistants: Dict[tuple, object] = {}
_chats: Dict[Tuple[tuple, str], object] = {}


def _check_option(cls, value, info):
    """Each option checked by the same rules as the command line; llm shows the message."""
    if value is None:
        return None
    name = info.field_name
    try:
        if name == "kv_bits":
            parse_kv_bits(value)
        elif name == "preset":
            preset(value)
        elif name in option_names():
            check(name, value)
    except UrialError as e:
        raise ValueError(str(e)) from None
    return value


def _options_class():
    """llm's ``-o`` options, derived from options.GenerationOptions plus the load options."""
    declared = dict(LOAD_OPTIONS)
    for f in fields(GenerationOptions):
        kind = {"seed": int, "stop": str}.get(f.name, type(f.default))
        text = "An extra stop string." if f.name == "stop" else option_spec(f.name).help
        text += "" if f.default in (None, ()) else f" Default {f.default}."
        declared[f.name] = (kind, text)
    attributes = {name: (Optional[kind], Field(None, description=text)) for name, (kind, text) in declared.items()}
    validator = field_validator(*declared)(classmethod(_check_option))
    return create_model("Options", __base__=llm.Options, __validators__={"check_option": validator}, **attributes)


class UrialModel(llm.Model):
    """A base model in the urial-edge store, aligned by a cached URIAL prompt."""

    can_stream = True
    supports_schema = True  # llm passes prompt.schema (a dict): the answer is constrained to it
    Options = _options_class()

    def __init__(self, name: str):
        self.name = name
        self.model_id = MODEL_PREFIX + name

    def execute(self, prompt, stream, response, conversation):
        opts = prompt.options
        key = (self.name, opts.urial_prompt, opts.kv_bits)
        bot = _assistant(key)
        generation = asdict(with_changes(opts.preset, {n: getattr(opts, n) for n in option_names()}))
        generation["schema"] = prompt.schema
        system, history, query = _conversation(prompt)
        rebuilt = 0
        if system or conversation is None:
            answer_stream = bot.stream(query, history=history, system=system, **generation)
        else:
            session, rebuilt = _chat(bot, key, conversation.id, history)
            answer_stream = session.stream(query, **generation)
        yield from answer_stream
        answer = answer_stream.answer
        response.set_usage(input=answer.stats.prompt_tokens, output=answer.tokens,
                           details={"cached_tokens": answer.stats.cached_tokens - rebuilt})


def _assistant(key: tuple):
    """The Assistant for (model, prompt, kv_bits), loaded on first use in this process."""
    if key not in _assistants:
        prepare()  # llm's own process: only now, when a urial-edge model is used (see model/backend.py)
        from ..runtime.assistant import Assistant

        name, prompt, kv_bits = key
        _assistants[key] = Assistant.load(name, prompt, kv_bits=kv_bits)
    return _assistants[key]


def _text(message) -> str:
    return "".join(getattr(part, "text", "") for part in message.parts).strip()


def _conversation(prompt) -> Tuple[str, List[Tuple[str, str]], str]:
    """The system text, earlier ``(query, answer)`` turns and the new query of ``prompt.messages``
    (llm 0.36 and later give the whole conversation there, also when reloaded from its log with ``-c``),
    by the rule of ``runtime/messages.py``."""
    return conversation((m.role, _text(m)) for m in prompt.messages)


def _chat(bot, key: tuple, conversation_id: str, history: List[Tuple[str, str]]):
    """This conversation's ChatSession, and how many tokens were prefilled now to rebuild it.

    The live session is used if it holds exactly ``history``; otherwise (a
    conversation continued from llm's log, an edited history) it is rebuilt.
    """
    from ..runtime.chat import ChatSession  # imports MLX: only once a model is used

    session = _chats.get((key, conversation_id))
    if session is not None and session.turns == history:
        return session, 0
    session = _chats[(key, conversation_id)] = ChatSession.from_turns(bot, history)
    return session, len(session.ids) - len(bot.prefix.tokens)


@llm.hookimpl
def register_models(register) -> None:
    """Every model that answers without a download: the bundled default, the store, pulled models."""
    for row in list_models():
        if row["local"]:
            register(UrialModel(row["name"]))
