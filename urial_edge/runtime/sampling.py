"""Sampling one row of the batch: mlx-lm's top-p and repetition penalty, greedy by default.

A sampling option is declared in ``options.py`` and acted on here; the engine
calls :func:`make_sampler` and :func:`make_penalty` once per answer. Answers
that ask for log-probabilities get them from :func:`sampled_distribution`: the
distribution the token was drawn from, after the penalty, a constraint's mask
(:func:`apply_masks`), top-p and temperature.
"""

import functools
import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np
from mlx_lm.sample_utils import apply_top_p, make_repetition_penalty

from ..errors import UrialError
from .options import LONGEST, GenerationOptions

WHOLE_CONTEXT = LONGEST  # a repetition_context of 0 means every token so far
MAX_TOP_LOGPROBS = 20  # as OpenAI's API allows


@dataclass
class TokenLogprob:
    """One generated token's log-probability, and the most likely tokens of its step (best first)."""

    token: int
    logprob: float
    top: List[Tuple[int, float]]


class Sampler:
    """Draws a token from one row of log-probabilities (top-p, temperature); a seed gives the answer its own key."""

    def __init__(self, options: GenerationOptions):
        self.top_p = options.top_p
        self.inverse_temperature = 1.0 / options.temperature
        self.key = mx.random.key(options.seed) if options.seed is not None else None

    def __call__(self, logprobs: mx.array) -> mx.array:
        if self.top_p < 1.0:
            logprobs = apply_top_p(logprobs, self.top_p)
        if self.key is None:
            return mx.random.categorical(logprobs * self.inverse_temperature)
        self.key, subkey = mx.random.split(self.key)
        return mx.random.categorical(logprobs * self.inverse_temperature, key=subkey)

    def skip(self, n: int) -> None:
        """Advance the random stream as ``n`` draws would: tokens a constraint forces are fed without one, and
        the draws after them stay those of token-by-token decoding (where each had one allowed token)."""
        for _ in range(n if self.key is not None else 0):
            self.key, _ = mx.random.split(self.key)


def make_sampler(options: GenerationOptions) -> Optional[Sampler]:
    """Sampling for one row of log-probabilities; None for greedy."""
    return None if options.temperature == 0 else Sampler(options)


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
    """The reported log-probabilities; alternatives that could not be drawn (-inf: masked by a constraint or
    outside the top-p nucleus) are left out."""
    chosen, ids, values = arrays
    return TokenLogprob(token, chosen.item(), [(i, v) for i, v in zip(ids.tolist(), values.tolist()) if v > -math.inf])


def forced_logprob(token: int, top: int) -> TokenLogprob:
    """A token a constraint forced: the only one its step allowed, so drawn with probability 1."""
    return TokenLogprob(token, 0.0, [(token, 0.0)] if top else [])


@functools.lru_cache(maxsize=None)
def _mask_table() -> mx.array:
    """Row ``b``: 0 where bit k of byte ``b`` is set, -inf where it is not."""
    return mx.array(np.array([[0.0 if (b >> k) & 1 else -np.inf for k in range(8)] for b in range(256)], np.float32))


def apply_masks(logits: mx.array, rows: Sequence[int], words: np.ndarray) -> mx.array:
    """Set the tokens a constraint does not allow to -inf in ``rows`` of ``logits``; other rows are untouched.

    ``words`` holds one bitmask per row (int32, bit j of word i is token 32 i + j, llguidance's layout). Its
    bytes index a 256 x 8 table of {0, -inf} that is added to the rows. llguidance.mlx's kernel does this on
    Metal only (MLX's CPU backend has no custom kernels) and for a whole batch; on this machine the table
    costs 0.2-0.5 ms per masked row, against 0.5-0.9 ms for shifting bits with mx.where.
    """
    vocab = logits.shape[-1]
    add = _mask_table()[mx.array(words).view(mx.uint8)].reshape(len(rows), -1)[:, :vocab].astype(logits.dtype)
    if len(rows) == logits.shape[0]:
        return logits + add
    return logits.at[mx.array(list(rows))].add(add)  # only the masked rows are written
