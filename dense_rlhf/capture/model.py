"""What the captures read from a reward model: its configs, its self-attention modules, the position its
sequence-classification head pools, the score of its logits, and whether its positions are prefixes; and how a
capture hands over what it recorded."""

from __future__ import annotations

import torch


def _configs_of(model) -> list:
    from transformers import PreTrainedConfig

    found, seen = [], set()
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        config = stack.pop()
        if not isinstance(config, PreTrainedConfig) or id(config) in seen:
            continue
        seen.add(id(config))
        found.append(config)
        stack.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return found


def _is_self_attention(module) -> bool:
    name = type(module).__name__.lower()
    return "attention" in name and "cross" not in name and not getattr(module, "is_cross_attention", False)


def _last_non_pad(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The rightmost token that is not pad_token_id (left or right padding), as the *ForSequenceClassification
    heads of transformers pool it. long [B]."""
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1).long()


def _score_of(logits: torch.Tensor, what: str) -> torch.Tensor:
    """The score of [..., 1] or [..., 2] logits in float32: the logit, or logit[1] - logit[0]."""
    if logits.shape[-1] not in (1, 2):
        raise ValueError(
            f"{what} must have 1 or 2 logits per position (a one-logit score or a two-class head), "
            f"got {tuple(logits.shape)}"
        )
    logits = logits.float()
    return logits[..., 0] if logits.shape[-1] == 1 else logits[..., 1] - logits[..., 0]


def _pooled_scores(logits: torch.Tensor, caller: str) -> torch.Tensor:
    """float32 [B] scores from a reward model's pooled [B, 1] or [B, 2] logits (see :func:`_score_of`)."""
    if logits.dim() != 2 or logits.shape[-1] not in (1, 2):
        raise ValueError(f"{caller} needs [B, 1] or [B, 2] logits from the reward model, got {tuple(logits.shape)}")
    return _score_of(logits, "the reward model's logits")


def _bidirectional_reason(model) -> str | None:
    """Why the model's positions are not prefixes (an encoder-decoder or non-causal self-attention), or None."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "it is an encoder-decoder"
    for module in model.modules():
        if _is_self_attention(module) and getattr(module, "is_causal", None) is False:
            return f"its self-attention {type(module).__name__} is bidirectional (is_causal=False)"
    return None


def _logits_of(output) -> torch.Tensor:
    """The logits of a model's output: ``output.logits``, or the first element of a tuple output."""
    return output.logits if hasattr(output, "logits") else output[0]


def _recorded(value, error: str | None, caller: str):
    """What a capture recorded in its last forward: ``error`` raised if that forward's recording failed, a
    RuntimeError if no forward ran inside the capture."""
    if error is not None:
        raise RuntimeError(error)
    if value is None:
        raise RuntimeError(f"{caller}: no forward of the model ran inside the capture")
    return value
