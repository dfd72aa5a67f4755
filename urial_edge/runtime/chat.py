"""A multi-turn conversation whose KV state grows turn by turn, saved to and resumed from disk."""

import time
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..distributed import world as distributed
from ..errors import UrialError
from ..log import warn
from . import prompt as urial
from . import sessions
from .answer import Answer, AnswerStream, generation_stream
from .constraints import DEFAULT_DESCRIBE, pop_constraint, with_description
from .engine import Request, Stats
from .kv_state import check_fits, copy_cache, prefill
from .sampling import check_logprobs


class ChatSession:
    """A conversation whose KV state grows turn by turn.

    Earlier turns are never prefilled again. The state always holds a prefix of
    the conversation's canonical token ids (its whole text tokenized at once):
    after each answer it is cut back to where the generated tokens and the
    canonical ids of the finished turn agree; when a sliding-window layer has
    wrapped and cannot be cut back, the pre-turn state is kept and the turn is
    fed again with the next message. So every answer equals that of a fresh
    full render.
    """

    def __init__(self, assistant, name: Optional[str] = None):
        self.assistant = assistant
        self.name = sessions.check_name(name) if name is not None else None
        self.turns: List[Tuple[str, str]] = []
        self.ids: List[int] = list(assistant.prefix.tokens)  # what self.state holds
        self.state: list = assistant.prefix.fresh()
        self.revision: Optional[str] = None  # of the session file this chat loaded or saved last

    def reset(self) -> None:
        self.turns = []
        self.ids = list(self.assistant.prefix.tokens)
        self.state = self.assistant.prefix.fresh()

    def conversation_ids(self, more: str = "", stable: bool = False, fit: bool = False) -> List[int]:
        """The canonical ids of the prefix, the finished turns and ``more``; with ``stable`` only those
        that no further text changes; with ``fit``, refused if they do not fit in the context."""
        a = self.assistant
        text = "".join(urial.render_turn(q, answer) for q, answer in self.turns) + more
        if stable:
            return list(a.prefix.tokens) + a.stable_after_prefix(text)
        return list(a.prefix.tokens) + a.after_prefix(text, used=len(a.prefix.tokens) if fit else None)

    @property
    def pending(self) -> List[int]:
        """Canonical ids of the finished turns that the state does not hold yet."""
        return self.conversation_ids()[len(self.ids):]

    def stream(self, message: str, *, logprobs: Optional[int] = None, describe: str = DEFAULT_DESCRIBE,
               **options) -> AnswerStream:
        """Send ``message``; iterate for the answer's pieces. The turn is recorded when it ends.

        A constraint (``schema=``, ``regex=``, ``choice=``, ``grammar=``, see ``Assistant.request``) applies to
        this answer; a schema's field descriptions go with the message (a chat has no system text), and the
        turn is recorded as the message itself.
        """
        a = self.assistant
        started = time.perf_counter()
        message = a.check_query(message)
        constraint = pop_constraint(options)
        shown, _ = with_description(constraint, "query" if describe in ("system", "both") else describe, message, "")
        new_ids = self.conversation_ids(urial.render_turn(shown), fit=True)[len(self.ids):]
        stats = Stats(cache_hit=a.prefix.hit, cached_tokens=len(self.ids))
        seq = a.engine.submit(Request(new_ids, self.state, self.ids, a._options(options), keep_state=True,
                                      logprobs=check_logprobs(logprobs), constraint=constraint, stats=stats,
                                      started=started))

        def record(answer: Answer) -> None:
            if answer.finish_reason in ("stop", "length") and seq.state is not None:
                self._record(message, answer.text, seq.state, self.ids + new_ids + seq.token_ids)

        return generation_stream(seq, on_done=record)

    def send(self, message: str, **options) -> Answer:
        """Send ``message`` and return the answer."""
        return self.stream(message, **options).finish()

    def _record(self, message: str, answer: str, state: list, held: List[int]) -> None:
        """Keep the turn; ``state`` holds ``held``, of which the canonical part is kept."""
        self.turns.append((message, answer))
        target = self.conversation_ids(stable=True)
        keep = urial.common_prefix(held, target)
        extra = len(held) - keep
        if keep >= len(self.ids) and (extra == 0 or all(c.is_trimmable() for c in state)):
            for c in state:
                c.trim(extra)
            self.state, self.ids = state, target[:keep]

    # -- persistence ----------------------------------------------------------

    def save(self, name: Optional[str] = None) -> Path:
        """Write the conversation and its KV state to the session store (one atomic, durable file)."""
        name = name if name is not None else self.name
        if not name:
            raise UrialError("a session needs a name to be saved")
        sessions.check_name(name)
        a = self.assistant
        record = sessions.SessionRecord(name, list(self.turns), list(self.ids), list(self.pending), a.prefix.key,
                                        str(a.model_path), a.prompt.name)
        path = sessions.save(record, self.state, self.revision if name == self.name else None, a.shard)
        sessions.remove_legacy(name)
        self.name, self.revision = name, sessions.revision(record)
        return path

    @classmethod
    def load(cls, assistant, name: str) -> Optional["ChatSession"]:
        """A saved session, or None if there is none. A state that is not exactly its turns' is rebuilt."""
        found = sessions.agree_on_session(sessions.load(name, assistant.shard))  # rank 0's, when split
        if found is None:
            return None
        record, state, revision = found
        session = cls(assistant, name=name)
        session.turns, session.revision = record.turns, revision
        problem = None if state is None else session._unusable(record, state)
        if problem:
            warn(f"session {name!r}: {problem}; rebuilding its KV state")
        usable = state is not None and problem is None
        if distributed.all_ranks_have(usable, f"session {name!r}"):  # one process: just `usable`
            session.state, session.ids = state, record.ids
            return session
        rebuilt = cls.from_turns(assistant, record.turns, name=name)
        rebuilt.revision = revision
        return rebuilt

    def _unusable(self, record: sessions.SessionRecord, state: list) -> Optional[str]:
        """Why a saved state cannot continue this conversation with this assistant (None if it can)."""
        a = self.assistant
        if record.prefix_key != a.prefix.key:
            return "it was saved with another model or prompt"
        if record.ids + record.pending != self.conversation_ids():
            return "its KV state does not match its turns"
        problem = check_fits(state, a.model, None, len(record.ids))
        return f"its KV state does not fit this model ({problem})" if problem else None

    @classmethod
    def from_turns(cls, assistant, turns: Sequence[Tuple[str, str]],
                   name: Optional[str] = None) -> "ChatSession":
        """A session holding earlier ``(query, answer)`` turns, their KV state built in one prefill.

        For conversations kept elsewhere (a saved session whose state is stale, ``llm``'s log).
        """
        session = cls(assistant, name=name)
        session.turns = [(q, a) for q, a in turns]
        ids = session.conversation_ids(stable=True)
        if len(ids) > len(session.ids):
            session.state = copy_cache(session.state)
            prefill(assistant.model, ids[len(session.ids):], session.state)
            session.ids = ids
        return session
