"""Checks that every face (the command line, HTTP, the Python API) applies to what users send, before any work.

Numbers are checked where options are declared (``options.check``); this module
checks text and JSON: text must be valid Unicode (a lone surrogate cannot be
encoded, tokenized or written to a results file), and JSON must not nest deeper
than :data:`MAX_JSON_DEPTH` (Python's parser recurses per level, and a body of
100,000 opening brackets would exhaust the stack).
"""

import json
import re
from typing import Any, Union

from ..errors import UrialError

MAX_JSON_DEPTH = 64
_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_BRACKETS = re.compile(r"[\[\]{}]")


def text(value: Any, what: str) -> str:
    """``value`` if it is a string of valid Unicode; a one-line error naming ``what`` otherwise."""
    if not isinstance(value, str):
        raise UrialError(f"{what} must be a string, got {type(value).__name__}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UrialError(f"{what} is not valid Unicode (a lone surrogate at character {e.start})") from None
    return value


def json_depth(data: str) -> int:
    """How deeply ``data``'s arrays and objects nest, counted without parsing (brackets in strings skipped)."""
    depth = deepest = 0
    for bracket in _BRACKETS.findall(_STRINGS.sub('""', data)):
        depth += 1 if bracket in "[{" else -1
        deepest = max(deepest, depth)
    return deepest


def loads(data: Union[bytes, str], what: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON nested at most ``max_depth`` deep; a one-line error naming ``what`` otherwise."""
    try:
        textual = data.decode("utf-8") if isinstance(data, bytes) else data
    except UnicodeDecodeError as e:
        raise UrialError(f"{what} is not valid UTF-8 (byte {e.start})") from None
    brackets = textual.count("[") + textual.count("{")
    if brackets > max_depth and json_depth(textual) > max_depth:  # the count alone settles most bodies
        raise UrialError(f"{what} nests arrays or objects more than {max_depth} deep")
    try:
        return json.loads(textual)
    except (ValueError, RecursionError):
        raise UrialError(f"{what} is not valid JSON") from None
