"""Showing per-token credit: completions coloured by ABC's dense reward, in the terminal (rich) and HTML."""

from __future__ import annotations

import html

import torch


def _shade(weight: float) -> tuple[int, int, int]:
    """White -> blue as the attention weight grows (weights are relative to the row's maximum). Blue, so that no
    shade can be read as the green and red of the true credit's sign, also where a terminal has only 16 colours
    (there the shades become white, grey and bright blue)."""
    w = max(0.0, min(1.0, weight))
    return int(255 - 175 * w), int(255 - 135 * w), 255


def rich_lines(examples: list[dict]):
    """rich Text objects, two per example: the ABC reward shading and the hidden true credit."""
    from rich.text import Text

    out = []
    for ex in examples:
        top = max(ex["alpha"]) or 1.0
        line = Text()
        line.append(" ".join(ex["prompt"]) + " ", style="dim")
        for word, a in zip(ex["completion"], ex["alpha"]):
            r, g, b = _shade(a / top)
            line.append(word, style=f"black on rgb({r},{g},{b})")
            line.append(" ")
        line.append(f"  RM {ex['rm_score']:+.2f}  true {ex['true_score']:+.2f}", style="bold")
        truth = Text(" " * (len(" ".join(ex["prompt"])) + 1))
        for word, c in zip(ex["completion"], ex["credit"]):
            style = "bold green" if c > 0 else "bold red" if c < 0 else "dim"
            truth.append(word if c else "·" * len(word), style=style)
            truth.append(" ")
        out.append((line, truth))
    return out


def html_page(examples: list[dict], title: str) -> str:
    rows = []
    for ex in examples:
        top = max(ex["alpha"]) or 1.0
        cells = []
        for word, a, r_t, c in zip(ex["completion"], ex["alpha"], ex["reward"], ex["credit"]):
            r, g, b = _shade(a / top)
            border = "#1a7f37" if c > 0 else "#cf222e" if c < 0 else "transparent"
            cells.append(
                f'<span class="tok" style="background:rgb({r},{g},{b});border-bottom:3px solid {border}" '
                f'title="ABC reward {r_t:+.3f}, alpha {a:.3f}, true credit {c:+.2f}">{html.escape(word)}</span>'
            )
        rows.append(
            f'<div class="ex"><span class="prompt">{html.escape(" ".join(ex["prompt"]))}</span> {" ".join(cells)}'
            f'<span class="score">RM {ex["rm_score"]:+.2f} · true {ex["true_score"]:+.2f}</span></div>'
        )
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;max-width:60em;margin:2em auto}} .ex{{margin:0.8em 0;line-height:2}}
.tok{{padding:2px 3px;border-radius:3px}} .prompt{{color:#777}} .score{{margin-left:1em;font-weight:bold}}</style>
</head><body><h2>{html.escape(title)}</h2>
<p>Blue shading: ABC's share of the reward-model score on each completion token (the reward model's last-layer
attention from its [EOS] token; the darkest token has the largest share). Underline: the hidden true credit of the
token (green positive, red negative). Hover a token for its numbers.</p>
{"".join(rows)}</body></html>
"""


def examples_from(
    codec,
    seq: torch.Tensor,
    score: torch.Tensor,
    rows: torch.Tensor,
    rewards: torch.Tensor,
    prompt_len: int,
    true_scores,
    credits,
) -> list[dict]:
    """Package completions for display: rows are the RM's [B, H, L] attention rows."""
    words = codec.decode(seq[:, 1:])
    n_new = seq.shape[1] - prompt_len
    alpha = rows.mean(1)[:, prompt_len : prompt_len + n_new]
    alpha = alpha / alpha.sum(1, keepdim=True)
    out = []
    for b in range(seq.shape[0]):
        out.append(
            {
                "prompt": words[b][: prompt_len - 1],
                "completion": words[b][prompt_len - 1 :],
                "alpha": alpha[b].tolist(),
                "reward": rewards[b].tolist(),
                "credit": credits[b].tolist(),
                "rm_score": float(score[b]),
                "true_score": float(true_scores[b]),
            }
        )
    return out
