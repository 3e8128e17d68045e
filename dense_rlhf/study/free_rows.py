"""``dense-rlhf experiment --study rows``: label-free alternatives to ABC's attention row that the reward model's
ordinary forward already holds, screened with the credit diagnostics (``diagnostics.credit_diagnostics``).

ABC's row is the last layer's attention from the scoring token ([EOS]), averaged over heads. The candidates
(``CANDIDATES``), each a nonnegative weight per completion token read from the same forward:

- ``abc``: ABC's row (the reference).
- ``layer-mean``: the head-mean rows from the scoring token, averaged over all layers (for a 1-layer reward model
  this is ABC's row).
- ``value-norm``: per head, attention times the norm of the token's value vector, then the head mean (Kobayashi
  et al., EMNLP 2020, "Attention is not only a weight": a token with a small value vector moves the output little
  however much attention it gets).
- ``output-norm``: the same with the value vector mapped through the head's slice of the output projection, the
  paper's f(x): the norm of what the head actually adds to the scoring token's output.
- ``summed-output-norm``: the norm of the sum over heads of those vectors, ``|sum_h alpha_h f_h(x_t)|``: the
  token's whole contribution to the attention output (the paper's multi-head measure; heads may cancel).
- ``direct-score``: that summed contribution carried linearly to the score, through the final layer norm's
  centring and scaling (its statistics taken from the forward, as in direct logit attribution, Elhage et al. 2021,
  "A Mathematical Framework for Transformer Circuits") and the score head: a signed share of the score per token
  (weight: its size; sign agreement: its sign). It ignores the MLP after the attention.
- ``head-confidence``: the heads' rows averaged with weights proportional to each head's largest weight on the
  completion (Voita et al., ACL 2019: confident heads are the important ones).

Left out, and why: attention rollout (Abnar & Zuidema, 2020) and its norm-based variants (GlobEnc, ALTI) multiply
the layers' full [L, L] maps (even the scoring token's row needs a vector-matrix product with every earlier layer's
map), so they are not free of the maps the capture avoids; for a 1-layer reward model rollout reduces to ABC's row
plus the residual's identity, which puts nothing on the completion tokens. Gradient-based attributions need a
backward pass; value zeroing and leave-one-out need further forwards.

The screen reads everything from one eager forward with ``output_attentions`` (it measures the rows' quality, not
their cost): the attention maps, the value vectors (a hook on each layer's ``c_attn``) and the final layer norm's
input. Every candidate above needs only the scoring token's rows, the value vectors of the layer(s) read, the output
projection and the final norm's statistics at one position, all present in the ordinary forward.
Writes ``<name>.json`` and ``<name>.md`` under ``--out`` for the 1-layer reward model of the setup and a 2-layer
one (``RM_LAYERS``), on the diagnostics' held-out SFT samples and grammar texts.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

from dense_rlhf.rl.common import Policy, generate
from dense_rlhf.study import methods as M
from dense_rlhf.study import sentiment_task as task
from dense_rlhf.study.config import ExperimentOptions
from dense_rlhf.study.diagnostics import credit_diagnostics
from dense_rlhf.study.models import SetupConfig, load_or_train

CANDIDATES = (
    "abc",
    "layer-mean",
    "value-norm",
    "output-norm",
    "summed-output-norm",
    "direct-score",
    "head-confidence",
)
LABELS = {
    "abc": "ABC: last layer, head mean",
    "layer-mean": "head mean, mean over layers",
    "value-norm": "attention x |value|, per head, head mean",
    "output-norm": "attention x |value W_O^h|, per head, head mean",
    "summed-output-norm": "|sum over heads of attention x value W_O^h|",
    "direct-score": "that sum through the final norm and the score head (signed)",
    "head-confidence": "heads weighted by their largest weight",
}
RM_LAYERS = (1, 2)


@torch.no_grad()
def candidate_rows(rm, ids: torch.Tensor, reward_index: int = -1) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The score [B] and every candidate's weights [B, L] over all positions, from the scoring token at
    ``reward_index`` (a GPT-2 sequence classifier; see the module docstring). ``direct-score`` is signed."""
    blocks = rm.transformer.h
    values: dict[int, torch.Tensor] = {}
    final_in: list[torch.Tensor] = []
    hooks = [
        b.attn.c_attn.register_forward_hook(
            lambda mod, inp, out, i=i: values.__setitem__(i, out.split(mod.nf // 3, dim=2)[2])
        )
        for i, b in enumerate(blocks)
    ]
    hooks.append(rm.transformer.ln_f.register_forward_pre_hook(lambda mod, inp: final_in.append(inp[0])))
    previous = rm.config._attn_implementation
    rm.set_attn_implementation("eager")
    try:
        out = rm(input_ids=ids, output_attentions=True)
    finally:
        rm.set_attn_implementation(previous)
        for h in hooks:
            h.remove()
    score = out.logits[:, 0].float()
    rows = [a[:, :, reward_index, :].float() for a in out.attentions]  # per layer [B, H, L]
    last = rows[-1]
    B, H, L = last.shape
    attn = blocks[-1].attn
    d = attn.head_dim
    v = values[len(blocks) - 1].float().view(B, L, H, d).transpose(1, 2)  # [B, H, L, d]
    w_o = attn.c_proj.weight.float().view(H, d, -1)  # Conv1D: out = x @ weight; rows of head h: [h d, (h + 1) d)
    f = torch.einsum("bhld,hde->bhle", v, w_o)  # each head's output vector per token [B, H, L, E]
    summed = (last[..., None] * f).sum(1)  # [B, L, E]
    ln = rm.transformer.ln_f
    x = final_in[0][:, reward_index, :].float()  # the final norm's input at the scoring token [B, E]
    sigma = (x.var(-1, unbiased=False) + ln.eps).sqrt()
    centred = summed - summed.mean(-1, keepdim=True)
    head = rm.score.weight.float()[0]  # [E]
    direct = (centred * (ln.weight.float() * head)).sum(-1) / sigma[:, None]
    conf = last.amax(-1, keepdim=True)
    return score, {
        "abc": last.mean(1),
        "layer-mean": torch.stack([r.mean(1) for r in rows]).mean(0),
        "value-norm": (last * v.norm(dim=-1)).mean(1),
        "output-norm": (last * f.norm(dim=-1)).mean(1),
        "summed-output-norm": summed.norm(dim=-1),
        "direct-score": direct,
        "head-confidence": (last * conf).sum(1) / conf.sum(1),
    }


def screen(rm, codec: task.Codec, seq: torch.Tensor, completion_len: int) -> dict:
    """Every candidate's credit diagnostics on the completions of ``seq`` [B, P + N] (shares: the score times the
    normalised weights, or for ``direct-score`` its signed shares scaled to sum to the score's size)."""
    p = task.PROMPT_LEN
    ids, _ = M.rm_inputs(codec, seq)
    score, cands = candidate_rows(rm, ids)
    credit = task.credits_of(codec, seq)
    out = {}
    for name, full in cands.items():
        part = full[:, p : p + completion_len]
        alpha = part.abs()
        alpha = alpha / alpha.sum(1, keepdim=True).clamp(min=1e-30)
        shares = part * (score.abs() / part.abs().sum(1).clamp(min=1e-30))[:, None] if name == "direct-score" else None
        out[name] = credit_diagnostics(alpha, credit, shares=score[:, None] * alpha if shares is None else shares)
    direct = cands["direct-score"][:, p : p + completion_len].sum(1)
    out["direct_score_vs_score"] = torch.corrcoef(torch.stack([direct, score]))[0, 1].item()
    return out


def texts(setup: SetupConfig, cache, n: int = 512, seed: int = 123) -> tuple[task.Codec, object, dict]:
    """The reward model and the diagnostics' texts of ``credit_report``: SFT-policy samples and grammar texts."""
    codec, sft, rm, info = load_or_train(setup, cache, log=None)
    gen = torch.Generator().manual_seed(seed)
    seq = generate(Policy(sft, codec.special_ids), task.prompt_sampler(codec, seed)(n), setup.completion_len, gen)
    rng = random.Random(seed)
    grammar = codec.encode(
        [
            task.sample_words(rng, task.Style.random_for_preferences(rng), task.PROMPT_WORDS + setup.completion_len)
            for _ in range(n)
        ]
    )
    return codec, rm, {"sft_samples": seq, "grammar_texts": grammar, "info": info}


def markdown(result: dict, meta: dict) -> str:
    lines = [
        f"# {meta['title']}",
        "",
        f"Command: `{meta['command']}`; wall time {meta['wall_seconds'] / 60:.1f} min. Everything is in "
        f"`{meta['name']}.json`; the candidates are defined in `dense_rlhf/study/free_rows.py`.",
        "",
        "Credit diagnostics against the leave-one-out true credit (`diagnostics.credit_diagnostics`): Spearman's rho "
        "between the weights and |credit|, top-k overlap with k = the number of credited tokens, the weights' mass on "
        "credited tokens, sign agreement (every candidate but `direct-score` gives each token the score's sign); "
        "512 SFT-policy samples and 512 grammar texts, as in the other studies.",
    ]
    for layers, per in result.items():
        lines += [
            "",
            f"## {layers}-layer reward model",
            "",
            "| texts | candidate | Spearman rho | top-k overlap | mass on credited | sign agreement | random top-k |",
            "|---|---|---|---|---|---|---|",
        ]
        for t in ("sft_samples", "grammar_texts"):
            for c in CANDIDATES:
                d = per[t][c]
                lines.append(
                    f"| {t} | {LABELS[c]} | {d['spearman']:.3f} | {d['topk_overlap']:.3f} | "
                    f"{d['mass_on_credited']:.3f} | {d['sign_agreement']:.3f} | {d['random_topk_overlap']:.3f} |"
                )
        lines += [
            "",
            "Correlation of the direct-score shares' sum with the reward model's score: "
            + ", ".join(f"{t} {per[t]['direct_score_vs_score']:.3f}" for t in ("sft_samples", "grammar_texts"))
            + ".",
        ]
    return "\n".join(lines) + "\n"


def main(args: ExperimentOptions, argv: list[str], setup: SetupConfig) -> int:
    """Screen the candidates for the 1-layer and 2-layer reward models of ``setup``."""
    t0 = time.time()
    cache = str(args.cache_dir) if args.cache_dir else None
    result = {}
    for layers in RM_LAYERS:
        print(f"{layers}-layer reward model", flush=True)
        codec, rm, data = texts(replace(setup, rm_n_layer=layers), cache)
        result[str(layers)] = {
            t: screen(rm, codec, data[t], setup.completion_len) for t in ("sft_samples", "grammar_texts")
        }
        result[str(layers)]["reward_model"] = data["info"]["reward_model"]
    meta = {
        "title": "Label-free rows from the reward model's forward, screened with the credit diagnostics",
        "command": "dense-rlhf experiment " + " ".join(argv),
        "name": args.name,
        "wall_seconds": time.time() - t0,
        "setup": asdict(setup),
        "candidates": LABELS,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps({"meta": meta, "results": result}, indent=1))
    text = markdown(result, meta)
    (out / f"{args.name}.md").write_text(text)
    print(text)
    return 0
