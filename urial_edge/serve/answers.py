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
from ..runtime.constraints import from_response_format
from ..runtime.options import GenerationOptions, OptionError
from ..runtime.sampling import check_logprobs
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


def constraint_arguments(response_format, param: str) -> dict:
    """A ``response_format`` value (runtime/constraints.py) as keyword arguments of ``Assistant.stream``/
    ``complete`` (none: free text), plain JSON as the ranks of a split model receive it; a bad one is a 400
    naming ``param``, before any model is loaded or anything generated."""
    try:
        constraint = from_response_format(response_format)
    except UrialError as e:
        raise BadRequest(f"'{param}': {e}", param=param) from None
    return constraint.arguments() if constraint is not None else {}


def choice_count(value, most: int) -> int:
    """OpenAI's ``n``: how many answers, at most as many as decode together."""
    if value is None:
        return 1
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise BadRequest(f"'n' must be an integer between 1 and {most} (the answers this server decodes "
                         f"together), got {value!r}", param="n")
    return value


def logprobs_count(value, param: str = "top_logprobs") -> int:
    """How many likeliest alternatives to report with each token (0-20); a 400 naming ``param`` otherwise."""
    try:
        return check_logprobs(value)
    except UrialError as e:
        raise BadRequest(str(e).replace("logprobs", param, 1), param=param) from None


def logprobs_asked(enabled, top) -> Optional[int]:
    """OpenAI chat's and Ollama's ``logprobs: true`` with ``top_logprobs: k``: how many alternatives per token,
    or None for no log-probabilities."""
    if enabled is not None and not isinstance(enabled, bool):
        raise BadRequest(f"'logprobs' must be true or false, got {enabled!r}", param="logprobs")
    if not enabled:
        if top:
            raise BadRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
        return None
    return logprobs_count(top or 0)


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


class TokenLogprobs:
    """Each choice's log-probabilities as token texts: ``(text, logprob, [(text, logprob), ...])`` per token.

    :meth:`new` hands out the tokens not handed out before, so that a stream attaches each token's entry
    to the chunk it arrives with (the rest go with the choice's last chunk)."""

    def __init__(self, tokenizer, choices: Choices):
        self.tokenizer, self.choices = tokenizer, choices
        self.sent = [0] * len(choices.streams)

    def new(self, i: int) -> Optional[list]:
        """The entries of choice ``i`` since the last call; None if it did not ask for log-probabilities."""
        found = self.choices.streams[i].generation.logprobs
        if found is None:
            return None
        start, self.sent[i] = self.sent[i], len(found)
        return [(self.text(t.token), t.logprob, [(self.text(k), lp) for k, lp in t.top])
                for t in found[start:self.sent[i]]]

    def text(self, token: int) -> str:
        return self.tokenizer.decode([token])


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
