"""Generation options, declared once.

Each field of :class:`GenerationOptions` carries an :class:`OptionSpec`: its
command-line flags, help text, allowed range and JSON keys. The click options
of ``ask``/``chat``/``batch``/``eval``, the server's request parsing and what
``ask`` forwards to a running server are all derived from these fields, so a new
option is added here and nowhere else (plus the engine code that acts on it).

Presets bundle settings under a name: ``default`` (our setup: greedy, penalty
1.1 over the last 64 tokens) and the two decoding setups the URIAL authors
published for MT-Bench (see README).
"""

import math
from dataclasses import dataclass, field, fields, replace
from typing import Any, Dict, Optional, Tuple

from ..errors import UrialError

MAX_STOP_STRINGS = 8
LONGEST = 1 << 30  # more tokens than any model's context: the bound of counts (and "0 = all" for the penalty)
MAX_SEED = (1 << 63) - 1
KV_BITS = ("4", "8", "none")  # how the stored prefix state may be quantized, as users write it


@dataclass(frozen=True)
class OptionSpec:
    """How one option appears on the command line and in JSON, and its valid range."""

    flags: Tuple[str, ...]
    help: str
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    json_keys: Tuple[str, ...] = ()  # accepted request keys; the first is the one we send


def spec(*flags: str, help: str, **kwargs) -> dict:
    return {"spec": OptionSpec(tuple(flags), help, **kwargs)}


@dataclass(frozen=True)
class GenerationOptions:
    """Decoding settings for one answer. Invalid values raise :class:`UrialError`."""

    max_tokens: int = field(default=512, metadata=spec(
        "--max-tokens", help="Most tokens to generate.", low=1, high=LONGEST,
        json_keys=("max_tokens", "max_completion_tokens")))
    temperature: float = field(default=0.0, metadata=spec(
        "--temperature", "--temp", help="Sampling temperature; 0 is greedy.", low=0.0, high=5.0))
    top_p: float = field(default=1.0, metadata=spec(
        "--top-p", help="Nucleus sampling: keep the smallest set of tokens with this much probability.",
        low=0.0, high=1.0, low_open=True))
    repetition_penalty: float = field(default=1.1, metadata=spec(
        "--repetition-penalty", help="Divide the scores of tokens seen recently by this (1 = off).",
        low=0.5, high=3.0))
    repetition_context: int = field(default=64, metadata=spec(
        "--repetition-context", help="How many recent tokens the penalty looks at; 0 = the whole prompt "
        "and answer so far.", low=0, high=LONGEST))
    seed: Optional[int] = field(default=None, metadata=spec(
        "--seed", help="Random seed for sampling (each answer has its own random stream).", low=0, high=MAX_SEED))
    stop: Tuple[str, ...] = field(default=(), metadata=spec(
        "--stop", help=f"Extra stop string (repeatable, up to {MAX_STOP_STRINGS})."))

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, check(f.name, getattr(self, f.name)))

    def replace(self, **changes) -> "GenerationOptions":
        return replace(self, **changes) if changes else self

    def to_json(self) -> Dict[str, Any]:
        """Every option under its JSON key (what a client sends to the server)."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[json_keys(f.name)[0]] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def from_json(cls, body: dict, base: "GenerationOptions") -> "GenerationOptions":
        """``base`` with the options present in a request body. Errors name the key (``UrialError.param``)."""
        changes = {}
        for f in fields(cls):
            key = next((k for k in json_keys(f.name) if body.get(k) is not None), None)
            if key is None:
                continue
            try:
                changes[f.name] = check(f.name, body[key])
            except UrialError as e:
                raise OptionError(f"'{key}': {e}", key) from None
        return base.replace(**changes)


class OptionError(UrialError):
    """An invalid option in a request; ``param`` is the request key."""

    def __init__(self, message: str, param: str):
        super().__init__(message)
        self.param = param


def option_spec(name: str) -> OptionSpec:
    return next(f for f in fields(GenerationOptions) if f.name == name).metadata["spec"]


def json_keys(name: str) -> Tuple[str, ...]:
    return option_spec(name).json_keys or (name,)


def option_names() -> Tuple[str, ...]:
    return tuple(f.name for f in fields(GenerationOptions))


def check(name: str, value):
    """``value`` converted to option ``name``'s type; UrialError with a one-line reason if invalid.

    Every face (the command line, HTTP, the API) checks here, so infinities, NaN and integers too large
    for a float or for MLX are refused before anything converts them (no OverflowError gets out).
    """
    s = option_spec(name)
    if name == "stop":
        return _check_stop(value)
    if name == "seed" and value is None:
        return None
    kind = float if isinstance(GenerationOptions.__dataclass_fields__[name].default, float) else int
    wanted = "a number" if kind is float else "an integer"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UrialError(f"{name} must be {wanted}, got {_shown(value)}")
    if isinstance(value, float) and not math.isfinite(value):
        raise UrialError(f"{name} must be a finite number, got {value}")
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise UrialError(f"{name} must be {wanted}, got {value}")
    if value < s.low or (s.low_open and value == s.low) or (s.high is not None and value > s.high):
        raise UrialError(f"{name} must be {_range(s)}, got {_shown(value)}")
    return kind(value)


def _check_stop(value) -> Tuple[str, ...]:
    value = (value,) if isinstance(value, str) else value
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UrialError("stop must be a string or a list of strings")
    if any(not v for v in value):
        raise UrialError("stop strings must not be empty")
    if len(value) > MAX_STOP_STRINGS:
        raise UrialError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(value)}")
    return tuple(value)


def _shown(value) -> str:
    """``value`` for a message: short even when it is an integer of 400 digits."""
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"a number of about {int(value.bit_length() * 0.30103) + 1} digits"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _range(s: OptionSpec) -> str:
    low, high = (f"{x:g}" if isinstance(x, float) else str(x) for x in (s.low, s.high))
    if s.high is None:
        return f"at least {low}" if not s.low_open else f"greater than {low}"
    return f"in {'(' if s.low_open else '['}{low}, {high}]"


PRESETS: Dict[str, GenerationOptions] = {
    "default": GenerationOptions(),
    # the URIAL authors' MT-Bench setups: greedy with a penalty of 1.15 applied to every token of the
    # prompt and the answer so far, or temperature 0.5 without a penalty (their choice for Gemma)
    "urial-greedy": GenerationOptions(temperature=0.0, repetition_penalty=1.15, repetition_context=0),
    "urial-t0.5": GenerationOptions(temperature=0.5, repetition_penalty=1.0),
}


def preset(name: Optional[str]) -> GenerationOptions:
    if not name:
        return PRESETS["default"]
    if name not in PRESETS:
        raise UrialError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    return PRESETS[name]


def with_changes(name: Optional[str], changes: Dict[str, Any]) -> GenerationOptions:
    """Preset ``name`` with the options given explicitly (``None`` values are not given)."""
    return preset(name).replace(**{k: v for k, v in changes.items() if v is not None and v != ()})


def parse_kv_bits(value) -> Optional[int]:
    """The KV quantization ``value`` names (4, 8 or None): ``"4"``, ``8``, ``"none"`` or None.

    The command line, the server, the ``llm`` plugin and the prefix cache all check it here.
    """
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        return None
    text = str(value).strip()
    if isinstance(value, bool) or text not in KV_BITS:
        raise UrialError(f"kv_bits must be 4 or 8 (or none), got {value!r}")
    return int(text)

