"""Sampling one row of the batch: mlx-lm's top-p and repetition penalty, greedy by default.

A sampling option is declared in ``options.py`` and acted on here; the engine
calls :func:`make_sampler` and :func:`make_penalty` once per answer. Answers
that ask for log-probabilities get them from :func:`sampled_distribution`: the
distribution the token was drawn from, after the penalty, top-p and temperature.
"""

from dataclasses import dataclass
from typing import Callable, List, Optional, Tuple

import mlx.core as mx
from mlx_lm.sample_utils import apply_top_p, make_repetition_penalty

from ..errors import UrialError
from .options import GenerationOptions

WHOLE_CONTEXT = 1 << 30  # a repetition_context of 0 means every token so far
MAX_TOP_LOGPROBS = 20  # as OpenAI's API allows


@dataclass
class TokenLogprob:
    """One generated token's log-probability, and the most likely tokens of its step (best first)."""

    token: int
    logprob: float
    top: List[Tuple[int, float]]


def make_sampler(options: GenerationOptions) -> Optional[Callable[[mx.array], mx.array]]:
    """Sampling for one row of log-probabilities; None for greedy. A seed gives the answer its own key."""
    if options.temperature == 0:
        return None
    key = mx.random.key(options.seed) if options.seed is not None else None
    inverse_temperature = 1.0 / options.temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        if options.top_p < 1.0:
            logprobs = apply_top_p(logprobs, options.top_p)
        if key is None:
            return mx.random.categorical(logprobs * inverse_temperature)
        key, subkey = mx.random.split(key)
        return mx.random.categorical(logprobs * inverse_temperature, key=subkey)

    return sample


def make_penalty(options: GenerationOptions):
    """mlx-lm's repetition penalty over the last ``repetition_context`` tokens (prompt included); None if off."""
    if options.repetition_penalty == 1.0:
        return None
    return make_repetition_penalty(options.repetition_penalty, options.repetition_context or WHOLE_CONTEXT)


def check_logprobs(top: Optional[int]) -> Optional[int]:
    """How many alternatives to report per token (None: no log-probabilities); a one-line error if invalid."""
    if top is not None and (isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise UrialError(f"logprobs must be an integer from 0 to {MAX_TOP_LOGPROBS}, got {top!r}")
    return top


def sampled_distribution(options: GenerationOptions, logits: mx.array) -> mx.array:
    """Log-probabilities (one row) of the distribution a token is drawn from under ``options``.

    Greedy answers take the most likely token of the (penalised) logits; sampled ones draw from
    the top-p nucleus at the temperature, as ``make_sampler`` does.
    """
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    if options.temperature == 0:
        return logprobs
    if options.top_p < 1.0:
        logprobs = apply_top_p(logprobs, options.top_p)
    scaled = logprobs * (1.0 / options.temperature)
    return scaled - mx.logsumexp(scaled, axis=-1, keepdims=True)


def logprob_arrays(distribution: mx.array, token: mx.array, top: int) -> Tuple[mx.array, ...]:
    """The chosen token's log-probability and the ``top`` most likely tokens with theirs (lazy arrays)."""
    row = distribution[0]
    chosen = row[token]
    if top == 0:
        return chosen, mx.array([], dtype=mx.uint32), mx.array([], dtype=row.dtype)
    best = mx.argpartition(-row, top - 1)[:top]
    order = mx.argsort(-row[best])
    return chosen, best[order], row[best[order]]


def token_logprob(token: int, arrays: Tuple[mx.array, ...]) -> TokenLogprob:
    chosen, ids, values = arrays
    return TokenLogprob(token, chosen.item(), list(zip(ids.tolist(), values.tolist())))
