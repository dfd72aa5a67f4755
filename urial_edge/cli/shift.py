"""``urial-edge shift``: the token-distribution-shift analysis of the URIAL paper, on a base model and answers."""

from pathlib import Path

import click

from ..runtime.prompt import DEFAULT_PROMPT


@click.command("shift")
@click.argument("answers", required=False, type=click.Path(path_type=Path))
@click.option("--output", "-o", "out", required=True, type=click.Path(path_type=Path),
              help="Directory for scores.jsonl (resumable) and the report (report.json, .md, charts, tokens.html).")
@click.option("--model", "-m", default=None, metavar="MODEL",
              help="The base model (registry name, MLX directory, .gguf file or HF repo id; default: the bundled one).")
@click.option("--prompt", "-p", "prompts", multiple=True, metavar="none|NAME|PATH",
              help=f"A condition: 'none' (the bare query in the frame) or a URIAL prompt (repeatable; default: "
              f"none and {DEFAULT_PROMPT}).")
@click.option("--aligned-model", default=None, metavar="MODEL",
              help="An instruction-tuned model whose own answers (greedy, through its chat template) are scored; "
              "ANSWERS then needs only ids and queries.")
@click.option("--aligned-max-tokens", type=click.IntRange(1, 4096), default=512, show_default=True,
              help="Most tokens of each aligned answer.")
@click.option("--batch-size", type=click.IntRange(1, 256), default=8, show_default=True,
              help="Answers scored (and generated) together.")
def shift(answers, out, model, prompts, aligned_model, aligned_max_tokens, batch_size):
    """Rank every token of ANSWERS ({"id", "query", "answer"} JSONL; default: our reference answers) in the base
    model's next-token distribution, under each condition: unshifted (rank 1), marginal (2-3), shifted (>3).
    """
    from ..eval import shift as analysis  # imports MLX: only when analysing
    from ..eval.shift_report import pct

    report = analysis.analyse(answers, out, model, prompts, aligned_model, aligned_max_tokens, batch_size)
    for c in report["conditions"]:
        kl = f", mean KL {c['mean_kl']:.3f}" if c["mean_kl"] is not None else ""
        click.echo(f"{c['condition']}: unshifted {pct(c['unshifted'])}, marginal {pct(c['marginal'])}, shifted "
                   f"{pct(c['shifted'])} of {c['tokens']} tokens; mean log-prob {c['mean_logprob']:.3f}{kl}")
    click.echo(f"report in {out / 'report.md'}", err=True)
