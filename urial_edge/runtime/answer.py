"""What an answer is: its text, why it ended, its stats; and the stream it arrives in.

Answers come from the local engine (:func:`generation_stream`) or from a
running server (``serve/client.py``); both give the same two types.
"""

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional

from .engine import Generation, Stats
from .sampling import TokenLogprob


@dataclass
class Answer:
    """One finished answer."""

    text: str
    tokens: int
    finish_reason: str  # "stop" (end of answer), "length" (hit max_tokens) or "cancelled"
    stats: Stats
    token_ids: List[int] = field(default_factory=list, repr=False)
    options: Dict[str, object] = field(default_factory=dict, repr=False)  # the generation options used
    server: Optional[str] = None  # "host:port" of the server that answered, if one did
    logprobs: Optional[List[TokenLogprob]] = field(default=None, repr=False)  # when asked for, one per token
    # structured output: the digest of the answer's constraint (constraints.digest), and value, what the answer
    # means (the parsed JSON, or the text), only if it completed (finish_reason "stop"); None otherwise
    constraint: Optional[str] = None
    value: Any = None

    @property
    def constrained(self) -> bool:
        return self.constraint is not None

    def as_dict(self) -> dict:
        stats = self.stats.as_dict()
        if self.server:
            stats["server"] = self.server
        out = {"text": self.text, "finish_reason": self.finish_reason, "tokens": self.tokens, "stats": stats,
               "options": self.options}
        if self.constrained:
            out["constraint"], out["value"] = self.constraint, self.value
        if self.logprobs is not None:
            out["logprobs"] = [asdict(t) for t in self.logprobs]
        return out


def constrained_value(constraint, text: str, finish_reason: str) -> Any:
    """What a constrained answer means, or None if it did not complete (it is never presented as valid)."""
    return constraint.value(text) if constraint is not None and finish_reason == "stop" else None


class AnswerStream:
    """Text pieces of an answer as they are generated; after iteration, ``.answer`` has the result."""

    def __init__(self, pieces: Iterable[str], result: Callable[[str], Answer],
                 on_done: Optional[Callable[[Answer], None]] = None, cancel: Optional[Callable[[], None]] = None,
                 generation: Optional[Generation] = None, strip: bool = True):
        self._pieces, self._result, self._on_done, self._cancel = pieces, result, on_done, cancel
        self._strip = strip  # not for a constrained answer: its grammar says what the text is, spaces included
        self.generation = generation  # the engine's generation behind a local answer (None for a server's)
        self._text: List[str] = []
        self.answer: Optional[Answer] = None

    def __iter__(self) -> Iterator[str]:
        try:
            for piece in self._pieces:
                self._text.append(piece)
                yield piece
        except GeneratorExit:  # the consumer stopped reading: stop generating too
            self.cancel()
            raise
        text = "".join(self._text)
        self.answer = self._result(text.strip() if self._strip else text)
        if self._on_done:
            self._on_done(self.answer)

    def finish(self) -> Answer:
        """Consume the rest of the stream and return the answer."""
        if self.answer is None:
            for _ in self:
                pass
        return self.answer

    def cancel(self) -> None:
        """Stop generating; the answer so far is kept with finish_reason "cancelled"."""
        if self._cancel:
            self._cancel()


def generation_stream(seq: Generation, on_done=None) -> AnswerStream:
    """The stream of an engine generation's text, and its Answer at the end."""
    constraint = seq.request.constraint

    def result(text: str) -> Answer:
        return Answer(text, seq.stats.generation_tokens, seq.finish_reason, seq.stats, seq.token_ids,
                      seq.request.options.to_json(), logprobs=seq.logprobs, constraint=constraint and constraint.digest,
                      value=constrained_value(constraint, text, seq.finish_reason))

    return AnswerStream(seq, result, on_done, seq.cancel, seq, strip=constraint is None)
