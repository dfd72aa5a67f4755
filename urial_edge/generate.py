"""Token generation from a (possibly pre-filled) KV cache.

Like mlx-lm's ``generate_step``, the next token's computation is queued with
``mx.async_eval`` before the current one is handed out, so the Python work per
token overlaps the model's. Unlike it, the logits processors see the whole token
history (the cached prefix included), so a run resumed from the prefix cache
makes exactly the same choices as a full prefill.
"""

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx

from .store import UrialError

PREFILL_STEP = 512
REPETITION_CONTEXT = 64


@dataclass
class GenerationOptions:
    """Decoding settings. Defaults follow the URIAL reference setup (greedy, penalty 1.1)."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    repetition_penalty: float = 1.1
    seed: Optional[int] = None
    stop: Sequence[str] = field(default_factory=tuple)

    def __post_init__(self):
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise UrialError(f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not 0.0 <= self.temperature <= 5.0:
            raise UrialError(f"temperature must be between 0 and 5, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise UrialError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0.5 <= self.repetition_penalty <= 3.0:
            raise UrialError(f"repetition_penalty must be between 0.5 and 3, got {self.repetition_penalty}")
        if any(not s for s in self.stop):
            raise UrialError("stop strings must not be empty")


def make_sampler(options: GenerationOptions) -> Callable:
    from mlx_lm.sample_utils import make_sampler as mlx_make_sampler

    top_p = options.top_p if options.top_p < 1.0 else 0.0
    return mlx_make_sampler(temp=options.temperature, top_p=top_p)


def make_processors(options: GenerationOptions) -> List[Callable]:
    if options.repetition_penalty == 1.0:
        return []
    from mlx_lm.sample_utils import make_repetition_penalty

    return [make_repetition_penalty(options.repetition_penalty, REPETITION_CONTEXT)]


def prefill(model, tokens: List[int], cache: list, progress: Optional[Callable[[int, int], None]] = None) -> None:
    """Run ``tokens`` through the model to fill ``cache``, in chunks."""
    total = len(tokens)
    for start in range(0, total, PREFILL_STEP):
        chunk = mx.array(tokens[start:start + PREFILL_STEP])[None]
        model(chunk, cache=cache)
        mx.eval([c.state for c in cache])
        if progress:
            progress(min(start + PREFILL_STEP, total), total)


def generate_tokens(
    model,
    tokens: List[int],
    cache: list,
    history: List[int],
    options: GenerationOptions,
) -> Iterator[int]:
    """Yield generated token ids after feeding ``tokens`` on top of ``cache``.

    ``history`` is every token id already in ``cache``; it feeds the repetition
    penalty. ``cache`` is updated in place.
    """
    if not tokens:
        raise UrialError("nothing to generate from: the prompt has no tokens")
    if options.seed is not None:
        mx.random.seed(options.seed)
    sampler = make_sampler(options)
    processors = make_processors(options)
    context = mx.array(history + tokens) if processors else None
    if len(tokens) > 1:
        prefill(model, tokens[:-1], cache)

    def step(y: mx.array):
        nonlocal context
        logits = model(y[None], cache=cache)[:, -1, :]
        for processor in processors:
            logits = processor(context, logits)
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        token = sampler(logprobs)
        if processors:
            context = mx.concatenate([context, token])
        return token

    y = step(mx.array(tokens[-1:]))
    mx.async_eval(y)
    for n in range(options.max_tokens):
        next_y = step(y) if n + 1 < options.max_tokens else None
        if next_y is not None:
            mx.async_eval(next_y)
        yield y.item()
        if n % 256 == 255:
            mx.clear_cache()
        y = next_y


class StopMatcher:
    """Finds stop strings in streamed text, holding back text that may begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.buffer = ""
        self.stopped = False

    def feed(self, piece: str) -> str:
        """Add a piece of text; return the part that is safe to emit."""
        self.buffer += piece
        cut = min((i for i in (self.buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            out, self.buffer = self.buffer[:cut], ""
            return out
        hold = max((k for s in self.stops for k in range(1, len(s)) if self.buffer.endswith(s[:k])), default=0)
        out = self.buffer[:len(self.buffer) - hold]
        self.buffer = self.buffer[len(out):]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


@dataclass
class Stats:
    """Timing and counts of one answer."""

    ttft: float = 0.0
    prompt_tokens: int = 0
    prefill_tokens: int = 0
    prefill_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    total_seconds: float = 0.0
    cache_hit: bool = False
    cached_tokens: int = 0
    peak_memory_mb: float = 0.0

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in self.__dict__.items()}


class Timer:
    """Collects :class:`Stats` while a generation runs."""

    def __init__(self, stats: Stats, start: float):
        self.stats = stats
        self.start = start
        self.first: Optional[float] = None

    def token(self) -> None:
        now = time.perf_counter()
        if self.first is None:
            self.first = now
            self.stats.ttft = now - self.start
            self.stats.prefill_tps = self.stats.prefill_tokens / max(self.stats.ttft, 1e-9)
        self.stats.generation_tokens += 1

    def finish(self) -> Stats:
        now = time.perf_counter()
        self.stats.total_seconds = now - self.start
        if self.first is not None and self.stats.generation_tokens > 1:
            self.stats.generation_tps = (self.stats.generation_tokens - 1) / max(now - self.first, 1e-9)
        self.stats.peak_memory_mb = mx.get_peak_memory() / 1e6
        return self.stats
