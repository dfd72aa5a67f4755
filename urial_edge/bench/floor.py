"""``python -m urial_edge.bench.floor MODEL_DIR CACHE_FILE IDS_JSON``: the floor of a cold cached answer.

A bare process that does only what any cold cached answer must: load the
weights and the prefix cache, prefill the query and take one decode step.
Prints the first token and the seconds it took.
"""

import json
import sys
import time
from pathlib import Path

from ..model.backend import prepare
from ..model.loading import load_model

START = time.perf_counter()


def main() -> None:
    prepare()  # before MLX loads, as the command line does
    import mlx.core as mx
    from mlx_lm.models.cache import load_prompt_cache

    model, _ = load_model(Path(sys.argv[1]))
    cache = load_prompt_cache(sys.argv[2])
    ids = json.loads(sys.argv[3])
    model(mx.array(ids[:-1])[None], cache=cache)
    mx.eval([c.state for c in cache])
    logits = model(mx.array(ids[-1:])[None], cache=cache)
    print(mx.argmax(logits[:, -1, :], axis=-1).item(), time.perf_counter() - START)


if __name__ == "__main__":
    main()
