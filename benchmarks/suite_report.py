"""The suite's report: Markdown tables and a chart drawn from ``suite.json`` (written by ``urial-edge bench``)."""

from pathlib import Path


def render(result: dict, out: Path) -> None:
    """Write ``out/suite.md`` (every table) and ``out/suite.png`` (cold-start wall times) from the suite's result."""
    out.mkdir(parents=True, exist_ok=True)
    lines = ["# urial-edge vs mlx-lm and llama.cpp", "", "Medians of cold processes, run in turns after a discarded warm-up round (the full-prompt mlx_lm "
             "row runs on its own); peak memory is the max RSS of each process.",
             "The floor is a bare script that loads the weights and the prefix cache, runs the query and takes "
             "its first token. \"query forward\" is the model's share of a first token in a warm process: the "
             "query's forward pass from the cached prefix to its last logits. The llama.cpp row loads the GGUF the "
             "model was converted from, restores the prefix's KV state from a file saved with llama_state_save_file "
             "(as llama-cli --prompt-cache does), feeds the query and takes its first token. Decode rates use one "
             "clock for all: tokens after the first over the time since the first.", "",
             "| run | wall s | peak RSS MB |", "|---|---|---|"]
    lines += [f"| {name} | {row['wall_s']:.2f} | {row['peak_rss_mb']:.0f} |" for name, row in result["cold"].items()]
    lines += ["", "| in process | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in {**result["warm"], **result["decode"]}.items()]
    batch = result["batching"]["throughput"][0]
    lines += ["", f"| {batch['queries']} queries, {batch['max_tokens']} tokens each | tokens/s |", "|---|---|",
              f"| urial-edge, batched | {batch['batched_tps']:.1f} |",
              f"| urial-edge, one at a time | {batch['sequential_tps']:.1f} |",
              f"| mlx_lm.batch_generate, same prefix caches | {batch['mlx_lm_batch_tps']:.1f} |"]
    lines += ["", "| server clients | tokens/s | ttft p50 s | ttft p95 s |", "|---|---|---|---|"]
    lines += [f"| {r['clients']} | {r['tps']:.1f} | {r['ttft_p50']:.2f} | {r['ttft_p95']:.2f} |"
              for r in result["batching"]["server"]["concurrency"]]
    lines += ["", "| ratio | value |", "|---|---|"]
    lines += [f"| {k} | {v:.2f} |" for k, v in result["ratios"].items()]
    lines += ["", "Machine: " + ", ".join(f"{k} {v}" for k, v in result["machine"].items())]
    (out / "suite.md").write_text("\n".join(lines) + "\n")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result["cold"])
    fig, ax = plt.subplots(figsize=(9, 3.8))
    ax.barh(names, [result["cold"][n]["wall_s"] for n in names], color="#4c72b0")
    ax.invert_yaxis()
    ax.set_xlabel("wall time of a fresh process, seconds (lower is better)")
    ax.set_title("Time to one answer token from a cold start")
    fig.tight_layout()
    fig.savefig(out / "suite.png", dpi=120)
