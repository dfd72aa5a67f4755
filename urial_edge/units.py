"""Sizes and durations as people write them (``500M``, ``7d``) and as we print them."""

import math
import re
from typing import Optional

from .errors import UrialError

_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1024, "m": 1024**2, "mb": 1024**2,
               "g": 1024**3, "gb": 1024**3, "t": 1024**4, "tb": 1024**4}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_size(text: str) -> int:
    """Parse ``500M``, ``2GB``, ``1024`` into bytes."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    if not m or m.group(2).lower() not in _SIZE_UNITS:
        raise UrialError(f"invalid size {text!r}: use a number with K, M, G or T (e.g. 500M)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])


def parse_duration(text: str) -> float:
    """Parse ``30s``, ``15m``, ``12h``, ``7d``, ``2w`` into seconds."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if not m:
        raise UrialError(f"invalid duration {text!r}: use a number with s, m, h, d or w (e.g. 7d)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_GO_DURATION = re.compile(r"([+-]?)((?:\d+(?:\.\d*)?(?:ns|us|µs|ms|s|m|h))+)")


def parse_keep_alive(value) -> Optional[float]:
    """Seconds a model stays loaded after an answer, as Ollama reads ``keep_alive``; None is for ever.

    A number (or numeric string) is seconds; a string may be a Go duration
    (``"5m"``, ``"1h30m"``, ``"-1m"``). Negative means for ever, 0 unload at once.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UrialError(f"keep_alive must be a duration (\"5m\") or a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except (ValueError, OverflowError):
        m = _GO_DURATION.fullmatch(value.strip())
        if m is None:
            raise UrialError(f"invalid keep_alive {value!r}: use a duration such as \"5m\", \"1h\" or \"-1\"") from None
        seconds = sum(float(n) * _GO_UNITS[u] for n, u in re.findall(r"(\d+(?:\.\d*)?)(ns|us|µs|ms|s|m|h)",
                                                                      m.group(2)))
        seconds = -seconds if m.group(1) == "-" else seconds
    if math.isnan(seconds):
        raise UrialError("keep_alive must be a number of seconds, got NaN")
    return None if seconds < 0 or math.isinf(seconds) else seconds


def format_size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"
