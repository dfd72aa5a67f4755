"""Sampling one row of the batch: mlx-lm's top-p and repetition penalty, greedy by default.

A sampling option is declared in ``options.py`` and acted on here; the engine
calls :func:`make_sampler` and :func:`make_penalty` once per answer.
"""

from typing import Callable, Optional

import mlx.core as mx

from .options import LONGEST, GenerationOptions

WHOLE_CONTEXT = LONGEST  # a repetition_context of 0 means every token so far


def make_sampler(options: GenerationOptions) -> Optional[Callable[[mx.array], mx.array]]:
    """Sampling for one row of log-probabilities; None for greedy. A seed gives the answer its own key."""
    if options.temperature == 0:
        return None
    from mlx_lm.sample_utils import apply_top_p

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
    from mlx_lm.sample_utils import make_repetition_penalty

    return make_repetition_penalty(options.repetition_penalty, options.repetition_context or WHOLE_CONTEXT)
