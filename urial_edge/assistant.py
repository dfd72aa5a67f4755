"""The Python API: an aligned assistant on a base model, answering from the cached URIAL prefix.

    from urial_edge import Assistant

    bot = Assistant.load()                      # bundled base model, urial-k3 prompt
    print(bot.ask("What is a prime number?").text)
    for piece in bot.stream("Name three rivers."):
        print(piece, end="")
    chat = bot.chat()
    chat.send("Plan a day in Lisbon.")
"""

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

from . import prompt as urial
from .generate import GenerationOptions, Stats, StopMatcher, Timer, generate_tokens, prefill
from .models import load_model, model_fingerprint, resolve_model
from .prefix_cache import PrefixCache, copy_cache, load_or_build, make_cache
from .startup import warn_if_slow_blas
from .store import Progress, UrialError, atomic_dir, sessions_dir, stderr_progress
from .tokenizer import StreamingDecoder, Tokenizer



@dataclass
class Answer:
    """One finished answer."""

    text: str
    tokens: int
    finish_reason: str  # "stop" (end of answer) or "length" (hit max_tokens)
    stats: Stats

    def as_dict(self) -> dict:
        return {"text": self.text, "finish_reason": self.finish_reason, "tokens": self.tokens,
                "stats": self.stats.as_dict()}


@dataclass
class _Run:
    """What one generation produced besides its text pieces."""

    token_ids: List[int] = field(default_factory=list)
    fed: int = 0  # how many generated tokens went into the KV cache
    raw: str = ""
    finish_reason: str = "length"


class AnswerStream:
    """Text pieces of an answer as they are generated; after iteration, ``.answer`` has the result."""

    def __init__(self, pieces: Iterator[str], stats: Stats, run: "_Run", on_done=None):
        self._pieces, self._stats, self._run, self._on_done = pieces, stats, run, on_done
        self._text: List[str] = []
        self.answer: Optional[Answer] = None

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self._text.append(piece)
            yield piece
        text = "".join(self._text).strip()
        self.answer = Answer(text, self._stats.generation_tokens, self._run.finish_reason, self._stats)
        if self._on_done:
            self._on_done(self.answer)

    def finish(self) -> Answer:
        """Consume the rest of the stream and return the answer."""
        for _ in self:
            pass
        return self.answer


class Assistant:
    """A base model aligned in context by a URIAL prompt, with its prefix KV state cached."""

    def __init__(self, model, config: dict, tokenizer: Tokenizer, model_path: Path, prompt: urial.Prompt,
                 options: GenerationOptions, kv_bits: Optional[int], use_cache: bool,
                 progress: Optional[Progress]):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer
        self.model_path = model_path
        self.prompt = prompt
        self.options = options
        self.kv_bits = kv_bits
        self.use_cache = use_cache
        self.context_length = int(config.get("max_position_embeddings") or 4096)
        self.model_id = model_fingerprint(model_path)
        self.prefix_text = urial.render_prefix(prompt)
        self.prefix_ids = tokenizer.encode(self.prefix_text, bos=True, remember=True)
        if len(self.prefix_ids) >= self.context_length:
            raise UrialError(
                f"prompt {prompt.name!r} is {len(self.prefix_ids)} tokens, longer than the model's "
                f"context of {self.context_length}"
            )
        self.progress = progress
        self._prefix: Optional[PrefixCache] = None

    @classmethod
    def load(cls, model: Optional[str] = None, prompt: Optional[str] = None, *, kv_bits: Optional[int] = None,
             cache: bool = True, progress: Optional[Progress] = None, **generation_options) -> "Assistant":
        """Load a model (name, directory, .gguf or repo id) and a URIAL prompt (name or path).

        ``cache=False`` skips the on-disk prefix cache (every answer does a full prefill).
        Generation options: ``max_tokens``, ``temperature``, ``top_p``,
        ``repetition_penalty``, ``seed``, ``stop``.
        """
        warn_if_slow_blas()
        options = GenerationOptions(**generation_options)
        loaded_prompt = urial.load_prompt(prompt)
        path = resolve_model(model)
        weights, config = load_model(path)
        return cls(weights, config, Tokenizer(path), path, loaded_prompt, options, kv_bits, cache, progress)

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
                progress=self.progress or stderr_progress("caching prefix tokens"),
            )
        return self._prefix

    # -- answering ----------------------------------------------------------

    def _options(self, overrides: dict) -> GenerationOptions:
        return replace(self.options, **overrides) if overrides else self.options

    def _check_fits(self, context_used: int, new_tokens: int) -> int:
        """Room left for generation; a one-line error if the new tokens do not fit."""
        left = self.context_length - context_used - new_tokens
        if left < 1:
            raise UrialError(
                f"the query is {new_tokens} tokens but only {self.context_length - context_used} tokens "
                f"of context are left after the {context_used}-token prefix"
            )
        return left

    def _check_query(self, query: str) -> str:
        if not isinstance(query, str) or not query.strip():
            raise UrialError("the query is empty")
        return query.strip()

    def _generate(self, cache: list, history: List[int], new_ids: List[int], options: GenerationOptions,
                  stats: Stats, run: _Run, start: float, framed: bool = True) -> Iterator[str]:
        """Feed ``new_ids`` on top of ``cache`` (which holds ``history``) and stream the answer text.

        ``framed``: the text is a URIAL answer block (stop at its end, trim it); otherwise a raw
        continuation that stops only at EOS, ``options.stop`` or the token limit.
        """
        left = self._check_fits(len(history), len(new_ids))
        options = replace(options, max_tokens=min(options.max_tokens, left))
        stats.prefill_tokens = stats.prefill_tokens or len(new_ids)
        stats.prompt_tokens = len(history) + len(new_ids)
        timer = Timer(stats, start)
        decoder = StreamingDecoder(self.tokenizer)
        matcher = StopMatcher((urial.STOP_STRINGS if framed else ()) + tuple(options.stop))
        emitted_start = framed
        for token in generate_tokens(self.model, new_ids, cache, history, options):
            timer.token()
            run.token_ids.append(token)
            run.fed = len(run.token_ids)
            if token in self.tokenizer.eos_ids:
                run.finish_reason = "stop"
                break
            piece = decoder.add(token)
            run.raw += piece
            if emitted_start and run.raw.startswith(urial.FENCE):
                run.finish_reason = "stop"  # the model closed the answer block at once
                break
            out = matcher.feed(piece)
            if emitted_start:
                out = out.lstrip()
                emitted_start = not out
            if out:
                yield out
            if matcher.stopped:
                run.finish_reason = "stop"
                break
        else:
            tail = matcher.flush()
            tail = tail.rstrip() if framed else tail
            if tail:
                yield tail
        if len(run.token_ids) == options.max_tokens:
            run.fed -= 1  # the last token was sampled but never fed to the model
        timer.finish()

    def _start(self, history_text: str, no_cache: bool) -> Tuple[list, List[int], List[int], Stats]:
        """Cache, history ids and new ids for a request whose text after the prefix is ``history_text``."""
        stats = Stats()
        rest = self.tokenizer.encode(history_text)
        self._check_fits(len(self.prefix_ids), len(rest))
        if no_cache or not self.use_cache:
            return make_cache(self.model, self.kv_bits), [], self.prefix_ids + rest, stats
        prefix = self.prefix
        stats.cache_hit = prefix.hit
        stats.cached_tokens = len(prefix.tokens)
        return prefix.fresh(), list(prefix.tokens), rest, stats

    def stream(self, query: str, *, history: Sequence[Tuple[str, str]] = (), no_cache: bool = False,
               **options) -> "AnswerStream":
        """Answer ``query`` as text pieces while it is generated; ``.answer`` holds the result after.

        ``history`` is a list of earlier ``(query, answer)`` turns to render before the query.
        """
        start = time.perf_counter()
        query = self._check_query(query)
        cache, history, new_ids, stats = self._start(urial.render_history(history, query), no_cache)
        run = _Run()
        pieces = self._generate(cache, history, new_ids, self._options(options), stats, run, start)
        return AnswerStream(pieces, stats, run)

    def ask(self, query: str, *, history: Sequence[Tuple[str, str]] = (), no_cache: bool = False,
            **options) -> Answer:
        """Answer ``query`` (greedy by default) and return the text with stats."""
        return self.stream(query, history=history, no_cache=no_cache, **options).finish()

    def batch(self, queries: Sequence[str], **options) -> Iterator[Answer]:
        """Answer each query in turn, every one starting from the same cached prefix."""
        for query in queries:
            yield self.ask(query, **options)

    def chat(self, session: Optional[str] = None) -> "ChatSession":
        """A multi-turn session; with a name, it is loaded from disk if saved before."""
        if session:
            saved = ChatSession.load(self, session)
            if saved is not None:
                return saved
        return ChatSession(self, name=session)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class ChatSession:
    """A conversation whose KV state grows turn by turn.

    Earlier turns are never prefilled again. After each answer the cache is cut
    back to where the generated tokens and the canonical rendering of the turn
    agree; when a sliding-window layer has wrapped and cannot be cut back, the
    pre-turn state is kept and only the last turn is fed again with the next
    message, so every answer equals that of a fresh full render.
    """

    def __init__(self, assistant: Assistant, name: Optional[str] = None):
        self.assistant = assistant
        self.name = name
        self.turns: List[Tuple[str, str]] = []
        self.ids: List[int] = list(assistant.prefix.tokens)
        self.pending: List[int] = []
        self.state: list = assistant.prefix.fresh()

    def reset(self) -> None:
        self.turns, self.pending = [], []
        self.ids = list(self.assistant.prefix.tokens)
        self.state = self.assistant.prefix.fresh()

    def stream(self, message: str, **options) -> AnswerStream:
        """Send ``message``; iterate for the answer's pieces. The turn is recorded when it ends."""
        a = self.assistant
        start = time.perf_counter()
        message = a._check_query(message)
        stats = Stats(cache_hit=a.prefix.hit, cached_tokens=len(self.ids))
        new_ids = self.pending + a.tokenizer.encode(urial.render_turn(message))
        work = copy_cache(self.state)
        run = _Run()
        pieces = a._generate(work, self.ids, new_ids, a._options(options), stats, run, start)
        return AnswerStream(pieces, stats, run,
                            on_done=lambda answer: self._record(message, answer.text, work, new_ids, run))

    def send(self, message: str, **options) -> Answer:
        """Send ``message`` and return the answer."""
        return self.stream(message, **options).finish()

    def _record(self, message: str, answer: str, work: list, new_ids: List[int], run: _Run) -> None:
        turn_ids = self.assistant.tokenizer.encode(urial.render_turn(message, answer))
        target = self.pending + turn_ids
        fed = new_ids + run.token_ids[:run.fed]
        keep = _common_prefix(fed, target)
        extra = len(fed) - keep
        if extra == 0 or all(c.is_trimmable() for c in work):
            for c in work:
                c.trim(extra)
            self.state, self.ids = work, self.ids + target[:keep]
            self.pending = target[keep:]
        else:
            self.pending = target
        self.turns.append((message, answer))

    # -- persistence ----------------------------------------------------------

    def save(self, name: Optional[str] = None) -> Path:
        """Write the conversation and its KV state atomically to the session store."""
        from .prefix_cache import save as save_cache

        self.name = name or self.name
        if not self.name:
            raise UrialError("a session needs a name to be saved")
        target = sessions_dir() / _safe_name(self.name)
        a = self.assistant
        record = {"version": 1, "prefix_key": a.prefix.key, "model": str(a.model_path),
                  "prompt": a.prompt.name, "turns": self.turns, "ids": self.ids, "pending": self.pending,
                  "saved": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with atomic_dir(target) as tmp:
            (tmp / "session.json").write_text(json.dumps(record))
            save_cache(tmp / "kv.safetensors", self.state, {"prefix_key": a.prefix.key, "tokens": len(self.ids)})
        return target

    @classmethod
    def load(cls, assistant: Assistant, name: str) -> Optional["ChatSession"]:
        """A saved session, or None if there is none. A stale or damaged KV state is rebuilt."""
        from .prefix_cache import load as load_cache, warn

        folder = sessions_dir() / _safe_name(name)
        if not (folder / "session.json").exists():
            return None
        try:
            record = json.loads((folder / "session.json").read_text())
            turns = [(str(q), str(a)) for q, a in record["turns"]]
        except (OSError, ValueError, KeyError, TypeError):
            raise UrialError(f"session {name!r} is damaged ({folder / 'session.json'})") from None
        session = cls(assistant, name=name)
        session.turns = turns
        if record.get("prefix_key") == assistant.prefix.key:
            try:
                state, _ = load_cache(folder / "kv.safetensors")
                if state[0].offset == len(record["ids"]):
                    session.state, session.ids, session.pending = state, record["ids"], record["pending"]
                    return session
            except ValueError as e:
                warn(f"session {name!r} KV state {e}; rebuilding it")
        else:
            warn(f"session {name!r} was saved with another model or prompt; rebuilding its KV state")
        history = assistant.tokenizer.encode("".join(urial.render_turn(q, a) for q, a in turns))
        if history:
            prefill(assistant.model, history, session.state)
            session.ids = session.ids + history
        return session


def _safe_name(name: str) -> str:
    if not name or not all(ch.isalnum() or ch in "-_." for ch in name) or name.startswith("."):
        raise UrialError(f"invalid session name {name!r}: use letters, digits, '-', '_' and '.'")
    return name
