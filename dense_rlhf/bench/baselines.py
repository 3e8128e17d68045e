"""The methods a case times, all on identical inputs and all with ``validate=False``: the native op, the
eager PyTorch reference, the reference under ``torch.compile``, and the official ABC code path (a per-sample
NumPy loop); and how their agreement with the reference is measured."""

from __future__ import annotations

from collections.abc import Callable

import torch

from dense_rlhf.bench.cases import Case, Inputs
from dense_rlhf.ops import dense_rewards

BETA = 0.8
METHODS = ("native", "reference", "compiled", "official")
ALTERNATIVES = METHODS[1:]


# Largest |method - reference| / max(1, |score|) accepted per method and dtype. The official loop averages
# heads in the input dtype, so in bf16 its head mean is rounded to 8 bits before the normalisation.
TOLERANCE = {("official", "bf16"): 2e-2}
DEFAULT_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-4}


def native_method(inputs: Inputs) -> torch.Tensor:
    return dense_rewards(inputs.attn, inputs.score, inputs.mask, beta=BETA, backend="native", validate=False)


def _reference_call(attn: torch.Tensor, score: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return dense_rewards(attn, score, mask, beta=BETA, backend="reference", validate=False)


def reference_method(inputs: Inputs) -> torch.Tensor:
    return _reference_call(inputs.attn, inputs.score, inputs.mask)


class CompiledReference:
    """``torch.compile`` of the reference call.

    mode "auto" / "true": one compiled function per (layout, dtype) with dynamic=None (PyTorch's default:
    static first, dynamic after a shape change) / dynamic=True. "false": one static compile per case.
    "static-targets": the target cases compiled statically each (compile's best case), the rest of the grid
    sharing one dynamic=True function per (layout, dtype) (fewer compiles where time is short).
    """

    def __init__(self, mode: str):
        self.mode = mode
        self._compiled: dict[tuple, Callable] = {}
        torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)

    def for_case(self, case: Case) -> Callable[[Inputs], torch.Tensor]:
        static = self.mode == "false" or (self.mode == "static-targets" and case.target)
        dynamic = False if static else {"auto": None}.get(self.mode, True)
        key = (case.layout, case.dtype) + ((case,) if static else ())
        if key not in self._compiled:
            self._compiled[key] = torch.compile(_reference_call, dynamic=dynamic)
        compiled = self._compiled[key]
        return lambda inputs: compiled(inputs.attn, inputs.score, inputs.mask)


def official_method(inputs: Inputs) -> torch.Tensor:
    """The public ABC code path: head mean of the full maps, then a per-sample loop through NumPy."""
    attention = inputs.attn.mean(1)  # attentions[-1].mean(1): [B, L, L] maps (the rows layout: [B, L])
    scores = inputs.score.cpu().numpy()
    batch, length = inputs.mask.shape
    rewards = []
    for i, (first, count) in enumerate(inputs.spans):
        this = attention[i].float().cpu().numpy()  # the whole map of sample i to NumPy
        if this.ndim == 2:
            row = this[first : first + count, first : first + count][-1]  # completion block, last row
        else:  # adapted to [B, H, L] rows: the row at the reward position is all there is
            row = this[first : first + count]
        alpha = row / row.sum()
        reward = BETA * scores[i] * alpha
        reward[-1] += (1.0 - BETA) * scores[i]
        rewards.append(reward)
    out = torch.zeros(batch, length, dtype=torch.float32)  # the op's [B, L] layout, for comparison
    for i, (first, count) in enumerate(inputs.spans):
        out[i, first : first + count] = torch.from_numpy(rewards[i])
    return out.to(inputs.attn.device)


def agreement(out: torch.Tensor, expected: torch.Tensor, score: torch.Tensor) -> float:
    scale = score.abs().clamp(min=1.0)[:, None]
    return float(((out.float().cpu() - expected.cpu()) / scale.cpu()).abs().max())
