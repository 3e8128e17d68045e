"""The one-call scoring: a reward model's forward and the per-token rewards or credit it gives
(:func:`score_and_densify`, :func:`score_with_credit`)."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import torch

from dense_rlhf.capture.attention import capture_reward_attention
from dense_rlhf.capture.model import _bidirectional_reason, _last_non_pad, _logits_of, _pooled_scores
from dense_rlhf.capture.prefix import capture_prefix_scores
from dense_rlhf.ops import (
    _check_mask_values,
    _mask,
    check_beta,
    dense_rewards,
    prefix_rewards,
    sparse_rewards,
    uniform_rewards,
)

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["score_and_densify", "score_with_credit"]

METHODS = ("abc", "prefix", "sparse", "uniform")


def score_and_densify(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    completion_mask: torch.Tensor,
    *,
    method: str = "abc",
    beta: float = 0.8,
    layer: int = -1,
    reward_index: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a reward model once and return ``(scores [B] float32, rewards [B, L] float32)``.

    The score is the logit for a one-logit head, ``logit[1] - logit[0]`` for a two-logit head (in float32).
    ``completion_mask`` [B, L] marks completion tokens in the same positions as ``input_ids`` (prompt and
    padding False). Every method takes one forward, under ``torch.no_grad()``, and each row of the rewards
    sums to its score:

    - ``"abc"`` (default): :func:`dense_rlhf.dense_rewards` of the attention rows captured from ``layer``
      (:func:`capture_reward_attention`) at the reward position (``reward_index``, default the position the
      model pools), heads averaged, restricted to ``completion_mask`` and normalised, mixed by ``beta``.
    - ``"prefix"``: :func:`dense_rlhf.prefix_rewards` of the score at every position
      (:func:`capture_prefix_scores`; decoder ``*ForSequenceClassification`` models only), with the reward
      position where the model pools its score, mixed by ``beta``.
    - ``"sparse"``: the score on the last completion token; ``"uniform"``: score / n on each of the n.

    ``beta`` is checked for every method and used by "abc" and "prefix"; ``layer`` applies to "abc" only, and
    so does ``reward_index`` (any other method raises if it is given: the prefix method reads the score where
    the model pools it).

    Before the forward, these are refused (ValueError naming the argument, and the rows where it is at fault): a
    ``completion_mask`` that is not a [B, L] 0/1 mask of ``input_ids``' shape, that has a row with no completion
    token, or that puts the score where the reward model did not read (tokens on padding, ``attention_mask`` 0, and,
    for a causal reward model without an explicit ``reward_index``, a row whose completion tokens all come after the
    position the model pools: the sparse fallback would put the whole score on a pad); a ``reward_index`` that is
    not one value or B values in [-L, L); a model whose ``config.num_labels`` is not 1 or 2; a padded batch
    (``attention_mask`` with a 0) for a causal model without ``config.pad_token_id``, which cannot pool it.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    beta = check_beta(beta)
    if reward_index is not None and method != "abc":
        raise ValueError(f"reward_index applies to method='abc' (the attention row), not to method={method!r}")
    mask = _check_inputs(model, input_ids, attention_mask, completion_mask, reward_index, "score_and_densify")
    _refuse_unread(model, input_ids, attention_mask, mask, reward_index)
    if method == "abc":
        scores, rows = _score_with_rows(model, input_ids, attention_mask, layer, reward_index, "score_and_densify")
        return scores, dense_rewards(rows, scores, completion_mask, beta=beta, layout="rows")
    with torch.no_grad():
        capture = capture_prefix_scores(model) if method == "prefix" else contextlib.nullcontext()
        with capture:
            out = model(input_ids=input_ids, attention_mask=attention_mask)
        scores = _pooled_scores(_logits_of(out), "score_and_densify")
        if method == "prefix":
            rewards = prefix_rewards(
                capture.prefix_scores, completion_mask, beta=beta, reward_index=capture.reward_index
            )
        elif method == "sparse":
            rewards = sparse_rewards(scores, completion_mask)
        else:
            rewards = uniform_rewards(scores, completion_mask)
    return scores, rewards


def score_with_credit(
    model: PreTrainedModel,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    completion_mask: torch.Tensor,
    *,
    layer: int = -1,
    reward_index: int | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run a reward model once and return ``(scores [B] float32, credit [B, L] float32)``: its score and ABC's
    credit, the share of each completion token.

    ``credit`` is the ``alpha`` of :func:`dense_rlhf.dense_rewards`: the head-averaged attention row captured from
    ``layer`` at the reward position (:func:`capture_reward_attention`; ``reward_index`` as there), restricted to
    ``completion_mask`` and normalised, so each row sums to 1 (all on the last completion token where the row puts
    no attention on the completion); zero off the mask. The score is read as in :func:`score_and_densify`, whose
    ``method="abc"`` rewards equal ``dense_rewards(credit, scores, completion_mask, beta=beta)`` up to rounding. Use it
    where the score and the shares are used apart, e.g. per-token advantages that weight a group-normalised
    advantage by the credit (:class:`dense_rlhf.integrations.trl.ABCGRPOTrainer`).

    Arguments as in :func:`score_and_densify` (``attention_mask`` may be None for unpadded batches). Unlike it,
    this does not refuse completion tokens that the reward model did not read (on padding, or all after its reward
    position): such a row's credit falls on its last completion token, as ``dense_rewards`` defines, so that a
    trainer is not stopped by one degenerate completion. Runs under ``torch.no_grad()``.

    Raises:
        TypeError, ValueError: before the forward, what :func:`score_and_densify` refuses before it (except the
            completion tokens the reward model did not read); after it, NaN attention.
    """
    _check_inputs(model, input_ids, attention_mask, completion_mask, reward_index, "score_with_credit")
    scores, rows = _score_with_rows(model, input_ids, attention_mask, layer, reward_index, "score_with_credit")
    return scores, dense_rewards(rows, torch.ones_like(scores), completion_mask, beta=1.0, layout="rows")


def _score_with_rows(model, input_ids, attention_mask, layer, reward_index, caller: str):
    """One forward: the pooled scores [B] and the attention rows [B, H, L] captured at the reward position."""
    with torch.no_grad():
        with capture_reward_attention(model, layer=layer, reward_index=reward_index) as capture:
            out = model(input_ids=input_ids, attention_mask=attention_mask)
        return _pooled_scores(_logits_of(out), caller), capture.rows


def _completion_mask(input_ids, completion_mask) -> torch.Tensor:
    """completion_mask as bool, checked to be a [B, L] mask of input_ids' shape."""
    mask = _mask(completion_mask, "completion_mask")
    if not isinstance(input_ids, torch.Tensor) or input_ids.shape != mask.shape:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"completion_mask {tuple(mask.shape)} must have input_ids' shape, got input_ids {shape}")
    return mask


def _check_inputs(model, input_ids, attention_mask, completion_mask, reward_index, caller: str) -> torch.Tensor:
    """The checks before the forward that both calls make: ``completion_mask`` (shape, 0/1 values, a token in every
    row), ``reward_index`` (B values or one, within the sequence), a score head of one or two logits, and a pad id
    for a padded batch. Returns the mask as bool."""
    mask = _completion_mask(input_ids, completion_mask)
    _check_mask_values(completion_mask, "completion_mask")
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(
            f"{caller}: completion_mask marks no completion token in rows {empty[:10]}, so the score would be lost"
        )
    batch, length = mask.shape
    if isinstance(reward_index, torch.Tensor) and reward_index.numel() not in (1, batch):
        raise ValueError(f"reward_index must be an int or [B]=[{batch}], got shape {tuple(reward_index.shape)}")
    if reward_index is not None and not isinstance(reward_index, bool):
        index = torch.as_tensor(reward_index)
        if not (index.dtype.is_floating_point or index.dtype.is_complex) and bool(
            ((index < -length) | (index >= length)).any()
        ):
            raise ValueError(f"reward_index must be in [-{length}, {length}) (the sequence length), got {reward_index}")
    num_labels = getattr(getattr(model, "config", None), "num_labels", None)
    if isinstance(num_labels, int) and num_labels not in (1, 2):
        raise ValueError(
            f"{caller}: the reward model's config.num_labels is {num_labels}; a reward model has one logit (the "
            "score) or two (the score is logit[1] - logit[0])"
        )
    padded = isinstance(attention_mask, torch.Tensor) and bool((attention_mask == 0).any())
    config = getattr(model, "config", None)
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if padded and getattr(text_config, "pad_token_id", None) is None and _bidirectional_reason(model) is None:
        raise ValueError(
            f"{caller}: attention_mask pads the batch but the reward model's config.pad_token_id is None, so it "
            "cannot find each row's last token to pool; set model.config.pad_token_id to its tokenizer's pad id"
        )
    return mask


def _refuse_unread(model, input_ids, attention_mask, mask, reward_index) -> None:
    """Refuse completion masks that put the score where the reward model did not read: on padding, or (a causal
    reward model, the reward position where it pools) only after that position, where the attention row and
    the prefix scores have nothing and the sparse fallback would put the whole score on a pad."""
    problems = []
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == mask.shape:
        on_padding = (mask & (attention_mask.to(mask.device) == 0)).any(dim=1)
        problems.append(("padding (attention_mask 0)", on_padding))
    pad_token_id = getattr(model.config.get_text_config(), "pad_token_id", None)
    if reward_index is None and _bidirectional_reason(model) is None and pad_token_id is not None:
        pooled = _last_non_pad(input_ids.to(mask.device), pad_token_id)
        positions = torch.arange(mask.shape[1], device=mask.device)
        read = (mask & (positions[None, :] <= pooled[:, None])).any(dim=1)
        problems.append(
            (
                "only tokens after the position the reward model reads its score from (its last non-pad token)",
                mask.any(dim=1) & ~read,
            )
        )
    for what, rows in problems:
        bad = rows.nonzero().flatten().tolist()
        if bad:
            raise ValueError(
                f"score_and_densify: completion_mask marks {what} in rows {bad[:10]}: the reward "
                "model's score does not reflect those tokens, so no reward can be put on them"
            )
