"""Many answers at once, side by side in one run (issue 13's figures).

    python benchmarks/bench_batch.py [--model M] [--prompt P] [--max-tokens 64] [--repeats 2]

1. Aggregate tokens/s for 1, 2, 4, 8 and 16 queries from the same cached prefix: urial-edge's
   batched engine, the same engine one answer at a time, and ``mlx_lm.batch_generate`` fed copies of
   the same prefix cache (equal work: each answer runs to EOS or the token limit, no penalty), with
   how many batched answers equal their single answers token for token.
2. A warm ``urial-edge serve`` with 1, 4 and 8 concurrent streaming clients: aggregate tokens/s and
   p50/p95 time to first token; and a short request's time to first token on an idle server and
   while a long answer is being generated.

Writes results/batch.{json,md,png}.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the optimised BLAS and light mlx_lm imports, before MLX loads

from common import RESULTS, model_arguments, write_results

from urial_edge.bench import batch as bench_batch
from urial_edge.runtime.assistant import Assistant


def main():
    parser = model_arguments(max_tokens=64, repeats=2)
    args = parser.parse_args()
    bot = Assistant.load(args.model, args.prompt, batch_size=16)
    rows = bench_batch.throughput(bot, max_tokens=args.max_tokens, repeats=args.repeats)
    spec = ["--model", str(bot.model_path), "--prompt", str(bot.prompt.path or bot.prompt.name)]
    server = bench_batch.server_rows(spec, bot.prefix_text, max_tokens=args.max_tokens, repeats=args.repeats)
    flat = [{**{k: v for k, v in r.items() if not isinstance(v, dict)},
             "identical to single": f"{r['vs_single']['identical']}/{r['vs_single']['of']}",
             "token agreement": r["vs_single"]["token_agreement"]} for r in rows]
    notes = (f"Bundled model unless named; prompt {bot.prompt.name} ({len(bot.prefix_ids)} prefix tokens); "
             f"{args.max_tokens} tokens per answer at most, best of {args.repeats} runs taken in turns. "
             "Server: " + "; ".join(f"{r['clients']} clients {r['tps']:.1f} tok/s (x{r['tps / one client']:.2f}), "
                                     f"ttft p50 {r['ttft_p50']:.2f} s p95 {r['ttft_p95']:.2f} s"
                                     for r in server["concurrency"])
             + f". Short request ttft idle {server['short_beside_long']['idle_ttft']:.2f} s, beside a long answer "
             f"{server['short_beside_long']['busy_ttft']:.2f} s (x{server['short_beside_long']['busy / idle']:.2f}).")
    columns = ["queries", "batched_tps", "sequential_tps", "mlx_lm_batch_tps", "batched / sequential",
               "batched / mlx_lm", "identical to single", "token agreement", "peak_mb", "mlx_lm_peak_mb"]
    md = write_results("batch", flat, columns, "Many answers at once: urial-edge vs one at a time vs mlx-lm",
                       notes, extra={"server": server, "ratios": bench_batch.summary(rows, server)})
    plot(rows, server)
    print(md.read_text())


def plot(rows, server):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    n = [r["queries"] for r in rows]
    for key, label in (("batched_tps", "urial-edge batched"), ("sequential_tps", "one at a time"),
                       ("mlx_lm_batch_tps", "mlx_lm.batch_generate")):
        a.plot(n, [r[key] for r in rows], marker="o", label=label)
    a.set_xscale("log", base=2)
    a.set_xlabel("queries from the same prefix")
    a.set_ylabel("aggregate tokens/s")
    a.legend()
    c = [r["clients"] for r in server["concurrency"]]
    b.bar([str(x) for x in c], [r["tps"] for r in server["concurrency"]], color="#4c72b0")
    b.set_xlabel("concurrent streaming clients")
    b.set_ylabel("server aggregate tokens/s")
    fig.tight_layout()
    fig.savefig(RESULTS / "batch.png", dpi=120)


if __name__ == "__main__":
    main()
