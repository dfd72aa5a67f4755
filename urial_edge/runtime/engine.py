"""Continuous batching: one model, many answers, one token for each of them per forward pass.

Every answer is a :class:`Generation` that starts from a KV state (a copy of the
shared URIAL prefix, a conversation's state, or nothing) plus the tokens it
still has to feed. Each :meth:`Engine.step`:

1. admits waiting generations while there is room (``max_active``) and prefills
   them together, one chunk of ``prefill_step`` tokens per step, so a long
   prompt never stalls the answers already running for long;
2. feeds every running generation's last token in one forward pass, samples each
   row with its own options, and hands out the tokens of the previous step
   (the next forward pass is queued before the host looks at the tokens, as in
   ``mlx_lm.generate_step``); finished, stopped and cancelled generations leave
   the batch there and then. While some row carries a constraint (structured
   output, ``constraints.py``) the step is :meth:`Engine._decode_guided` instead:
   it masks those rows' logits and feeds the tokens their grammars force.

The KV states are mlx-lm's batch caches (``KVCache.merge`` gives a
``BatchKVCache``, ``RotatingKVCache.merge`` a ``BatchRotatingKVCache`` for
sliding-window layers; their ``prepare``/``finalize`` handle prompts of
different lengths and ``extend``/``filter``/``extract`` let generations join and
leave), and the sampling pieces are mlx-lm's (top-p, the repetition penalty).
The schedule is ours rather than ``mlx_lm.generate.BatchGenerator`` because
importing ``mlx_lm.generate`` imports transformers: 0.6 s measured, on a cold
cached ``ask`` that takes 0.7 s in all (benchmarks/results/suite.md). Ours also
stops on text (URIAL's frame, user stop strings) rather than token ids, gives
each answer its own random stream (``seed``), and times each answer's wait in
the queue.

The engine reads the caches it is given and never changes them. It is driven
either by whoever waits for a generation (the Python API: iterating a generation
runs steps), or by a thread of its own (:meth:`Engine.start`, for the server).

At exit every engine's thread is stopped and MLX finishes the work still queued
(:func:`settle`): the last step's next forward pass and snapshot copies run
asynchronously, and a process that ended with them in flight corrupted its heap
now and then while the interpreter freed the arrays they use (exit 134 after a
complete answer).
"""

import atexit
import functools
import math
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models import cache as mlx_cache

from ..errors import UrialError
from .constraints import Constraint, Guide, fill_masks, vocabulary
from .detokenizer import AnswerText
from .kv_state import PREFILL_STEP
from .options import GenerationOptions
from .sampling import (TokenLogprob, apply_masks, forced_logprob, logprob_arrays, make_penalty, make_sampler,
                       sampled_distribution, token_logprob)

NORMAL, PRIMING, HANDED = 0, 1, 2  # a row's input: its last token, its last prompt token, or a token already out


@dataclass
class Stats:
    """Timing and counts of one answer."""

    ttft: float = 0.0  # from the request to its first token, queue wait included
    queue_seconds: float = 0.0  # waiting for a free slot in the batch
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    prefill_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    total_seconds: float = 0.0
    cache_hit: bool = False
    cached_tokens: int = 0
    batch_size: int = 0  # the most answers decoded together while this one ran
    peak_memory_mb: float = 0.0
    constraint_seconds: float = 0.0  # host time spent on the answer's constraint (matcher, masks, forced tokens)

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


@dataclass
class Request:
    """What to generate: ``tokens`` fed on top of ``cache`` (which holds ``history``)."""

    tokens: List[int]
    cache: Optional[list] = None  # single-sequence mlx-lm caches; None starts empty
    history: Sequence[int] = ()
    options: GenerationOptions = field(default_factory=GenerationOptions)
    framed: bool = True  # a URIAL answer block (see output.AnswerText)
    keep_state: bool = False  # keep the final KV state in ``Generation.state``
    on_prefilled: Optional[Callable[[list], None]] = None  # gets the state after all but the last token
    logprobs: Optional[int] = None  # report each token's log-probability and this many alternatives (0-20)
    constraint: Optional[Constraint] = None  # what the answer must look like (structured output)
    stats: Stats = field(default_factory=Stats)
    started: float = field(default_factory=time.perf_counter)  # the clock of ttft and total_seconds


class EngineBusy(UrialError):
    """The queue is full; try again after ``retry_after`` seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


class Generation:
    """One answer being generated. Iterate for its text pieces; ``finish_reason`` is set at the end."""

    def __init__(self, engine: "Engine", request: Request, text: AnswerText, max_tokens: int):
        self.engine, self.request, self.text, self.max_tokens = engine, request, text, max_tokens
        self.stats = request.stats
        self.token_ids: List[int] = []
        self.finish_reason: Optional[str] = None  # "stop", "length", "cancelled" or "error"
        self.error: Optional[BaseException] = None
        self.state: Optional[list] = None
        self.cancelled = False
        self._pieces: deque = deque()
        self._changed = threading.Event()
        self._submitted = time.perf_counter()
        self._admitted = self._first = 0.0
        self.sampler = make_sampler(request.options)
        self.penalty = make_penalty(request.options)
        self.context = None  # the token window the penalty looks at, once decoding starts
        self.logprobs: Optional[List[TokenLogprob]] = [] if request.logprobs is not None else None
        self._sampled: deque = deque()  # logprob arrays of tokens sampled but not yet handed out, oldest first
        self.guide: Optional[Guide] = None  # the constraint's matcher state, if the answer has one
        self.queue: List[int] = []  # in a step with constrained rows: the tokens this row feeds (see _decode_guided)
        self.ending: Optional[str] = None  # why a kept-state answer ends, once it has, while it feeds its queue

    def cancel(self) -> None:
        """Stop this answer; it leaves the batch at the next step."""
        if self.engine.sync is not None:  # several ranks: all of them drop it before the same step
            return self.engine.sync.cancel(self)
        self.cancelled = True
        self.engine.wake()

    def __iter__(self) -> Iterator[str]:
        try:
            while True:
                self._changed.clear()
                while self._pieces:
                    yield self._pieces.popleft()
                if self.finish_reason is not None:
                    if self.error is not None:
                        raise self.error
                    return
                self.engine.advance(self)
        except GeneratorExit:
            self.cancel()
            raise

    # -- called by the engine -----------------------------------------------------

    def _token(self, token: int, now: float, forced: bool = False) -> Optional[str]:
        """Hand out one generated token (``forced``: by a constraint, not drawn); returns why the answer ends
        with it, if it does."""
        if not self.token_ids:
            self._first = now
            self.stats.ttft = now - self.request.started
            self.stats.prefill_tps = self.stats.prefill_tokens / max(now - self._admitted, 1e-9)
        self.token_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(forced_logprob(token, self.request.logprobs) if forced
                                 else token_logprob(token, self._sampled.popleft()))
        self.stats.generation_tokens += 1
        piece = self.text.add(token)
        if piece:
            self._pieces.append(piece)
            self._changed.set()
        if self.text.finish_reason:
            return self.text.finish_reason
        return "length" if len(self.token_ids) >= self.max_tokens else None

    def _next(self, token: int, drawn: bool, now: float, fast_forward: bool) -> Optional[str]:
        """In a step with constrained rows: take this row's last token (``drawn`` at the last step and not
        handed out yet, or a prompt's last token, or handed out already) and queue what the row feeds now: that
        token and the tokens its constraint forces after it (with ``fast_forward``; without, only forced tokens
        that complete the answer), handed out at once. Returns why the answer ends, if it does.

        Forced tokens that complete the answer (its last bytes and the frame's closing fence) are handed out
        past the token limit: an answer whose grammar has nothing left to choose is complete, and valid.
        """
        self.queue = [token]
        reason = self._token(token, now) if drawn else None
        if self.guide is None or reason == "stop":  # (a constrained answer stops on EOS only where it may end)
            return reason
        if drawn:
            self.guide.consume(token)
        forced = self.guide.forced() if fast_forward else self.guide.completion()
        if self.sampler is not None:
            self.sampler.skip(len(forced))
        complete = self.guide.complete
        for t in forced:
            if reason is not None and not complete:  # the limit comes first
                break
            self.queue.append(t)
            reason = self._token(t, now, forced=True) or reason
        return self._verdict() or reason

    def _verdict(self) -> Optional[str]:
        """"stop" once the constraint is complete (with the rest of the text), "error" if it failed."""
        if self.guide.error is not None:
            self.error = UrialError(self.guide.error)
            return "error"
        if not self.guide.complete:
            return None
        tail = self.text.end()
        if tail:
            self._pieces.append(tail)
            self._changed.set()
        return "stop"

    def _finish(self, reason: str, error: Optional[BaseException] = None) -> None:
        if self.finish_reason is not None:
            return
        if reason != "stop" and reason != "error":
            tail = self.text.end()
            if tail:
                self._pieces.append(tail)
        now = time.perf_counter()
        s = self.stats
        s.total_seconds = now - self.request.started
        if s.generation_tokens > 1:
            s.generation_tps = (s.generation_tokens - 1) / max(now - self._first, 1e-9)
        s.peak_memory_mb = mx.get_peak_memory() / 1e6
        if self.guide is not None:
            s.constraint_seconds = self.guide.seconds
        if error is not None:
            self.error = error
        self.finish_reason = reason
        self._changed.set()
        self.engine._finished(self)


class _Prefill:
    """Generations admitted together, their prompts (all but the last token) fed in chunks."""

    def __init__(self, model, seqs: List[Generation]):
        self.seqs = seqs
        caches = [s.request.cache if s.request.cache is not None else mlx_cache.make_prompt_cache(model)
                  for s in seqs]
        self.cache = [_merge([c[layer] for c in caches]) for layer in range(len(caches[0]))]
        prompts = [s.request.tokens[:-1] for s in seqs]
        lengths = [len(p) for p in prompts]
        self.width = max(lengths)
        self.padding = [self.width - n for n in lengths]
        self.tokens = mx.array([p + [0] * pad for p, pad in zip(prompts, self.padding)])
        if self.width and max(self.padding):
            for c in self.cache:
                c.prepare(lengths=lengths, right_padding=self.padding)
        self.done = 0

    def advance(self, model, step: int) -> bool:
        """Feed the next chunk; True when every prompt is in the cache."""
        if self.done < self.width:
            model(self.tokens[:, self.done:self.done + step], cache=self.cache)
            self.done = min(self.done + step, self.width)
            if self.done == self.width and max(self.padding):
                for c in self.cache:
                    c.finalize()
            mx.eval([c.state for c in self.cache])
        return self.done >= self.width


def _merge(layer_caches: list):
    first = layer_caches[0]
    if not hasattr(first, "merge"):
        raise UrialError(f"this model's {type(first).__name__} layers cannot be batched")
    return first.merge(layer_caches)


_engines: "weakref.WeakSet[Engine]" = weakref.WeakSet()
STOP_WAIT = 30.0  # seconds to wait at exit for an engine thread to finish its step


def settle() -> None:
    """Stop every engine's thread and wait for MLX's queued work (``mx.async_eval``) to finish: before the
    interpreter tears down, nothing may still be computing with the arrays it frees. Then this thread's
    MLX state goes too, as for every thread (:func:`mlx_thread`)."""
    for engine in list(_engines):
        engine.stop(now=True)
    mx.synchronize()
    mx.clear_streams()


def mlx_thread(work: Callable[[], None]) -> Callable[[], None]:
    """``work`` for a thread of its own, which then waits for its MLX work and destroys its MLX state.

    MLX asks every thread that used it to call ``clear_streams`` at its end: left to the thread's own
    exit, that clean-up takes the GIL, and a thread ending while the interpreter tears down (an engine
    thread stopped at exit) is then killed inside it ("terminate called without an active exception",
    exit 134: 6 exits in 100 of a thread that drew one random token, 0 in 150 with the call).
    """
    def run() -> None:
        try:
            work()
        finally:
            mx.synchronize()
            mx.clear_streams()

    return run


@functools.lru_cache(maxsize=None)
def _settle_at_exit() -> None:
    atexit.register(settle)  # once per process, when the first engine is made


class Engine:
    """Runs every submitted :class:`Request` through one model, batched."""

    def __init__(self, model, tokenizer, eos_ids, context_length: int, max_active: int = 16,
                 max_queued: Optional[int] = None, prefill_step: int = PREFILL_STEP, prefill_batch: int = 8,
                 vocab_size: Optional[int] = None):
        if max_active < 1:
            raise UrialError(f"the batch size must be at least 1, got {max_active}")
        self.model, self.tokenizer, self.eos_ids = model, tokenizer, set(eos_ids)
        self.context_length = context_length
        self.vocab_size = vocab_size or tokenizer.vocab_size  # the model's logits per token
        self.fast_forward = True  # feed the tokens a constraint forces without a decode step each
        self.max_active, self.max_queued = max_active, max_queued
        self.prefill_step, self.prefill_batch = prefill_step, prefill_batch
        self._lock = threading.Condition()
        self.waiting: deque = deque()
        self.group: Optional[_Prefill] = None
        self.active: List[Generation] = []
        self.cache: Optional[list] = None  # batch caches, one per layer; row i is active[i]
        self.inputs: Optional[mx.array] = None  # the token each row feeds at the next step
        self.phase: List[int] = []  # per row: NORMAL, PRIMING or HANDED (see _decode)
        self.steps = 0
        self.finished = {"stop": 0, "length": 0, "cancelled": 0, "error": 0}  # answers by how they ended
        self._answer_seconds = 0.0  # recent answers' mean duration, for Retry-After
        self._driver: Optional[threading.Thread] = None
        self._stopping = ""  # "idle": the driver ends once nothing is in flight; "now": after its step
        self._stepping = threading.Lock()
        # under `serve` on several ranks, a distributed.Lockstep: its loop drives the steps and it
        # orders submissions and cancellations so that every rank's engine stays the same
        self.sync = None
        _engines.add(self)
        _settle_at_exit()

    # -- submitting and waiting ----------------------------------------------------

    def submit(self, request: Request) -> Generation:
        """Queue a request; the returned generation yields its text. EngineBusy if the queue is full."""
        if not request.tokens:
            raise UrialError("nothing to generate from: the prompt has no tokens")
        used = len(request.history) + len(request.tokens)
        left = self.context_length - used
        if left < 1:
            raise UrialError(f"the prompt is {used} tokens but the model's context is {self.context_length}")
        request.stats.prompt_tokens = used
        request.stats.prefill_tokens = len(request.tokens)
        text = AnswerText(self.tokenizer, self.eos_ids, request.options.stop, request.framed,
                          constrained=request.constraint is not None)
        seq = Generation(self, request, text, min(request.options.max_tokens, left))
        if request.constraint is not None:
            seq.guide = Guide(request.constraint, vocabulary(self.tokenizer, self.vocab_size), request.framed)
            if seq.guide.error is not None:
                raise UrialError(seq.guide.error)
        with self._lock:
            if self.max_queued is not None and len(self.waiting) >= self.max_queued + self._free_slots():
                raise EngineBusy(f"busy: {len(self.active)} answers running and {len(self.waiting)} waiting",
                                 retry_after=max(1, math.ceil(self._answer_seconds)))
            self.waiting.append(seq)
            self._lock.notify_all()
        return seq

    def _in_flight(self) -> List[Generation]:
        """Generations being decoded or prefilled (not those still waiting)."""
        return self.active + (self.group.seqs if self.group else [])

    def _free_slots(self) -> int:
        return max(0, self.max_active - len(self._in_flight()))

    def wake(self) -> None:
        with self._lock:
            self._lock.notify_all()

    def start(self) -> None:
        """Run steps on a thread of our own from now on (several threads may then wait on generations)."""
        if self._driver is None:
            drive = self.sync.drive if self.sync is not None else self._drive
            self._driver = threading.Thread(target=mlx_thread(drive), name="urial-edge-engine", daemon=True)
            self._driver.start()

    def stop(self, now: bool = False) -> None:
        """End the driver thread: once nothing is in flight (a server unloading the model: the thread holds
        the engine, and with it the model, for as long as it runs), or with ``now`` after its current step
        (at exit; waiting at most STOP_WAIT). A lock-step driver stops with its server."""
        driver = self._driver
        if driver is None or self.sync is not None:
            return
        with self._lock:
            self._stopping = "now" if now else "idle"
            self._lock.notify_all()
        driver.join(STOP_WAIT if now else None)
        if not driver.is_alive():
            self._driver, self._stopping = None, ""

    def advance(self, seq: Generation) -> None:
        """Make progress until ``seq`` may have news: wait for the driver thread, or run a step here."""
        if self._driver is not None:
            seq._changed.wait(0.5)
            return
        try:
            with self._stepping:
                self.step()
        except BaseException as e:
            self._abort(UrialError("generation was interrupted") if isinstance(e, KeyboardInterrupt) else e)
            raise

    def busy(self) -> bool:
        return bool(self.waiting or self.group or self.active)

    @property
    def load(self) -> dict:
        return {"active": len(self._in_flight()),
                "waiting": len(self.waiting), "max_active": self.max_active, "max_queued": self.max_queued,
                "finished": dict(self.finished)}

    def _drive(self) -> None:
        while True:
            with self._lock:
                while not self.busy() and not self._stopping:
                    self._lock.wait()
                if self._stopping == "now" or (self._stopping and not self.busy()):
                    return
            self.run_step()

    def run_step(self) -> None:
        """One step for a driver thread: an error goes to every generation in flight and the engine goes on."""
        try:
            with self._stepping:
                self.step()
        except Exception as e:
            self._abort(e)

    def _abort(self, error: BaseException) -> None:
        for s in self._in_flight():
            s._finish("error", error)
        self.active, self.phase, self.cache, self.inputs, self.group = [], [], None, None, None

    def _finished(self, seq: Generation) -> None:
        self.finished[seq.finish_reason] += 1
        self._answer_seconds = 0.8 * self._answer_seconds + 0.2 * seq.stats.total_seconds

    # -- one step ----------------------------------------------------------------------

    def step(self) -> None:
        """Admit and prefill (one chunk), then one decode step for every running generation."""
        self._prefill()
        self._decode()
        self.steps += 1
        if self.steps % 256 == 0:
            mx.clear_cache()

    def _admit(self) -> List[Generation]:
        room = min(self.max_active - len(self.active), self.prefill_batch)
        seqs = []
        with self._lock:
            while self.waiting and len(seqs) < room:
                s = self.waiting.popleft()
                if s.cancelled:
                    s._finish("cancelled")
                else:
                    seqs.append(s)
        now = time.perf_counter()
        for s in seqs:
            s._admitted = now
            s.stats.queue_seconds = now - s._submitted
        return seqs

    def _prefill(self) -> None:
        if self.group is None:
            seqs = self._admit()
            if not seqs:
                return
            self.group = _Prefill(self.model, seqs)
        if self.group.advance(self.model, self.prefill_step):
            group, self.group = self.group, None
            self._join(group)

    def _join(self, group: _Prefill) -> None:
        for i, s in enumerate(group.seqs):
            if s.request.on_prefilled is not None and not s.cancelled:
                snapshot = [c.extract(i) for c in group.cache]
                # copied in the background, before the next forward pass; a lazy copy would keep the
                # whole batch's arrays alive for as long as the snapshot is stored
                mx.async_eval([a for c in snapshot for a in (c.keys, c.values) if a is not None])
                s.request.on_prefilled(snapshot)
        keep = [i for i, s in enumerate(group.seqs) if not s.cancelled]
        for s in group.seqs:
            if s.cancelled:
                s._finish("cancelled")
        if not keep:
            return
        if len(keep) < len(group.seqs):
            for c in group.cache:
                c.filter(keep)
        seqs = [group.seqs[i] for i in keep]
        last = mx.array([s.request.tokens[-1] for s in seqs])
        for s in seqs:
            if s.penalty is not None:
                s.context = mlx_cache.TokenBuffer(list(s.request.history) + s.request.tokens[:-1])
        if self.cache is None:
            self.cache, self.inputs = group.cache, last
        else:
            for mine, theirs in zip(self.cache, group.cache):
                mine.extend(theirs)
            self.inputs = mx.concatenate([self.inputs, last.astype(self.inputs.dtype)])
        self.active += seqs
        self.phase += [PRIMING] * len(seqs)

    def _decode(self) -> None:
        if not self.active:
            return
        if any(s.guide is not None for s in self.active):
            return self._decode_guided()
        logits = self.model(self.inputs[:, None], cache=self.cache)[:, -1, :]
        logits = self._penalise(logits, lambda i: self.inputs[i:i + 1])
        tokens = self._sample(logits)
        mx.async_eval(tokens, *self._logprobs(logits, tokens))
        fed = self.inputs.tolist()  # the previous step's tokens: ready while this step runs
        # a new answer's first token is handed out as soon as it is sampled, not a step later
        early = tokens.tolist() if PRIMING in self.phase else None
        self.inputs = tokens
        now = time.perf_counter()
        n = len(self.active)
        leaving = []
        for i, s in enumerate(self.active):
            s.stats.batch_size = max(s.stats.batch_size, n)
            reason, phase = None, self.phase[i]
            self.phase[i] = NORMAL
            if phase == PRIMING and not s.request.keep_state:  # (a kept state holds every token handed out)
                reason = s._token(early[i], now)
                self.phase[i] = HANDED
            elif phase == NORMAL:
                reason = s._token(fed[i], now)
            if reason is None and s.cancelled:
                reason = "cancelled"
            if reason is not None:
                if s.request.keep_state:
                    s.state = [c.extract(i) for c in self.cache]
                s._finish(reason)
                leaving.append(i)
        if leaving:
            self._remove(leaving)

    def _decode_guided(self) -> None:
        """A decode step with constrained rows in the batch.

        A constrained row's mask depends on every token before it, so this step reads the last step's tokens
        before it queues the forward pass (the plain step queues it first), and computes the masks on the host
        while the forward pass runs. Each row feeds its ``queue`` (see ``Generation._next``): its last token
        and, with fast-forward, the tokens its grammar forces after it. Every row feeds as many tokens as all
        of them have queued, so no row is padded: a whole forced run at batch size 1; in a batch, forced tokens
        go one per step unless every row has some, and still skip the mask and the draw. (Padding one row's run
        would slow every row: on this CPU a batch of 7 took 783 ms for a step with one row fed 4 tokens, against
        376 ms for a plain step.) All but the last go in a pass whose logits are never computed (MLX is lazy),
        the last in the decode pass; a row whose queue goes on past this step does not draw.
        """
        fed = self.inputs.tolist()
        now = time.perf_counter()
        n = len(self.active)
        leaving = []
        for i, s in enumerate(self.active):
            s.stats.batch_size = max(s.stats.batch_size, n)
            reason = None if s.queue else s._next(fed[i], self.phase[i] == NORMAL, now, self.fast_forward)
            if reason is None and s.cancelled:
                reason = "cancelled"
            if reason is not None and s.request.keep_state and reason != "cancelled":
                s.ending = reason  # a kept state holds every token handed out: feed them first
            elif reason is not None:
                s._finish(reason)
                leaving.append(i)
        if leaving:
            self._remove(leaving)
        if not self.active:
            return
        width = min(len(s.queue) for s in self.active)
        feeds = [s.queue[:width] for s in self.active]
        for s in self.active:
            s.queue = s.queue[width:]
        if width > 1:
            self.model(mx.array([f[:-1] for f in feeds]), cache=self.cache)
        logits = self.model(mx.array([f[-1] for f in feeds])[:, None], cache=self.cache)[:, -1, :]
        logits = self._penalise(logits, lambda i: mx.array(feeds[i]))
        mx.async_eval(logits)
        drawing = [not s.queue and s.ending is None for s in self.active]
        masked = [i for i, s in enumerate(self.active) if drawing[i] and s.guide is not None]
        if masked:
            words = np.empty((len(masked), self.active[masked[0]].guide.words), np.int32)
            fill_masks([self.active[i].guide for i in masked], words)
            logits = apply_masks(logits, masked, words)
        tokens = self._sample(logits, drawing)
        mx.async_eval(tokens, *self._logprobs(logits, tokens, drawing))
        self.inputs = tokens
        self.phase = [NORMAL] * len(self.active)
        ended = [i for i, s in enumerate(self.active) if s.ending is not None and not s.queue]
        for i in ended:
            s = self.active[i]
            s.state = [c.extract(i) for c in self.cache]
            s._finish(s.ending)
        if ended:
            self._remove(ended)

    def _penalise(self, logits: mx.array, fed: Callable[[int], mx.array]) -> mx.array:
        """The repetition penalty of each row that has one, over its context and ``fed(row)``, this step's tokens."""
        if all(s.penalty is None for s in self.active):
            return logits
        rows = []
        for i, s in enumerate(self.active):
            row = logits[i:i + 1]
            if s.penalty is not None:
                row = s.penalty(s.context.update_and_fetch(fed(i)), row)
            rows.append(row)
        return mx.concatenate(rows, axis=0)

    def _sample(self, logits: mx.array, drawing: Optional[List[bool]] = None) -> mx.array:
        """One token per row; rows not ``drawing`` (feeding forced tokens) take the argmax, their draws untouched."""
        samplers = [s.sampler if drawing is None or drawing[i] else None for i, s in enumerate(self.active)]
        if all(f is None for f in samplers):
            return mx.argmax(logits, axis=-1)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return mx.concatenate([mx.argmax(logits[i:i + 1], axis=-1) if f is None
                               else f(logprobs[i:i + 1]).astype(mx.uint32) for i, f in enumerate(samplers)])

    def _logprobs(self, logits: mx.array, tokens: mx.array, drawing: Optional[List[bool]] = None) -> List[mx.array]:
        """Queue the log-probabilities of this step's tokens for the answers that asked for them."""
        arrays = []
        for i, s in enumerate(self.active):
            if s.logprobs is not None and (drawing is None or drawing[i]):
                found = logprob_arrays(sampled_distribution(s.request.options, logits[i:i + 1]), tokens[i],
                                       s.request.logprobs)
                s._sampled.append(found)
                arrays += found
        return arrays

    def _remove(self, rows: List[int]) -> None:
        gone = set(rows)
        keep = [i for i in range(len(self.active)) if i not in gone]
        self.active = [self.active[i] for i in keep]
        self.phase = [self.phase[i] for i in keep]
        if not keep:
            self.cache, self.inputs = None, None
            return
        for c in self.cache:
            c.filter(keep)
        self.inputs = self.inputs[mx.array(keep)]
