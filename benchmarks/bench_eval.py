"""The prompt and decoding comparison behind README's "Measuring answer quality".

    python benchmarks/bench_eval.py [--runs DIR] [--max-tokens 192]

The bundled model answers our own question set (benchmarks/eval/questions.jsonl)
under every shipped prompt with the default decoding, and under urial-k3 (the
old default) and urial-k4-direct with the URIAL authors' two presets as well:
the same configs as these commands, in one table:

    urial-edge eval -o DIR --max-tokens 192 --seed 0 -p urial-k3 -p urial-k4-direct \\
        --preset default --preset urial-greedy --preset urial-t0.5 --batch-size 16
    urial-edge eval -o DIR --max-tokens 192 --seed 0 -p urial-k0 -p urial-k1 -p urial-k8 --batch-size 16

Answers go to DIR/answers.jsonl (resumable; too big for git), the judge-free
metrics to results/eval.{json,md,png}.
"""

from urial_edge.model.backend import prepare

prepare()  # first: the optimised BLAS and light mlx_lm imports, before MLX loads
import argparse
from pathlib import Path

from common import RESULTS, machine

from urial_edge.eval import questions as question_sets, report, run
from urial_edge.runtime.options import with_changes

CONFIGS = [(p, s) for p in ("urial-k3", "urial-k4-direct") for s in ("default", "urial-greedy", "urial-t0.5")]
CONFIGS += [(p, "default") for p in ("urial-k0", "urial-k1", "urial-k8")]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=Path, default=Path("eval-runs"), help="Where answers.jsonl goes.")
    parser.add_argument("--max-tokens", type=int, default=192)
    args = parser.parse_args()
    questions_file = question_sets.default_questions()
    questions = question_sets.load_questions(questions_file)
    configs = [run.Config(None, p, s, with_changes(s, {"max_tokens": args.max_tokens, "seed": 0}))
               for p, s in CONFIGS]
    records = run.run(questions, configs, args.runs, batch_size=16)
    rows = report.config_rows(questions, configs, records)
    m = machine()
    notes = (f"The bundled model (Gemma 3 270M base, float32), our own question set, `--max-tokens "
             f"{args.max_tokens} --seed 0`, 16 answers decoded together; written by benchmarks/bench_eval.py on "
             f"{m['date']} ({m['platform']}, {m['cpus']} CPUs, BLAS {m['blas']}). Rates are shares of the answers "
             "they apply to; see README, \"Measuring answer quality\", for each metric. The machine was shared "
             "with other jobs while this ran: read ttft and tok/s as rough figures only.")
    report.write_report(rows, RESULTS, questions_file, name="eval", notes=notes)
    for row in rows:
        print(report.summary(row))


if __name__ == "__main__":
    main()
