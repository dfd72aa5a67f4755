"""The Python API: an aligned assistant on a base model, answering from the cached URIAL prefix.

    from urial_edge import Assistant

    bot = Assistant.load()                      # bundled base model, default prompt (urial-k4-direct)
    print(bot.ask("What is a prime number?").text)
    for piece in bot.stream("Name three rivers."):
        print(piece, end="")
    for answer in bot.batch(["Q1", "Q2", "Q3"]):   # decoded together, yielded in order
        print(answer.text)
    chat = bot.chat()
    chat.send("Plan a day in Lisbon.")

Every answer is a sequence in one batched engine (``engine.py``): ``ask`` and
``stream`` are a batch of one, ``batch`` keeps up to ``batch_size`` answers in
flight, and a server started with :meth:`Assistant.start` lets many threads
stream at once.
"""

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from . import distributed
from . import prompt as urial
from . import sessions
from .engine import Engine, Request, Sequence as EngineSequence, Stats
from .errors import UrialError
from .log import warn
from .modeling import prefill
from .models import model_fingerprint
from .options import GenerationOptions, with_changes
from .prefix_cache import PrefixCache, copy_cache, load_or_build
from .progress import Progress, progress_bar
from .startup import warn_if_slow_blas
from .states import StateCache
from .tokenizer import Tokenizer

DEFAULT_BATCH_SIZE = 8
DEFAULT_STATE_BYTES = 1 << 30


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

    def as_dict(self) -> dict:
        stats = self.stats.as_dict()
        if self.server:
            stats["daemon"] = self.server
        return {"text": self.text, "finish_reason": self.finish_reason, "tokens": self.tokens, "stats": stats,
                "options": self.options}


class AnswerStream:
    """Text pieces of an answer as they are generated; after iteration, ``.answer`` has the result."""

    def __init__(self, pieces: Iterable[str], result: Callable[[str], Answer],
                 on_done: Optional[Callable[[Answer], None]] = None, cancel: Optional[Callable[[], None]] = None,
                 sequence: Optional[EngineSequence] = None):
        self._pieces, self._result, self._on_done, self._cancel = pieces, result, on_done, cancel
        self.sequence = sequence  # the engine's sequence behind a local answer (None for a server's)
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
        self.answer = self._result("".join(self._text).strip())
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


def _engine_stream(seq: EngineSequence, on_done=None) -> AnswerStream:
    def result(text: str) -> Answer:
        return Answer(text, seq.stats.generation_tokens, seq.finish_reason, seq.stats, seq.token_ids,
                      seq.request.options.to_json())

    return AnswerStream(seq, result, on_done, seq.cancel, seq)


class Assistant:
    """A base model aligned in context by a URIAL prompt, with its prefix KV state cached."""

    def __init__(self, model, config: dict, tokenizer: Tokenizer, model_path: Path, prompt: urial.Prompt,
                 options: GenerationOptions, kv_bits: Optional[int] = None, use_cache: bool = True,
                 progress: Optional[Progress] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_queued: Optional[int] = None, state_bytes: int = DEFAULT_STATE_BYTES):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.prompt = prompt
        self.options = options
        self.kv_bits = kv_bits
        self.use_cache = use_cache
        self.batch_size = batch_size
        self.context_length = int(config.get("max_position_embeddings") or 4096)
        self.model_id = model_fingerprint(model_path)
        self.prefix_text = urial.render_prefix(prompt)
        self.prefix_ids, self.prefix_tail = urial.stable_prefix(
            tokenizer, self.prefix_text, tokenizer.encode(self.prefix_text, bos=True, remember=True))
        if len(self.prefix_ids) >= self.context_length:
            raise UrialError(
                f"prompt {prompt.name!r} is {len(self.prefix_ids)} tokens, longer than the model's "
                f"context of {self.context_length}"
            )
        self.progress = progress
        self.engine = Engine(model, tokenizer, tokenizer.eos_ids, self.context_length, max_active=batch_size,
                             max_queued=max_queued)
        self.states = StateCache(state_bytes)
        self._prefix: Optional[PrefixCache] = None
        self.shard: Optional[dict] = None  # this rank's part of a split model (distributed.py)

    @classmethod
    def load(cls, model: Optional[str] = None, prompt: Optional[str] = None, *, kv_bits: Optional[int] = None,
             cache: bool = True, progress: Optional[Progress] = None, preset: Optional[str] = None,
             batch_size: int = DEFAULT_BATCH_SIZE, max_queued: Optional[int] = None,
             state_bytes: int = DEFAULT_STATE_BYTES, **generation_options) -> "Assistant":
        """Load a model (name, directory, .gguf or repo id) and a URIAL prompt (name or path).

        ``cache=False`` skips the on-disk prefix cache (every answer does a full prefill).
        Generation options (``max_tokens``, ``temperature``, ``top_p``, ``repetition_penalty``,
        ``repetition_context``, ``seed``, ``stop``) start from ``preset`` (see ``options.PRESETS``).
        ``batch_size`` is how many answers decode together; ``max_queued`` bounds the
        requests waiting beyond them (``EngineBusy`` past it); ``state_bytes`` bounds the memory
        kept for conversation states.
        """
        warn_if_slow_blas()
        options = with_changes(preset, generation_options)
        loaded_prompt = urial.load_prompt(prompt)
        path, weights, config, shard = distributed.load(model)  # under mlx.launch: this rank's part
        assistant = cls(weights, config, Tokenizer(path), path, loaded_prompt, options, kv_bits, cache, progress,
                        batch_size, max_queued, state_bytes)
        assistant.shard = shard
        return assistant

    # -- the prefix ---------------------------------------------------------

    @property
    def prefix(self) -> PrefixCache:
        """The prefix KV state, loaded from disk or built (and saved) on first use."""
        if self._prefix is None:
            self._prefix = load_or_build(
                self.model, self.prefix_ids, self.model_id, self.tokenizer.fingerprint,
                {"model": str(self.model_path), "prompt": self.prompt.name,
                 "prompt_version": self.prompt.version},
                kv_bits=self.kv_bits, use_disk=True,
                progress=self.progress or progress_bar("caching prefix tokens"), shard=self.shard,
            )
        return self._prefix

    def start(self) -> None:
        """Run the engine on a thread of its own, so that many threads can stream answers at once."""
        self.prefix  # load or build it before any request needs it
        self.engine.start()

    # -- answering ----------------------------------------------------------

    def _options(self, overrides: dict) -> GenerationOptions:
        return self.options.replace(**overrides)

    def check_query(self, query) -> str:
        """The query, stripped; a one-line error if it is empty or not text."""
        if not isinstance(query, str):
            raise UrialError(f"the query must be a string, got {type(query).__name__}")
        if not query.strip():
            raise UrialError("the query is empty")
        return query.strip()

    def _fit(self, used: int, new: int) -> None:
        if self.context_length - used - new < 1:
            raise UrialError(f"the query is {new} tokens but only {self.context_length - used} tokens of "
                             f"context are left after the {used}-token prefix")

    def after_prefix(self, text: str) -> List[int]:
        """Token ids of ``text`` where it follows the cached prefix (the same as in the whole text)."""
        return self.tokenizer.encode(self.prefix_tail + text)

    def stable_after_prefix(self, text: str) -> List[int]:
        """The ids of ``text`` after the prefix that stay the same whatever block follows it."""
        ids = self.after_prefix(text)
        return ids[:urial.common_prefix(ids, self.after_prefix(text + urial.PROBE))]

    def request(self, query: str, *, history: Sequence[Tuple[str, str]] = (), system: str = "",
                no_cache: bool = False, remember: Optional[bool] = None, **options) -> Request:
        """The engine request for a query: tokens, starting state and options (checked, not yet queued).

        ``remember`` (default: when there is a history or a system text) keeps the state after the
        prompt in memory, so that a follow-up of this conversation starts from it.
        """
        started = time.perf_counter()
        query = self.check_query(query)
        text = (urial.render_system(system) if system and system.strip() else "") + \
            urial.render_history(history, query)
        rest = self.after_prefix(text)
        self._fit(len(self.prefix_ids), len(rest))
        opts = self._options(options)
        if no_cache or not self.use_cache:
            return Request(self.prefix_ids + rest, None, (), opts, started=started)
        prefix = self.prefix
        stats = Stats(cache_hit=prefix.hit, cached_tokens=len(prefix.tokens))
        if not (remember if remember is not None else history or system):
            return Request(rest, prefix.fresh(), prefix.tokens, opts, stats=stats, started=started)
        # a conversation: start from the longest state stored for it, and store this one's
        ids = list(prefix.tokens) + rest
        n, state = self.states.longest_prefix(ids, at_least=len(prefix.tokens))
        if state is None:
            n, state = len(prefix.tokens), prefix.fresh()
        stats.cached_tokens = n
        store = (lambda s: self.states.put(ids[:-1], s)) if len(ids) - n > 1 else None
        return Request(ids[n:], state, ids[:n], opts, on_prefilled=store, stats=stats, started=started)

    def submit(self, request: Request) -> AnswerStream:
        """Queue a request (see :meth:`request`) and return its stream."""
        return _engine_stream(self.engine.submit(request))

    def stream(self, query: str, *, history: Sequence[Tuple[str, str]] = (), system: str = "",
               no_cache: bool = False, remember: Optional[bool] = None, **options) -> AnswerStream:
        """Answer ``query`` as text pieces while it is generated; ``.answer`` holds the result after.

        ``history`` is a list of earlier ``(query, answer)`` turns and ``system`` an extra
        instruction, both rendered after the cached prefix (states of such conversations
        are remembered, so a follow-up only prefills its new tokens).
        """
        return self.submit(self.request(query, history=history, system=system, no_cache=no_cache,
                                        remember=remember, **options))

    def ask(self, query: str, *, history: Sequence[Tuple[str, str]] = (), system: str = "",
            no_cache: bool = False, **options) -> Answer:
        """Answer ``query`` (greedy by default) and return the text with stats."""
        return self.stream(query, history=history, system=system, no_cache=no_cache, **options).finish()

    def complete(self, text: str, **options) -> AnswerStream:
        """A raw continuation of ``text`` (no URIAL frame), reusing any stored state it extends."""
        if not isinstance(text, str) or not text:
            raise UrialError("the text to complete is empty")
        ids = self.tokenizer.encode(text, bos=True)
        self._fit(0, len(ids))
        n, state = self.states.longest_prefix(ids)
        stats = Stats(cache_hit=state is not None, cached_tokens=n)
        opts = self.options.replace(stop=()).replace(**options)
        return self.submit(Request(ids[n:], state, ids[:n], opts, framed=False, stats=stats))

    def batch(self, queries: Iterable[str], *, batch_size: Optional[int] = None, no_cache: bool = False,
              **options) -> Iterator[Answer]:
        """Answer every query, up to ``batch_size`` decoding together; answers come in input order.

        All queries are checked before anything is generated (a one-line error names the bad one).
        """
        requests = []
        for i, q in enumerate(queries):
            try:
                requests.append(self.request(q, no_cache=no_cache, **options))
            except UrialError as e:
                raise UrialError(f"query {i + 1}: {e}") from None
        return self.run(requests, batch_size)

    def run(self, requests: List[Request], batch_size: Optional[int] = None) -> Iterator[Answer]:
        """Run prepared requests with at most ``batch_size`` in flight; yield answers in order."""
        size = max(1, batch_size or self.batch_size)
        ahead = 4 * size  # finished answers held back for order stay few
        running: Dict[int, EngineSequence] = {}
        done: Dict[int, Answer] = {}
        submitted = emitted = 0
        try:
            while emitted < len(requests):
                while submitted < len(requests) and len(running) < size and submitted - emitted < ahead:
                    requests[submitted].started = time.perf_counter()  # held back until now: not its wait
                    running[submitted] = self.engine.submit(requests[submitted])
                    submitted += 1
                for i in [i for i, seq in running.items() if seq.finish_reason is not None]:
                    done[i] = _engine_stream(running.pop(i)).finish()
                if emitted in done:
                    yield done.pop(emitted)
                    emitted += 1
                elif running:
                    self.engine.advance(next(iter(running.values())))
        finally:
            for seq in running.values():
                seq.cancel()

    def chat(self, session: Optional[str] = None) -> "ChatSession":
        """A multi-turn session; with a name, it is loaded from disk if saved before."""
        if session is not None:
            sessions.check_name(session)
            saved = ChatSession.load(self, session)
            if saved is not None:
                return saved
        return ChatSession(self, name=session)


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

    def __init__(self, assistant: Assistant, name: Optional[str] = None):
        self.assistant = assistant
        self.name = sessions.check_name(name) if name is not None else None
        self.turns: List[Tuple[str, str]] = []
        self.ids: List[int] = list(assistant.prefix.tokens)  # what self.state holds
        self.state: list = assistant.prefix.fresh()

    def reset(self) -> None:
        self.turns = []
        self.ids = list(self.assistant.prefix.tokens)
        self.state = self.assistant.prefix.fresh()

    def conversation_ids(self, more: str = "", stable: bool = False) -> List[int]:
        """The canonical ids of the prefix, the finished turns and ``more``; with ``stable`` only those
        that no further text changes."""
        a = self.assistant
        text = "".join(urial.render_turn(q, answer) for q, answer in self.turns) + more
        return list(a.prefix.tokens) + (a.stable_after_prefix(text) if stable else a.after_prefix(text))

    @property
    def pending(self) -> List[int]:
        """Canonical ids of the finished turns that the state does not hold yet."""
        return self.conversation_ids()[len(self.ids):]

    def stream(self, message: str, **options) -> AnswerStream:
        """Send ``message``; iterate for the answer's pieces. The turn is recorded when it ends."""
        a = self.assistant
        started = time.perf_counter()
        message = a.check_query(message)
        new_ids = self.conversation_ids(urial.render_turn(message))[len(self.ids):]
        a._fit(len(self.ids), len(new_ids))
        stats = Stats(cache_hit=a.prefix.hit, cached_tokens=len(self.ids))
        seq = a.engine.submit(Request(new_ids, self.state, self.ids, a._options(options), keep_state=True,
                                      stats=stats, started=started))

        def record(answer: Answer) -> None:
            if answer.finish_reason in ("stop", "length") and seq.state is not None:
                self._record(message, answer.text, seq.state, self.ids + new_ids + seq.token_ids)

        return _engine_stream(seq, on_done=record)

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
        path = sessions.save(record, self.state, a.shard)
        sessions.remove_legacy(name)
        self.name = name
        return path

    @classmethod
    def load(cls, assistant: Assistant, name: str) -> Optional["ChatSession"]:
        """A saved session, or None if there is none. A state that is not exactly its turns' is rebuilt."""
        found = distributed.agree_on_session(sessions.load(name, assistant.shard))  # rank 0's, when split
        if found is None:
            return None
        record, state = found
        session = cls(assistant, name=name)
        session.turns = record.turns
        expected = session.conversation_ids()
        usable = False
        if state is not None and record.prefix_key != assistant.prefix.key:
            warn(f"session {name!r} was saved with another model or prompt; rebuilding its KV state")
        elif state is not None and record.ids + record.pending != expected:
            warn(f"session {name!r}: its KV state does not match its turns; rebuilding it")
        else:
            usable = state is not None
        if distributed.all_ranks_have(usable, f"session {name!r}"):  # one process: just `usable`
            session.state, session.ids = state, record.ids
            return session
        return cls.from_turns(assistant, record.turns, name=name)

    @classmethod
    def from_turns(cls, assistant: Assistant, turns: Sequence[Tuple[str, str]],
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
