"""``dense-rlhf demo``: train a small RLHF setup on the sentiment task and compare sparse rewards with ABC.

1. Trains (or reuses from the local cache) a tiny GPT-2 SFT policy and a reward model (trl RewardTrainer).
2. Shows a few completions with ABC's per-token credit, coloured in the terminal and in ``credit.html``.
3. Runs PPO with the sparse reward and with ABC (beta 0.8) over a few seeds, with progress bars.
4. Writes ``demo.png`` (learning curves), ``demo.md`` (table) and ``demo.json`` (curves) to ``--out``
   (default ``./dense-rlhf-results/demo/``), beside ``credit.html`` and ``demo.log``: the libraries' messages
   (trl's training logs, transformers' notices, Python warnings), kept off the console.

``--quick`` (about a minute on 2 cores) trains smaller models for fewer steps: a smoke test, not a result.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from dense_rlhf.cli import default_out
from dense_rlhf.rl.common import Policy, generate
from dense_rlhf.study import methods as M
from dense_rlhf.study import options, report
from dense_rlhf.study import sentiment_task as task
from dense_rlhf.study.config import PPO, SETUP
from dense_rlhf.study.credit_view import examples_from, html_page, rich_lines
from dense_rlhf.study.library_log import library_output_to
from dense_rlhf.study.models import QUICK_SETUP, cache_root, load_or_train
from dense_rlhf.study.runs import Run, run_one
from dense_rlhf.study.stats import summarise


@dataclass
class DemoOptions:
    """``dense-rlhf demo``'s options."""

    quick: bool = False
    """tiny, fast version (smoke test)"""
    seeds: int | None = None
    """seeds per method (default 3, --quick 1)"""
    steps: int | None = None
    """PPO steps per run (default 60, --quick 12)"""
    lam: float = 0.8
    """GAE lambda (at 0.95 ABC's lead is small, see experiments/README.md)"""
    examples: int = 4
    """completions to show"""
    seed: int = 0
    """master seed: the SFT/RM training, the shown completions and the PPO seeds"""
    out: str = default_out("demo")
    """output folder"""
    cache_dir: str | None = None
    """model cache (default $DENSE_RLHF_CACHE or ~/.cache/dense-rlhf)"""
    threads: int = 1
    """torch threads (the models are tiny)"""


def parse_args(argv: list[str]) -> DemoOptions:
    p = argparse.ArgumentParser(prog="dense-rlhf demo", description=__doc__.splitlines()[0])
    options.add_fields(p, DemoOptions)
    return options.parse(p, DemoOptions, argv)[0]


def main(argv: list[str]) -> int:
    from rich.console import Console

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    console = Console()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log_path = out / "demo.log"
    log_path.write_text("")
    with library_output_to(log_path):
        _run(args, argv, console, out)
    if log_path.stat().st_size:
        console.print(f"the libraries' messages (trl's training logs, warnings): {log_path}")
    return 0


def _run(args: DemoOptions, argv: list[str], console, out: Path) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    from rich.table import Table

    t0 = time.time()
    setup = replace(SETUP, seed=args.seed, **(QUICK_SETUP if args.quick else {}))
    steps = args.steps or (12 if args.quick else 60)
    n_seeds = args.seeds or (1 if args.quick else 3)
    ppo = replace(PPO, steps=steps, lam=args.lam)
    cache = cache_root(args.cache_dir)

    console.rule("[bold]1. SFT policy and reward model")
    codec, sft, rm, info = load_or_train(setup, cache, log=console.print)
    rmm = info["reward_model"]
    if info["cached"]:  # when trained, the training log has just printed these
        console.print(
            f"reward model held-out: accuracy vs drawn labels {rmm['label_accuracy']:.3f}, vs hidden-score "
            f"order {rmm['true_order_accuracy']:.3f}, corr(RM score, hidden score) "
            f"{rmm['score_correlation']:.3f}"
        )

    console.rule("[bold]2. Per-token credit (ABC, beta 0.8) on SFT completions")
    gen = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        seq = generate(
            Policy(sft, codec.special_ids),
            task.prompt_sampler(codec, args.seed)(args.examples),
            setup.completion_len,
            gen,
        )
        ids, mask = M.rm_inputs(codec, seq)
        score, rows = M.score_with_attention(rm, ids)
        rewards = M.token_rewards("abc-0.8", score, rows, mask, None, task.PROMPT_LEN, setup.completion_len)
    examples = examples_from(
        codec, seq, score, rows, rewards, task.PROMPT_LEN, task.scores_of(codec, seq), task.credits_of(codec, seq)
    )
    for line, truth in rich_lines(examples):
        console.print(line)
        console.print(truth)
    console.print(
        "[dim]top line: [black on rgb(80,120,255)]blue[/] shading = ABC's share of the "
        "RM score (darker: more); bottom line: hidden true credit ([green]positive[/green], "
        "[red]negative[/red], · none)[/dim]"
    )
    html_path = out / "credit.html"
    html_path.write_text(html_page(examples, "ABC per-token credit on SFT completions"))

    console.rule(f"[bold]3. PPO: sparse against ABC ({n_seeds} seed(s) x {steps} steps each, GAE lambda {args.lam:g})")
    results = []
    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[info]}"),
        TimeElapsedColumn(),
        console=console,
    ) as progress:
        for method in ("sparse", "abc-0.8"):
            for i in range(n_seeds):
                seed = args.seed * 1000 + i
                bar = progress.add_task(f"{M.LABELS[method]:>16s} seed {seed}", total=steps, info="")

                def on_step(step, stats, bar=bar):
                    progress.update(bar, advance=1, info=f"true score {stats['gt_score']:+.2f}  KL {stats['kl']:.1f}")

                results.append(run_one(Run(method, seed, setup, ppo, str(cache)), on_step=on_step))

    console.rule("[bold]4. Results")
    summary = summarise(results, final_window=min(10, max(1, steps // 4)))
    meta = {
        "title": f"demo: sparse vs ABC, {n_seeds} seed(s), {steps} PPO steps, GAE lambda {args.lam:g}"
        + (" (--quick)" if args.quick else ""),
        "command": "dense-rlhf demo " + " ".join(argv),
        "reward_model": rmm,
        "config": report.config_dict(setup, ppo),
    }
    paths = report.write_outputs(out, "demo", results, summary, None, meta)
    table = Table(title="hidden true score of the PPO policies")
    for col in ("method", "steps to threshold", "final mean ± std", "late spread", "final KL"):
        table.add_column(col)
    for method, s in summary["methods"].items():
        table.add_row(
            M.LABELS[method],
            str(s["steps_to_threshold"] if s["steps_to_threshold"] is not None else "never"),
            f"{s['final_mean']:.2f} ± {s['final_std']:.2f}",
            f"{s['late_spread']:.2f}",
            f"{s['final_kl']:.1f}",
        )
    console.print(table)
    console.print(
        f"threshold: a true score of {summary['threshold']:.2f}, 80% of the way from the SFT policy's "
        f"{summary['sft_score']:.2f} to the best method's final score; steps to threshold: the first PPO "
        "step at which the seed-mean score (5-step moving average) reaches it"
    )
    console.print(
        "late spread: the standard deviation of the true score across seeds over the last quarter of the "
        "steps; lower is steadier" + (" (0 with one seed)" if n_seeds == 1 else "")
    )
    files = ", ".join(Path(p).name for p in (html_path, paths["plot"], paths["table"], paths["json"]))
    console.print(f"wrote {files} into {out}/; done in {time.time() - t0:.0f}s")
