"""What the OpenAI and Ollama endpoints share: checking a request's text and options, and its answers.

A request's answers are :class:`Choices`: ``n`` answers submitted together (so
they decode in the same batch), cancelled together when the client leaves or the
server stops. :func:`answer_events` turns them into what a stream sends, and says
why a stream ends early (the server is stopping, or generation failed), so that
each API can end its stream with an error event of its own shape instead of
breaking off.
"""

import queue
import threading
from typing import Callable, Iterator, List, Optional, Tuple

from ..errors import UrialError, one_line
from ..log import warn
from ..runtime.answer import Answer, AnswerStream
from ..runtime.options import GenerationOptions, OptionError
from ..runtime.validate import text
from .http import BadRequest, Handler

MAX_TOKENS_LIMIT = 4096
SHUTTING_DOWN = "the server is shutting down; the answer was cut off"


def checked_text(value, what: str, param: str) -> str:
    """``value`` if it is a string of valid Unicode, else a 400 naming ``param``."""
    try:
        return text(value, what)
    except UrialError as e:
        raise BadRequest(str(e), param=param) from None


def generation_options(values: dict, defaults: GenerationOptions) -> GenerationOptions:
    """``defaults`` with the options in ``values`` (their JSON keys in runtime/options.py); a bad value is a 400."""
    try:
        options = GenerationOptions.from_json(values, defaults)
    except OptionError as e:
        raise BadRequest(str(e), param=e.param) from None
    except Exception as e:  # a value the declared checks let through still fails the request, not the server
        raise BadRequest(f"invalid generation option: {type(e).__name__}: {one_line(e)}") from None
    if options.max_tokens > MAX_TOKENS_LIMIT:
        raise BadRequest(f"'max_tokens' must be between 1 and {MAX_TOKENS_LIMIT}", param="max_tokens")
    return options


def choice_count(value, most: int) -> int:
    """OpenAI's ``n``: how many answers, at most as many as decode together."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise BadRequest(f"'n' must be an integer between 1 and {most} (the answers this server decodes "
                         f"together), got {value!r}", param="n")
    return value


def seeded(options: GenerationOptions, i: int) -> GenerationOptions:
    """Answer ``i`` of several: with a seed, its own (seed + i), so that the answers differ yet repeat."""
    if options.seed is None or i == 0:
        return options
    try:
        return options.replace(seed=options.seed + i)
    except UrialError as e:
        raise BadRequest(f"'seed': {e}", param="seed") from None


class Choices:
    """The answers of one request, submitted together, cancelled together."""

    def __init__(self, streams: List[AnswerStream]):
        self.streams = streams

    @classmethod
    def start(cls, make: Callable[[int], AnswerStream], n: int = 1) -> "Choices":
        """Submit ``make(0)`` ... ``make(n - 1)``; if one cannot be submitted, cancel those that were."""
        streams = []
        try:
            for i in range(n):
                streams.append(make(i))
        except BaseException:
            for s in streams:
                s.cancel()
            raise
        return cls(streams)

    def cancel(self) -> None:
        for s in self.streams:
            s.cancel()

    def finish(self) -> List[Answer]:
        return [s.finish() for s in self.streams]

    def pieces(self) -> Iterator[Tuple[int, Optional[str]]]:
        """``(choice, text piece)`` as they are generated, and ``(choice, None)`` when a choice has ended."""
        if len(self.streams) == 1:
            yield from ((0, piece) for piece in self.streams[0])
            yield 0, None
            return
        out: "queue.Queue" = queue.Queue()
        for i, s in enumerate(self.streams):
            threading.Thread(target=_pump, args=(i, s, out), name="urial-edge-choice", daemon=True).start()
        left = len(self.streams)
        try:
            while left:
                i, piece, error = out.get()
                if error is not None:
                    raise error
                left -= piece is None
                yield i, piece
        finally:
            if left:
                self.cancel()


def _pump(i: int, stream: AnswerStream, out: "queue.Queue") -> None:
    try:
        for piece in stream:
            out.put((i, piece, None))
        out.put((i, None, None))
    except Exception as e:  # handed to the request's thread, which reports it
        out.put((i, None, e))


class StreamStopped(Exception):
    """A stream ends before its answers do; the message says why (for the final error event)."""


def answer_events(handler: Handler, choices: Choices) -> Iterator[Tuple[int, Optional[str], Optional[Answer]]]:
    """``(choice, piece, None)`` for each text piece and ``(choice, None, answer)`` when a choice ends.

    Raises :class:`StreamStopped` if the server stops meanwhile or generation fails.
    """
    try:
        for i, piece in choices.pieces():
            if piece is not None:
                yield i, piece, None
                continue
            answer = choices.streams[i].answer
            if answer.finish_reason == "cancelled" and handler.server.stopping.is_set():
                raise StreamStopped(SHUTTING_DOWN)
            yield i, None, answer
    except (ConnectionError, TimeoutError, StreamStopped):
        raise
    except Exception as e:  # the engine failed: the stream says so, the log has one line
        warn(f"an answer failed: {type(e).__name__}: {one_line(e)}")
        raise StreamStopped(f"generation failed: {one_line(e)}") from None


def finished(handler: Handler, choices: Choices) -> Optional[List[Answer]]:
    """The answers of a request answered in one piece; None if its client has left (nothing to send)."""
    answers = choices.finish()
    if any(a.finish_reason == "cancelled" for a in answers):
        if handler.server.stopping.is_set():
            raise BadRequest(SHUTTING_DOWN, status=503)
        handler.close_connection = True
        return None
    return answers
