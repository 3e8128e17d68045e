"""Label-free alternatives to ABC's attention row that the reward model's ordinary forward already holds
(``candidate_rows``), for ``dense-rlhf experiment --study rows`` (``free_rows``) and PPO (``methods``' ``norm-*``).

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

``candidate_rows`` reads everything from one eager forward with ``output_attentions`` (the study measures the rows'
quality, not their cost): the attention maps, the value vectors (a hook on each layer's ``c_attn``) and the final
layer norm's input. Every candidate above needs only the scoring token's rows, the value vectors of the layer(s)
read, the output projection and the final norm's statistics at one position, all present in the ordinary forward.
"""

from __future__ import annotations

import torch

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
    "value-norm": "attention x norm of the value, per head, head mean",
    "output-norm": "attention x norm of value W_O^h, per head, head mean",
    "summed-output-norm": "norm of the sum over heads of attention x value W_O^h",
    "direct-score": "that sum through the final norm and the score head (signed)",
    "head-confidence": "heads weighted by their largest weight",
}


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
