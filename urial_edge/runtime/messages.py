"""Chat messages (role and text) as a URIAL conversation: a system text, finished turns and a new query.

The one rule every face follows (the OpenAI and Ollama endpoints, the ``llm`` plugin):

- ``system`` (and OpenAI's ``developer``) messages, wherever they are, join the
  system text in order, separated by a blank line;
- a ``user`` message followed by an ``assistant`` message is a finished turn;
- a ``user`` message followed by another ``user`` message is a turn whose answer is empty;
- an ``assistant`` message with no ``user`` message before it is an error, and so is any other role;
- the last message must be a non-empty ``user`` message: it is the query.
"""

from typing import Iterable, List, Tuple

from ..errors import UrialError

SYSTEM_ROLES = ("system", "developer")


class MessageError(UrialError):
    """A message list that is not a conversation (an HTTP 400 naming ``messages``)."""


def conversation(messages: Iterable[Tuple[str, str]]) -> Tuple[str, List[Tuple[str, str]], str]:
    """``(role, text)`` pairs -> ``(system text, [(query, answer), ...], query)`` by the rule above."""
    system, turns, pending = [], [], None
    for i, (role, text) in enumerate(messages):
        if role in SYSTEM_ROLES:
            system.append(text)
        elif role == "user":
            if pending is not None:
                turns.append((pending, ""))
            pending = text
        elif role == "assistant":
            if pending is None:
                raise MessageError(f"messages[{i}]: an assistant message must follow a user message")
            turns.append((pending, text))
            pending = None
        else:
            raise MessageError(f"messages[{i}]: unknown role {role!r}")
    if pending is None or not pending.strip():
        raise MessageError("the last message must be a non-empty user message")
    return "\n\n".join(s.strip() for s in system if s.strip()), turns, pending
