"""Host time per generated token, on a tiny model where the model's own step takes well under a millisecond.

    python benchmarks/bench_host.py [--tokens 2000] [--repeats 3]

On Apple Silicon one decode step of a small model takes a few milliseconds, so the Python work around
it (sampling bookkeeping, detokenizing, stop strings, streaming) decides the rate. A tiny random-weight
llama model stands in for that here: the same prompt is streamed to ``--tokens`` tokens by
urial-edge (``Assistant.stream``, text pieces included) and by ``mlx_lm.stream_generate`` (with its
streaming detokenizer), and the wall time per token is taken over tokens 100-200 and over the last
100. Flat means the second equals the first: no work that grows with the answer.

Writes results/host.{json,md,png}.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the optimised BLAS and light mlx_lm imports, before MLX loads
import argparse
import tempfile
import time
from pathlib import Path

from common import write_results

SIZE = {"hidden_size": 256, "num_hidden_layers": 4, "intermediate_size": 512, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 16384}  # a step costs about a small model's on a GPU
PROMPT = "name = \"t\"\nsystem = \"You are helpful.\"\n"


def make_model(folder: Path) -> Path:
    """A tiny llama that only ever picks printable ASCII bytes: every run is exactly as long (no EOS) and
    every token is a character (no byte sequences that never decode)."""
    import mlx.core as mx

    from urial_edge.testing.tiny_models import make_tiny_model
    from urial_edge.model.tokenizer import Tokenizer

    make_tiny_model(folder, "llama", seed=1, **SIZE)
    tok = Tokenizer(folder)
    weights = mx.load(str(folder / "model.safetensors"))
    for i in range(SIZE.get("vocab_size", 259)):
        text = tok.decode([i])
        if not (len(text) == 1 and text.isascii() and text.isprintable()):
            weights["lm_head.weight"][i] = -10.0
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    return folder


def clocks() -> tuple:
    """Wall time, and the CPU time of this (the host's) thread: MLX computes on threads of its own."""
    return time.perf_counter(), time.thread_time()


def per_token(times: list, first: int, last: int, clock: int = 0) -> float:
    """Mean seconds per token between token ``first`` and token ``last`` (1-based) on one of the clocks."""
    return (times[last - 1][clock] - times[first - 1][clock]) / (last - first)


def ours(bot, tokens: int) -> list:
    """The clocks when each token's text had been handed to the consumer."""
    from urial_edge.bench.batch import equal_work

    seq = bot.engine.submit(equal_work(bot, ["Tell me everything."], tokens)[0])
    times = []
    for _ in seq:  # text pieces, as Assistant.stream hands them out
        now = clocks()
        times += [now] * (len(seq.token_ids) - len(times))
    return times


def theirs(bot, tokens: int) -> list:
    from mlx_lm import stream_generate
    from mlx_lm.tokenizer_utils import TokenizerWrapper
    from transformers import PreTrainedTokenizerFast

    from urial_edge.runtime import prompt as urial

    wrapper = TokenizerWrapper(PreTrainedTokenizerFast(tokenizer_file=str(bot.model_path / "tokenizer.json")))
    ids = bot.prefix_ids + bot.after_prefix(urial.render_turn("Tell me everything."))
    times = []
    for _ in stream_generate(bot.model, wrapper, ids, max_tokens=tokens):
        times.append(clocks())
    return times


def model_only(bot, tokens: int) -> list:
    """The model's own share: one forward pass and an argmax per token, nothing else (no overlap)."""
    import mlx.core as mx

    from urial_edge.bench.batch import equal_work
    from urial_edge.runtime.kv_state import copy_cache

    request = equal_work(bot, ["Tell me everything."], tokens)[0]
    cache = copy_cache(request.cache)
    bot.model(mx.array(request.tokens[:-1])[None], cache=cache)
    y = mx.array(request.tokens[-1:])
    times = []
    for _ in range(tokens):
        y = mx.argmax(bot.model(y[None], cache=cache)[:, -1, :], axis=-1)
        mx.eval(y)
        times.append(clocks())
    return times


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    import os

    from urial_edge.runtime.assistant import Assistant

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["URIAL_EDGE_HOME"] = str(Path(tmp) / "home")
        (Path(tmp) / "p.toml").write_text(PROMPT)
        bot = Assistant.load(str(make_model(Path(tmp) / "model")), str(Path(tmp) / "p.toml"))
        generators = {"urial-edge": ours, "mlx_lm.stream_generate": theirs, "model only (reference)": model_only}
        runs = {name: [] for name in generators}
        for name, run in generators.items():
            run(bot, 50)  # warm up
        for _ in range(args.repeats):  # in turns
            for name, run in generators.items():
                runs[name].append(run(bot, args.tokens))
    n = args.tokens
    rows = []
    for name, all_times in runs.items():
        assert all(len(t) == n for t in all_times), (name, [len(t) for t in all_times])
        row = {"generator": name}
        for clock, label in ((1, "host CPU"), (0, "wall")):
            early = min(per_token(t, 100, 200, clock) for t in all_times) * 1e3
            late = min(per_token(t, n - 100, n, clock) for t in all_times) * 1e3
            row.update({f"{label} ms/token 100-200": early, f"{label} ms/token {n - 100}-{n}": late,
                        f"{label} late / early": late / early})
        row["wall ms/token overall"] = min(per_token(t, 1, n) for t in all_times) * 1e3
        rows.append(row)
    late = f"host CPU ms/token {n - 100}-{n}"
    ratio = {"host CPU per token, urial-edge / mlx-lm (tokens 100-200)":
             rows[0]["host CPU ms/token 100-200"] / rows[1]["host CPU ms/token 100-200"],
             f"host CPU per token, urial-edge / mlx-lm (tokens {n - 100}-{n})": rows[0][late] / rows[1][late],
             "wall per token overall, urial-edge / mlx-lm": rows[0]["wall ms/token overall"] /
             rows[1]["wall ms/token overall"]}
    notes = (f"Tiny random llama ({SIZE['num_hidden_layers']} layers, hidden {SIZE['hidden_size']}), greedy, "
             f"{n} tokens, best of {args.repeats} runs in turns. \"host CPU\" is the CPU time of the thread that "
             "drives generation and receives the text (MLX computes on threads of its own), so it is the host's "
             "work per token: graph building, sampling bookkeeping, detokenizing, stop strings. "
             + "; ".join(f"{k}: {v:.2f}" for k, v in ratio.items()) + ".")
    md = write_results("host", rows, list(rows[0]), "Host time per token (tiny model)", notes, extra={"ratios": ratio})
    print(md.read_text())


if __name__ == "__main__":
    main()
