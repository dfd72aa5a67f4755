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

Every answer is a generation in one batched engine (``engine.py``): ``ask`` and
``stream`` are a batch of one, ``batch`` keeps up to ``batch_size`` answers in
flight, and a server started with :meth:`Assistant.start` lets many threads
stream at once.
"""

import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

from ..distributed import sharding
from ..errors import UrialError
from ..model.loading import context_length
from ..model.store import model_fingerprint
from ..model.tokenizer import Tokenizer, TooManyTokens
from ..progress import Progress, progress_bar
from . import prompt as urial
from . import sessions, validate
from .answer import Answer, AnswerStream, generation_stream
from .chat import ChatSession
from .constraints import DEFAULT_DESCRIBE, pop_constraint, with_description
from .engine import Engine, Generation, Request, Stats
from .options import GenerationOptions, with_changes
from .sampling import check_logprobs
from .prefix_cache import PrefixCache, load_or_build
from .state_cache import StateCache

DEFAULT_BATCH_SIZE = 8
DEFAULT_STATE_BYTES = 1 << 30


class Assistant:
    """A base model aligned in context by a URIAL prompt, with its prefix KV state cached."""

    def __init__(self, model, config: dict, tokenizer: Tokenizer, model_path: Path, prompt: urial.Prompt,
                 options: GenerationOptions, kv_bits: Optional[int] = None, use_cache: bool = True,
                 progress: Optional[Progress] = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 max_queued: Optional[int] = None, state_bytes: int = DEFAULT_STATE_BYTES,
                 engine: Optional[Engine] = None, states: Optional[StateCache] = None):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.prompt = prompt
        self.options = options
        self.kv_bits = kv_bits
        self.use_cache = use_cache
        self.batch_size = batch_size
        self.context_length = context_length(config)
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
        self.engine = engine or Engine(model, tokenizer, tokenizer.eos_ids, self.context_length,
                                       max_active=batch_size, max_queued=max_queued,
                                       vocab_size=config.get("vocab_size"))
        self.states = states or StateCache(state_bytes)
        self._prefix: Optional[PrefixCache] = None
        self.shard: Optional[dict] = None  # this rank's part of a split model (distributed/sharding.py)

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
        options = with_changes(preset, generation_options)
        loaded_prompt = urial.load_prompt(prompt)
        path, weights, config, shard = sharding.load(model)  # under mlx.launch: this rank's part
        assistant = cls(weights, config, Tokenizer(path), path, loaded_prompt, options, kv_bits, cache, progress,
                        batch_size, max_queued, state_bytes)
        assistant.shard = shard
        return assistant

    def with_prompt(self, prompt) -> "Assistant":
        """The same model with another prompt (a name, a file or a ``Prompt``): one copy of the weights and
        tokenizer, one engine (answers of both prompts decode in the same batches) and one store of
        conversation states; its own prefix state. A server holding several prompts of a model uses this."""
        prompt = prompt if isinstance(prompt, urial.Prompt) else urial.load_prompt(prompt)
        sibling = Assistant(self.model, self.config, self.tokenizer, self.model_path, prompt, self.options,
                            self.kv_bits, self.use_cache, self.progress, self.batch_size, engine=self.engine,
                            states=self.states)
        sibling.shard = self.shard
        return sibling

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
        """The query, stripped; a one-line error if it is empty, not valid Unicode text, or surely too long
        for the context (found from its length alone, before it is rendered or tokenized)."""
        if not validate.text(query, "the query").strip():
            raise UrialError("the query is empty")
        self._fit(len(self.prefix_ids), len(query) // self.tokenizer.longest, at_least=True)
        return query.strip()

    def _fit(self, used: int, new: int, at_least: bool = False) -> None:
        if self.context_length - used - new < 1:
            raise self._too_long(used, new, at_least)

    def _too_long(self, used: int, new: int, at_least: bool = False) -> UrialError:
        return UrialError(f"the query is {'at least ' if at_least else ''}{new} tokens but only "
                          f"{self.context_length - used} tokens of context are left after the {used}-token prefix")

    def encode_within(self, text: str, used: int, bos: bool = False) -> List[int]:
        """Token ids of ``text``, which must fit in the context after ``used`` tokens.

        A text that cannot fit is refused before most of the work of tokenizing it: a 5 MB
        query takes milliseconds, not minutes (see ``Tokenizer.encode``'s ``at_most``).
        """
        try:
            ids = self.tokenizer.encode(text, bos=bos, at_most=self.context_length - used - 1)
        except TooManyTokens as e:
            raise self._too_long(used, e.least, at_least=True) from None
        self._fit(used, len(ids))
        return ids

    def after_prefix(self, text: str, used: Optional[int] = None) -> List[int]:
        """Token ids of ``text`` where it follows the cached prefix (the same as in the whole text);
        with ``used``, they must fit in the context after that many tokens."""
        if used is None:
            return self.tokenizer.encode(self.prefix_tail + text)
        return self.encode_within(self.prefix_tail + text, used)

    def stable_after_prefix(self, text: str) -> List[int]:
        """The ids of ``text`` after the prefix that stay the same whatever block follows it."""
        ids = self.after_prefix(text)
        return ids[:urial.common_prefix(ids, self.after_prefix(text + urial.PROBE))]

    def request(self, query: str, *, history: Sequence[Tuple[str, str]] = (), system: str = "",
                no_cache: bool = False, remember: Optional[bool] = None, logprobs: Optional[int] = None,
                describe: str = DEFAULT_DESCRIBE, **options) -> Request:
        """The engine request for a query: tokens, starting state and options (checked, not yet queued).

        ``remember`` (default: when there is a history or a system text) keeps the state after the
        prompt in memory, so that a follow-up of this conversation starts from it. ``logprobs``
        (0-20) records each token's log-probability and that many likeliest alternatives
        (``Answer.logprobs``). ``schema``, ``regex``, ``choice`` or ``grammar`` (or a ``constraint``
        made by ``constraints.make``) constrain the answer, and ``Answer.value`` holds what it means;
        ``describe`` puts a schema's field descriptions in the ``"query"``, the ``"system"`` text,
        ``"both"`` or ``"none"``.
        """
        started = time.perf_counter()
        query = self.check_query(query)
        system = validate.text(system or "", "the system text")
        for q, a in history:
            validate.text(q, "a query of the history")
            validate.text(a, "an answer of the history")
        constraint = pop_constraint(options)
        remember = remember if remember is not None else bool(history or system)
        query, system = with_description(constraint, describe, query, system)
        text = (urial.render_system(system) if system and system.strip() else "") + \
            urial.render_history(history, query)
        rest = self.after_prefix(text, used=len(self.prefix_ids))
        opts, logprobs = self._options(options), check_logprobs(logprobs)
        if no_cache or not self.use_cache:
            return Request(self.prefix_ids + rest, None, (), opts, logprobs=logprobs, constraint=constraint,
                           started=started)
        prefix = self.prefix
        stats = Stats(cache_hit=prefix.hit, cached_tokens=len(prefix.tokens))
        if not remember:
            return Request(rest, prefix.fresh(), prefix.tokens, opts, logprobs=logprobs, constraint=constraint,
                           stats=stats, started=started)
        # a conversation: start from the longest state stored for it, and store this one's
        ids = list(prefix.tokens) + rest
        n, state = self.states.longest_prefix(ids, at_least=len(prefix.tokens))
        if state is None:
            n, state = len(prefix.tokens), prefix.fresh()
        stats.cached_tokens = n
        store = (lambda s: self.states.put(ids[:-1], s)) if len(ids) - n > 1 else None
        return Request(ids[n:], state, ids[:n], opts, on_prefilled=store, logprobs=logprobs, constraint=constraint,
                       stats=stats, started=started)

    def submit(self, request: Request) -> AnswerStream:
        """Queue a request (see :meth:`request`) and return its stream."""
        return generation_stream(self.engine.submit(request))

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
        """Answer ``query`` (greedy by default) and return the text with stats.

        ``schema=`` (a JSON Schema: a dict, its JSON text or a pydantic model class), ``regex=``,
        ``choice=`` (a list of strings) or ``grammar=`` (Lark or GBNF text) constrain the answer;
        ``Answer.value`` is then the parsed JSON (or the text), None if the answer did not complete.
        """
        return self.stream(query, history=history, system=system, no_cache=no_cache, **options).finish()

    def complete(self, text: str, *, logprobs: Optional[int] = None, **options) -> AnswerStream:
        """A raw continuation of ``text`` (no URIAL frame), reusing any stored state it extends."""
        if not validate.text(text, "the text to complete"):
            raise UrialError("the text to complete is empty")
        ids = self.encode_within(text, 0, bos=True)
        n, state = self.states.longest_prefix(ids)
        stats = Stats(cache_hit=state is not None, cached_tokens=n)
        constraint = pop_constraint(options)
        opts = self.options.replace(stop=()).replace(**options)
        return self.submit(Request(ids[n:], state, ids[:n], opts, framed=False, logprobs=check_logprobs(logprobs),
                                   constraint=constraint, stats=stats))

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
        running: Dict[int, Generation] = {}
        done: Dict[int, Answer] = {}
        submitted = emitted = 0
        try:
            while emitted < len(requests):
                while submitted < len(requests) and len(running) < size and submitted - emitted < ahead:
                    requests[submitted].started = time.perf_counter()  # held back until now: not its wait
                    running[submitted] = self.engine.submit(requests[submitted])
                    submitted += 1
                for i in [i for i, seq in running.items() if seq.finish_reason is not None]:
                    done[i] = generation_stream(running.pop(i)).finish()
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
