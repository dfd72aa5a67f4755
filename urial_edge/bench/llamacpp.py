"""llama.cpp (through llama-cpp-python) on the same GGUF: an independent reference for the importer and a peer
in the benchmark suite.

The tests compare its tokenization and greedy tokens with the converted
model's; the suite (``suite.py``) times it answering from a KV state saved to a
file with ``llama_state_save_file``, the mechanism behind ``llama-cli
--prompt-cache`` (not ``Llama.save_state``, a Python pickle of the whole context
that is far larger and slower): ``python -m urial_edge.bench.llamacpp GGUF STATE
IDS_JSON N_CTX`` is that cold process. The runtime never imports this module.
"""

import ctypes
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

def load(gguf: Path, n_ctx: int):
    """A llama.cpp context on ``gguf`` using every core, quiet."""
    import llama_cpp

    return llama_cpp.Llama(str(gguf), n_ctx=n_ctx, n_threads=os.cpu_count(), verbose=False)


def tokenize(llm, text: str, bos: bool = True) -> List[int]:
    """llama.cpp's token ids for ``text`` (special tokens written as text are not parsed)."""
    return llm.tokenize(text.encode("utf-8"), add_bos=bos, special=False)


def logits(llm) -> np.ndarray:
    """The logits after the last evaluated token (a view into llama.cpp's buffer)."""
    return np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))


def greedy(llm, prompt: Sequence[int], n: int, keep_logits: bool = False) -> Tuple[List[int], float, list]:
    """The first ``n`` greedy tokens after ``prompt`` (from an empty context), the decode rate, and (if asked)
    the logits each token was chosen from. The rate is tokens after the first over the time since the first,
    the clock the suite uses for every engine."""
    llm.reset()
    llm.eval(list(prompt))
    kept, out, first = [], [], time.perf_counter()
    while len(out) < n:
        if out:
            llm.eval(out[-1:])
        row = logits(llm)
        if keep_logits:
            kept.append(row.copy())
        out.append(int(np.argmax(row)))
        if len(out) == 1:
            first = time.perf_counter()
    rate = (len(out) - 1) / max(time.perf_counter() - first, 1e-9)
    return out, rate, kept


def save_state(llm, prompt: Sequence[int], path: Path) -> None:
    """Evaluate ``prompt`` from an empty context and write the KV state with its tokens to ``path``."""
    import llama_cpp

    llm.reset()
    llm.eval(list(prompt))
    tokens = (llama_cpp.llama_token * len(prompt))(*prompt)
    if not llama_cpp.llama_state_save_file(llm.ctx, str(path).encode(), tokens, len(prompt)):
        raise RuntimeError(f"llama.cpp could not save its state to {path}")


def cold_answer(gguf: str, state: str, ids: List[int], n_ctx: int) -> int:
    """A cold process's first token: load the GGUF, restore the prefix state from its file, feed the query."""
    import llama_cpp

    llm = load(Path(gguf), n_ctx)
    tokens, n = (llama_cpp.llama_token * n_ctx)(), ctypes.c_size_t()
    if not llama_cpp.llama_state_load_file(llm.ctx, state.encode(), tokens, n_ctx, ctypes.byref(n)):
        raise SystemExit(f"cannot load {state}")
    llm.n_tokens = n.value
    llm.eval(ids)
    return int(np.argmax(logits(llm)))


if __name__ == "__main__":
    started = time.perf_counter()
    token = cold_answer(sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4]))
    print(token, time.perf_counter() - started)
