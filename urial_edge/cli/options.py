"""Options shared by several commands, declared once: the model and prompt, ``--kv-bits``, ``--no-cache``,
the generation options (derived from ``runtime/options.py``), the constraints (``--schema``, ``--regex``,
``--choice``, ``--grammar``, derived from ``runtime/constraints.py``), and reading text from the user.

Nothing heavy is imported here, so ``--help`` and ``--version`` start instantly.
"""

import sys
from dataclasses import fields
from typing import Any, Callable, Optional

import click

from ..errors import UrialError
from ..runtime.constraints import KINDS, Constraint, make
from ..runtime.options import (KV_BITS, PRESETS, GenerationOptions, check, option_names, parse_kv_bits,
                               with_changes)
from ..runtime.prompt import DEFAULT_PROMPT
from ..units import parse_duration, parse_size

model_option = click.option("--model", "-m", default=None, metavar="MODEL",
                            help="Registry name, MLX model directory, .gguf file or HF repo id.")
prompt_option = click.option("--prompt", "-p", default=None, metavar="NAME_OR_PATH",
                             help=f"URIAL prompt: a shipped name ({DEFAULT_PROMPT} default) or a file.")
kv_bits_option = click.option("--kv-bits", type=click.Choice(KV_BITS), default="none", show_default=True,
                              callback=lambda ctx, param, value: parse_kv_bits(value),
                              help="Quantize the cached KV state.")


def model_options(f):
    """``--model`` and ``--prompt``."""
    return model_option(prompt_option(f))


def load_options(f):
    """Options for loading a model and prompt (before any generation option)."""
    f = click.option("--no-cache", is_flag=True, help="Skip the prefix cache: full prefill every time.")(f)
    return model_options(kv_bits_option(f))


class Checked(click.ParamType):
    """A value made by ``parse`` (one of our checks or parsers): its UrialError is a bad option value, exit 2."""

    def __init__(self, parse: Callable[[str], Any], name: str):
        self.parse, self.name = parse, name

    def convert(self, value, param, ctx):
        if not isinstance(value, str):  # a default that is already converted
            return value
        try:
            return self.parse(value)
        except UrialError as e:
            self.fail(str(e), param, ctx)


SIZE = Checked(parse_size, "size")
DURATION = Checked(parse_duration, "duration")


def _number(text: str):
    try:
        return float(text) if any(c in text.lower() for c in ".ein") else int(text)
    except ValueError:
        raise UrialError(f"{text[:40]!r} is not a number") from None


def option_value(option: str) -> Checked:
    """A generation option's value, checked by its declaration in runtime/options.py."""
    if option == "stop":
        return Checked(lambda text: check("stop", [text])[0], "stop")
    return Checked(lambda text: check(option, _number(text)), option.replace("_", "-"))


def _all_stops(ctx, param, value):
    """Every ``--stop`` together: their number is bounded too."""
    try:
        return check("stop", value)
    except UrialError as e:
        raise click.BadParameter(str(e), ctx, param) from None


def declared_options(f):
    """The generation options of runtime/options.py as click options (derived from there, not listed here)."""
    for item in reversed(fields(GenerationOptions)):
        spec = item.metadata["spec"]
        default = "" if item.default in (None, ()) else f" [default: {item.default}]"
        metavar = {"stop": "TEXT", "seed": "INTEGER"}.get(item.name, type(item.default).__name__.upper())
        repeated = item.name == "stop"
        f = click.option(*spec.flags, item.name, type=option_value(item.name), default=None, metavar=metavar,
                         multiple=repeated, callback=_all_stops if repeated else None, help=spec.help + default)(f)
    return f


def generation_options(f):
    """The declared generation options and --preset (a named set of them)."""
    return click.option("--preset", type=click.Choice(sorted(PRESETS)), default=None,
                        help="Start from a named set of options (see README); the options below override it.")(
        declared_options(f))


def constraint_options(f):
    """The constraint options of runtime/constraints.py (structured output), at most one of them per command."""
    for kind in reversed(list(KINDS.values())):
        f = click.option(kind.flag, kind.name, metavar=kind.metavar, default=None, multiple=kind.multiple,
                         help=kind.help)(f)
    return f


def split_constraint(kwargs: dict) -> Optional[Constraint]:
    """Pop the constraint options from ``kwargs``; the checked Constraint they give, or None. A bad one exits 2
    naming its option, before any model loads."""
    given = {name: kwargs.pop(name) for name in KINDS}
    given = {name: value for name, value in given.items() if value not in (None, ())}
    if len(given) > 1:
        flags = [KINDS[name].flag for name in given]
        raise click.BadParameter(f"give one constraint, not {' and '.join(flags)}", param_hint=flags[-1])
    if not given:
        return None
    (name, value), = given.items()
    kind = KINDS[name]
    try:
        return make(name, tuple(kind.read(v) for v in value) if kind.multiple else kind.read(value))
    except UrialError as e:
        raise click.BadParameter(str(e), param_hint=kind.flag) from None


def split_generation(kwargs: dict) -> GenerationOptions:
    """Pop the generation options (and --preset) from ``kwargs``; return the GenerationOptions they make."""
    changes = {name: kwargs.pop(name) for name in option_names()}
    return with_changes(kwargs.pop("preset"), changes)


def load_assistant(model, prompt, kv_bits: Optional[int], no_cache: bool, options=None, **load):
    """The Assistant the options name (imports MLX: call it only once the command needs the model)."""
    from ..runtime.assistant import Assistant

    assistant = Assistant.load(model, prompt, kv_bits=kv_bits, cache=not no_cache, **load)
    if options is not None:
        assistant.options = options
    return assistant


def standard_input(problem: str):
    """``sys.stdin``; a closed one (``<&-``, left None by ``main.guard_standard_streams``) is the one-line
    error ``problem``."""
    if sys.stdin is None:
        raise UrialError(problem)
    return sys.stdin


def read_stdin() -> str:
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UrialError(f"standard input is not valid UTF-8 (byte {e.start})") from None


def text_argument(value: Optional[str], name: str) -> Optional[str]:
    """A command-line text that survived the OS's decoding (exit 2 if it holds invalid UTF-8)."""
    if value is not None:
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise click.BadParameter("not valid UTF-8", param_hint=name) from None
    return value
