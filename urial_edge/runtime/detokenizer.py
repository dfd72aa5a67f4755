"""From generated token ids to answer text, one token at a time, in constant time per token.

- :class:`StreamingDetokenizer` turns ids into text pieces without ever
  decoding the whole answer again: it decodes a short window (the tokens of the
  last emitted piece plus the ones not yet emitted) and emits what the new
  tokens add. That keeps the decoder's context (a leading space, a multi-byte
  character split over several byte tokens) while the work per token stays flat.
- :class:`StopMatcher` finds stop strings in the streamed text, holding back
  only the few characters that may begin one.
- :class:`AnswerText` applies the URIAL frame to a base model's continuation:
  the answer ends at its closing fence or at a new ``# Query:``, and is trimmed.
  A constrained answer ends where its grammar does instead (the engine says
  when): no stop string cuts it, nothing is trimmed, and the closing fence that
  its grammar ends with in the frame is held back and left out.
"""

from typing import Collection, List, Optional, Sequence

from . import prompt as urial

REPLACEMENT = "\ufffd"  # what decoders emit for an incomplete UTF-8 character
# Tokens held back while the text ends in an incomplete character. A character spans at most 4 byte
# tokens, so only output that is not text (random bytes) reaches this; past it, U+FFFD is shown as is.
MAX_HELD = 64


class StreamingDetokenizer:
    """Incremental decoding: ``"".join(add(t) for t in ids) + flush() == decode(ids)``."""

    def __init__(self, tokenizer):
        self.decode = tokenizer.decode
        self.ids: List[int] = []
        self.start = 0  # first id of the window: the tokens of the last emitted piece
        self.read = 0  # ids before this are emitted

    def add(self, token: int) -> str:
        """Add a token; return the text it completes (may be empty)."""
        self.ids.append(token)
        before = self.decode(self.ids[self.start:self.read])
        after = self.decode(self.ids[self.start:])
        held = len(self.ids) - self.read
        if len(after) <= len(before) or (after.endswith(REPLACEMENT) and held < MAX_HELD):
            return ""  # nothing new yet, or a character still incomplete (bytes that never make one go out)
        self.start, self.read = self.read, len(self.ids)
        return after[len(before):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        before = self.decode(self.ids[self.start:self.read])
        after = self.decode(self.ids[self.start:])
        self.start = self.read = len(self.ids)
        return after[len(before):]


class StopMatcher:
    """Finds stop strings in streamed text, holding back text that may begin one.

    With ``anywhere=False`` a stop string counts only at the very end of the text (the closing fence of a
    constrained answer, whose grammar may produce that text inside the answer too): :meth:`feed` only holds
    back what may begin it, and :meth:`flush` drops it if the text ends with it.
    """

    def __init__(self, stops: Sequence[str], anywhere: bool = True):
        self.stops = [s for s in stops if s]
        self.anywhere = anywhere
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add a piece of text; return the part that is safe to emit."""
        self.buffer += piece
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1) \
            if self.anywhere else -1
        if cut >= 0:
            self.stopped = True
            out, self.buffer = self.buffer[:cut], ""
            return out
        hold = max((k for s in self.stops for k in range(1, min(len(s), len(self.buffer)) + 1)
                    if self.buffer.endswith(s[:k])), default=0)
        out = self.buffer[:len(self.buffer) - hold]
        self.buffer = self.buffer[len(out):]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return "" if not self.anywhere and out in self.stops else out


class AnswerText:
    """The text of one answer as its tokens arrive.

    ``framed``: the continuation is a URIAL answer block; it stops at the
    block's closing fence or a new query header (or right away if the model
    closes the block at once), and leading and trailing whitespace is trimmed.
    Otherwise it is raw text that stops only at EOS or the caller's stops.
    ``constrained``: a grammar decides where the answer ends (see the module).
    """

    def __init__(self, tokenizer, eos_ids: Collection[int], stops: Sequence[str] = (), framed: bool = True,
                 constrained: bool = False):
        self.detokenizer = StreamingDetokenizer(tokenizer)
        self.eos_ids = eos_ids
        self.framed = framed and not constrained
        if constrained:
            self.matcher = StopMatcher(("\n" + urial.FENCE,) if framed else (), anywhere=False)
        else:
            self.matcher = StopMatcher((urial.STOP_STRINGS if framed else ()) + tuple(stops))
        self.at_start = self.framed  # nothing shown yet: strip leading whitespace, watch for an empty block
        self.head = ""  # the raw text while at_start
        self.finish_reason: Optional[str] = None  # "stop" once the text has ended by itself

    def add(self, token: int) -> str:
        """Add a generated token; return text safe to show. Sets ``finish_reason`` when the answer ends."""
        if token in self.eos_ids:
            self.finish_reason = "stop"
            return self.end()
        piece = self.detokenizer.add(token)
        if self.at_start:
            self.head += piece
            if self.head.startswith(urial.FENCE):
                self.finish_reason = "stop"  # the model closed the answer block at once
                return ""
        out = self.matcher.feed(piece)
        if self.at_start:
            out = out.lstrip()
            self.at_start = not out
        if self.matcher.stopped:
            self.finish_reason = "stop"
            return out.rstrip() if self.framed else out
        return out

    def end(self) -> str:
        """The held-back tail once generation ends without a stop string (EOS, token limit, cancel)."""
        if self.matcher.stopped or (self.at_start and self.head.startswith(urial.FENCE)):
            return ""
        tail = self.matcher.feed(self.detokenizer.flush())
        tail += self.matcher.flush()
        if self.at_start:
            tail = tail.lstrip()
        return tail.rstrip() if self.framed else tail
