"""Credit diagnostics: how well a method's per-token weights alpha match the task's true per-token credit.

For each completion with at least one credited token (nonzero leave-one-out credit), with c_t = |credit_t|:

- rank correlation: Spearman's rho between alpha_t and c_t over the N response tokens (average ranks for
  ties; completions where either side is constant are skipped, so uniform alpha has none: reported as 0).
- top-k overlap: with k = the number of credited tokens, the fraction of alpha's k largest tokens that are
  credited tokens. A random order scores k / N on average; uniform alpha is scored with random tie-breaking.
- mass on credited tokens: sum of alpha over credited tokens (uniform: k / N).
- sign agreement (when the method's signed per-token shares are given): the fraction of credited tokens
  whose share has the sign of their true credit. ABC and uniform give every token the score's sign; prefix
  differences can give a token a sign of its own (alpha is then |share|).
"""

from __future__ import annotations

import torch


def _average_ranks(x: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1 along the last dim, ties given their average rank. [B, N] float."""
    order = x.argsort(dim=-1, stable=True)
    ranks = torch.empty_like(x, dtype=torch.float64)
    ranks.scatter_(-1, order, torch.arange(x.shape[-1], dtype=torch.float64).expand_as(x).contiguous())
    out = ranks.clone()
    for b in range(x.shape[0]):  # average tied ranks (N is small)
        vals = x[b]
        for v in vals.unique():
            sel = vals == v
            if int(sel.sum()) > 1:
                out[b, sel] = ranks[b, sel].mean()
    return out


def credit_diagnostics(alpha: torch.Tensor, credit: torch.Tensor, seed: int = 0,
                       shares: torch.Tensor | None = None) -> dict:
    """alpha [B, N] nonnegative weights (rows may be unnormalised), credit [B, N] signed true credit, shares
    [B, N] optional signed per-token rewards of the method (adds ``sign_agreement``)."""
    alpha = alpha.double()
    c = credit.abs().double()
    credited = c > 1e-9
    k = credited.sum(1)
    keep = k > 0
    sign = None
    if shares is not None:
        agree = (torch.sign(shares.double()) == torch.sign(credit.double())) & credited
        sign = (agree[keep].sum() / credited[keep].sum().clamp(min=1)).item()
    alpha, c, credited, k = alpha[keep], c[keep], credited[keep], k[keep]
    if alpha.shape[0] == 0:
        return {"spearman": float("nan"), "topk_overlap": float("nan"), "mass_on_credited": float("nan"),
                "random_topk_overlap": float("nan"), "n": 0, **({} if sign is None else {"sign_agreement": sign})}
    gen = torch.Generator().manual_seed(seed)
    jitter = torch.rand(alpha.shape, generator=gen, dtype=torch.float64) * 1e-12  # random tie-breaking
    ra, rc = _average_ranks(alpha), _average_ranks(c)
    ra, rc = ra - ra.mean(1, keepdim=True), rc - rc.mean(1, keepdim=True)
    denom = (ra.norm(dim=1) * rc.norm(dim=1))
    varying = denom > 0
    rho = (ra * rc).sum(1)[varying] / denom[varying]
    spearman = rho.mean().item() if varying.any() else 0.0
    order = (alpha + jitter * alpha.abs().max().clamp(min=1.0)).argsort(dim=1, descending=True)
    overlaps = []
    for b in range(alpha.shape[0]):
        top = order[b, : int(k[b])]
        overlaps.append(credited[b, top].double().mean().item())
    norm_alpha = alpha / alpha.sum(1, keepdim=True).clamp(min=1e-30)
    return {
        "spearman": spearman,
        "topk_overlap": sum(overlaps) / len(overlaps),
        "mass_on_credited": (norm_alpha * credited).sum(1).mean().item(),
        "random_topk_overlap": (k.double() / alpha.shape[1]).mean().item(),
        "n": int(alpha.shape[0]),
        **({} if sign is None else {"sign_agreement": sign}),
    }
