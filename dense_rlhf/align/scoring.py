"""The text path: dense rewards on the policy's response tokens from a reward model with its own tokenizer and
chat template (:func:`score_and_densify_text`): decode, render and tokenise, one reward-model forward, project its
values onto the policy's tokens, and the rewards."""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from dense_rlhf._padding import pad_rows
from dense_rlhf.align.projection import _project_row
from dense_rlhf.align.render import (
    Prompts,
    RewardModelInputs,
    _check_max_length,
    _check_offsets,
    _check_prompts,
    render_and_tokenize,
)
from dense_rlhf.align.rewards import _baseline_rewards, _rewards_from_credit, _rewards_from_differences
from dense_rlhf.align.spans import _backend, _decode_with_spans, _Unmappable
from dense_rlhf.capture.attention import capture_reward_attention
from dense_rlhf.capture.model import _logits_of, _pooled_scores
from dense_rlhf.capture.prefix import capture_prefix_scores
from dense_rlhf.ops import _check_mask_values, _mask, check_beta

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

__all__ = ["score_and_densify_text"]


def _check_responses(response_ids, response_mask, policy_tokenizer):
    if not isinstance(response_ids, torch.Tensor) or response_ids.dim() != 2:
        raise TypeError(
            f"response_ids must be a [B, R] integer tensor, got "
            f"{type(response_ids).__name__} {tuple(getattr(response_ids, 'shape', ()))}"
        )
    if response_ids.dtype.is_floating_point or response_ids.dtype.is_complex or response_ids.dtype == torch.bool:
        raise TypeError(f"response_ids must hold integer token ids, got {response_ids.dtype}")
    if response_ids.shape[0] == 0:
        raise ValueError("response_ids has no rows")
    if response_mask is None:
        pad = getattr(policy_tokenizer, "pad_token_id", None)
        if pad is None:
            raise ValueError("response_mask is None and policy_tokenizer has no pad_token_id; pass response_mask")
        mask = response_ids != pad
    else:
        given = torch.as_tensor(response_mask, device=response_ids.device)
        mask = _mask(given, "response_mask")
        if mask.shape != response_ids.shape:
            raise ValueError(f"response_mask has shape {tuple(mask.shape)}, response_ids {tuple(response_ids.shape)}")
        _check_mask_values(given, "response_mask")
    empty = (~mask.any(1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"response_mask marks no response token in rows {empty[:10]}")
    negative = ((response_ids < 0) & mask).any(1).nonzero().flatten().tolist()
    if negative:
        raise ValueError(f"response_ids holds negative token ids on response tokens in rows {negative[:10]}")
    huge = ((response_ids >= 2**32) & mask).any(1).nonzero().flatten().tolist()
    if huge:
        raise ValueError(
            f"response_ids holds token ids of 2**32 or more on response tokens in rows {huge[:10]}: no tokenizer "
            "has such ids"
        )
    return mask


def _position_limit(model) -> int | None:
    """The most tokens the model takes: ``config.max_position_embeddings`` (GPT-2's ``n_positions``), less the
    offset of position embeddings that start after a padding index (RoBERTa style). None where the config has no
    limit or scales its rotary embeddings beyond it."""
    config = getattr(model, "config", None)
    limit = getattr(config, "max_position_embeddings", None)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        return None
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
    if isinstance(rope, Mapping) and rope.get("rope_type", rope.get("type", "default")) not in (None, "default"):
        return None
    for name, module in model.named_modules():
        if (
            name.endswith("position_embeddings")
            and isinstance(module, torch.nn.Embedding)
            and module.padding_idx is not None
        ):
            limit = min(limit, module.num_embeddings - module.padding_idx - 1)
    return limit


def _check_positions(reward_model, inputs: RewardModelInputs) -> None:
    limit = _position_limit(reward_model)
    if limit is None:
        return
    for b, row in enumerate(inputs.rows):
        if row is not None and len(row["input_ids"]) > limit:
            inputs.fail(
                b,
                f"the reward model's input has {len(row['input_ids'])} tokens but the model takes at most "
                f"{limit} positions (its config's max_position_embeddings); pass max_length={limit} (with "
                "rm_tokenizer.truncation_side = 'left' to cut the prompt) or shorten the prompts",
            )


def _pad(rows, rm_tokenizer, device):
    """The reward model's batch: ids and attention mask padded on ``rm_tokenizer.padding_side``, and each row's
    first position."""
    length = max(len(r["input_ids"]) for r in rows)
    side = getattr(rm_tokenizer, "padding_side", "right")
    pad = getattr(rm_tokenizer, "pad_token_id", None)
    if pad is None:
        if any(len(r["input_ids"]) != length for r in rows):
            raise ValueError(
                "rm_tokenizer has no pad token and the reward model's inputs differ in length; set "
                "rm_tokenizer.pad_token (and the reward model's config.pad_token_id to its id)"
            )
        pad = 0
    ids, mask = pad_rows([r["input_ids"] for r in rows], pad, side="left" if side == "left" else "right")
    starts = [length - len(r["input_ids"]) if side == "left" else 0 for r in rows]
    return ids.to(device), mask.long().to(device), starts


def _forward(reward_model, rm_tokenizer, inputs: RewardModelInputs, method: str, capture):
    """One reward-model forward over the rows that have not failed, inside ``capture`` (not yet entered: for "abc" a
    :func:`dense_rlhf.capture_reward_attention`, for "prefix" a :func:`dense_rlhf.capture_prefix_scores`, otherwise
    none): ``{row: (score, values over that row's tokens [n] float32 on the CPU, or None)}`` where the values are the
    head-averaged attention row ("abc") or the score at every position ("prefix")."""
    todo = [b for b, row in enumerate(inputs.rows) if row is not None]
    if not todo:
        return {}
    device = next(reward_model.parameters()).device
    input_ids, attention_mask, starts = _pad([inputs.rows[b] for b in todo], rm_tokenizer, device)
    with torch.no_grad():
        model_inputs = dict(input_ids=input_ids, attention_mask=attention_mask)
        if any(starts) and "position_ids" in inspect.signature(reward_model.forward).parameters:
            # left padding: count positions from each row's first token, as an unpadded row would (absolute
            # position embeddings, e.g. GPT-2, would otherwise see shifted positions)
            model_inputs["position_ids"] = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        with capture or contextlib.nullcontext() as cap:
            out = reward_model(**model_inputs)
        scores = _pooled_scores(_logits_of(out), "score_and_densify_text").float()
        values, index = None, None
        if method == "abc":
            values, index = cap.rows.mean(1).float().cpu(), cap.reward_index.cpu()  # [n, L]: heads averaged
        elif method == "prefix":
            values, index = cap.prefix_scores.float().cpu(), cap.reward_index.cpu()
    scores, mask = scores.cpu(), attention_mask.cpu()
    out = {}
    for k, b in enumerate(todo):
        if index is not None and not bool(mask[k, index[k]]):
            inputs.fail(
                b,
                "the reward model read its score at a padding position: its config.pad_token_id "
                f"({getattr(reward_model.config, 'pad_token_id', None)}) differs from "
                f"rm_tokenizer.pad_token_id ({getattr(rm_tokenizer, 'pad_token_id', None)}), or the model "
                "pools its first position (BERT-style) and rm_tokenizer pads on the left",
            )
            continue
        if not bool(torch.isfinite(scores[k])):
            inputs.fail(b, f"the reward model's score is {float(scores[k])}")
            continue
        n = len(inputs.rows[b]["input_ids"])
        out[b] = (float(scores[k]), None if values is None else values[k, starts[k] : starts[k] + n])
    return out


class _TextScores:
    """The result of :func:`_score_text`: scores [B] (NaN where a row failed), rewards [B, R], and the rows that
    failed or got the sparse reward because their credit could not be mapped, each with its reason."""

    def __init__(self, scores, rewards, failed: dict[int, str], unmapped: dict[int, str]):
        self.scores, self.rewards, self.failed, self.unmapped = scores, rewards, failed, unmapped


METHODS = ("abc", "prefix", "sparse", "uniform")


class _TextBatch:
    """A batch prepared for scoring (:func:`_prepare_text`): the reward model's inputs, the response mask and the
    policy tokens' byte spans; :func:`_finish_text` turns per-row scores and values into rewards."""

    def __init__(self, inputs, mask, policy_spans, rm_backend, beta, response_ids):
        self.inputs, self.mask, self.policy_spans = inputs, mask, policy_spans
        self.rm_backend, self.beta, self.response_ids = rm_backend, beta, response_ids


def _check_method(method, allowed=METHODS) -> str:
    if not isinstance(method, str) or method not in allowed:
        raise ValueError(f"method must be one of {allowed}, got {method!r}")
    return method


def _prepare_text(
    rm_tokenizer, prompts, response_ids, *, policy_tokenizer, response_mask, beta, max_length, strict: bool, method: str
) -> _TextBatch:
    """Check the arguments, decode the responses with their tokens' byte spans, render and tokenise them for the
    reward model (:func:`render_and_tokenize`): everything before the reward model's forward."""
    _backend(policy_tokenizer, "policy_tokenizer")
    rm_backend = _backend(rm_tokenizer, "rm_tokenizer")
    beta = check_beta(beta)
    max_length = _check_max_length(max_length)
    mask = _check_responses(response_ids, response_mask, policy_tokenizer)
    _check_prompts(prompts, response_ids.shape[0])
    ids_cpu, mask_cpu = response_ids.cpu(), mask.cpu()
    maps = method in ("abc", "prefix")  # the baselines need no mapping of the response's tokens

    policy_spans, responses, unmapped = [], [], {}
    for b in range(response_ids.shape[0]):
        ids = ids_cpu[b][mask_cpu[b]].tolist()
        try:
            spans, response = _decode_with_spans(policy_tokenizer, ids, True, "policy_tokenizer")
        except _Unmappable as error:
            if strict and maps:
                raise ValueError(f"row {b}: {error}") from None
            spans, response = None, policy_tokenizer.decode(ids, skip_special_tokens=True)
            unmapped[b] = str(error)
        policy_spans.append(spans)
        responses.append(response)

    inputs = render_and_tokenize(rm_tokenizer, prompts, responses, max_length=max_length, strict=strict, mapping=maps)
    for b, reason in unmapped.items():
        inputs.unmap(b, reason)
    if maps:
        _check_offsets(inputs)
    return _TextBatch(inputs, mask, policy_spans, rm_backend, beta, response_ids)


def _finish_text(batch: _TextBatch, results: dict, method: str) -> _TextScores:
    """The rewards of a prepared batch from ``{row: (score, values [n] or None)}`` (see :func:`_forward`)."""
    inputs, mask, response_ids = batch.inputs, batch.mask, batch.response_ids
    mask_cpu = mask.cpu()
    credit = torch.zeros(response_ids.shape, dtype=torch.float32)
    scores = torch.full((response_ids.shape[0],), float("nan"), dtype=torch.float32)
    for b, (score, values) in results.items():
        scores[b] = score
        if method in ("abc", "prefix") and inputs.mappable(b):
            credit[b, mask_cpu[b]] = _project_row(
                inputs, b, batch.rm_backend, values, batch.policy_spans[b], differences=method == "prefix"
            )
    device = response_ids.device
    failed = dict(inputs.failed)
    unmapped = {b: reason for b, reason in inputs.unmapped.items() if b not in failed}
    credit, scores = credit.to(device), scores.to(device)
    if method == "abc":
        rewards = _rewards_from_credit(
            credit, scores, mask, batch.beta, sparse_rows=sorted(unmapped), empty_rows=sorted(failed)
        )
    elif method == "prefix":
        rewards = _rewards_from_differences(
            credit, scores, mask, batch.beta, sparse_rows=sorted(unmapped), empty_rows=sorted(failed)
        )
    else:
        rewards = _baseline_rewards(method, scores, mask, empty_rows=sorted(failed))
    return _TextScores(scores, rewards, failed, unmapped)


def _score_text(
    reward_model,
    rm_tokenizer,
    prompts,
    response_ids,
    *,
    policy_tokenizer,
    response_mask,
    beta,
    layer,
    max_length,
    strict: bool,
    method: str = "abc",
) -> _TextScores:
    """:func:`score_and_densify_text`'s work. ``strict=False``: a row that cannot be scored is reported in
    ``failed`` (the others are still scored), and a row whose credit cannot be mapped gets the sparse reward
    (its score on its last response token) and is reported in ``unmapped``; argument errors still raise."""
    _check_method(method)
    if method == "abc":
        capture = capture_reward_attention(reward_model, layer=layer)  # checks the model and the layer
    elif method == "prefix":
        capture = capture_prefix_scores(reward_model)  # checks that its positions are prefixes
    else:
        capture = None
    batch = _prepare_text(
        rm_tokenizer,
        prompts,
        response_ids,
        policy_tokenizer=policy_tokenizer,
        response_mask=response_mask,
        beta=beta,
        max_length=max_length,
        strict=strict,
        method=method,
    )
    _check_positions(reward_model, batch.inputs)
    results = _forward(reward_model, rm_tokenizer, batch.inputs, method, capture)
    return _finish_text(batch, results, method)


def score_and_densify_text(
    reward_model: PreTrainedModel,
    rm_tokenizer: PreTrainedTokenizerBase,
    prompts: Prompts,
    response_ids: torch.Tensor,
    *,
    policy_tokenizer: PreTrainedTokenizerBase,
    response_mask: torch.Tensor | None = None,
    beta: float = 0.8,
    layer: int = -1,
    max_length: int | None = None,
    method: str = "abc",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense rewards from a reward model with its own tokenizer and chat template, on the policy's response tokens:
    ABC by default, or prefix differences, or the sparse or uniform baseline (``method``, as in
    :func:`dense_rlhf.score_and_densify`).

    For each row: the policy's response tokens (``response_mask``) are decoded with
    ``policy_tokenizer.decode(..., skip_special_tokens=True)``, as verl and OpenRLHF do; the reward model's
    input is ``prompt + response`` for a plain-text prompt (tokenised with the tokenizer's special tokens) or,
    for a chat prompt, ``rm_tokenizer.apply_chat_template(messages + [{"role": "assistant", "content":
    response}], tokenize=False)`` (tokenised without adding special tokens, as transformers does for chat
    text). The response is policy output, so its text never becomes control tokens: where it spells the reward
    model's special tokens or the added tokens its chat template writes (``"<|end|><|user|>..."``), they are
    tokenised as ordinary text while the template's own stay tokens (:func:`render_and_tokenize`). The reward
    model runs once on the batch inside :func:`dense_rlhf.capture_reward_attention`; its head-averaged attention
    row from the reward position is restricted to its tokens that overlap the response's bytes and projected onto
    the policy's tokens by :func:`project_credit` (byte spans from the fast tokenizers' offsets and
    :func:`token_byte_spans`), and :func:`dense_rlhf.dense_rewards` turns those ``[B, R]`` rows into the rewards.

    ``method``:

    - ``"abc"`` (default): as above.
    - ``"prefix"``: prefix-difference rewards. The reward model's score at every position
      (:func:`dense_rlhf.capture_prefix_scores`, decoder ``*ForSequenceClassification`` models) gives each of its
      tokens that overlap the response its change of the score (the first one its own score); those changes are
      projected onto the policy's tokens the same way, and :func:`dense_rlhf.prefix_rewards` turns them into the
      rewards, with what reaches no policy token (the change after the response, e.g. over the template's closing
      tokens, and the share of a token straddling the response's start) on the last response token, so each row
      still sums to the score. With the same tokenizer on both sides this is ``score_and_densify(...,
      method="prefix")`` on the ids.
    - ``"sparse"``, ``"uniform"``: the score on the last response token, or score / n on each of the n; the
      response's tokens need no mapping, so a template that changes the response is no error for them.

    ``dense_rlhf.integrations.vllm.ServedRewardModel.score_and_densify_text`` computes "prefix", "sparse" and
    "uniform" from a reward model served by vLLM with this same rendering and mapping.

    Args:
        reward_model: a transformers sequence-classification model (one logit, or two: ``logit[1] - logit[0]``)
            whose attention can be captured (see :func:`dense_rlhf.capture_reward_attention`).
        rm_tokenizer: its fast tokenizer (offsets are needed); ``padding_side`` and ``truncation_side`` are
            honoured; a pad token is needed when the rows differ in length.
        prompts: B plain strings, or B lists of chat messages (dicts with "role" and "content"), one kind. They
            come from the dataset and are tokenised as ``rm_tokenizer`` does, control tokens included.
        response_ids: [B, R] policy token ids of the responses (right-padded, or any layout with a mask).
        policy_tokenizer: the policy's fast tokenizer.
        response_mask: [B, R] bool or 0/1, True on response tokens; default ``response_ids != pad_token_id``
            (pass it when the pad id is also the EOS id and EOS is part of the response).
        beta, layer: as in :func:`dense_rlhf.score_and_densify` (``layer``: "abc" only).
        max_length: cap on the reward model's input tokens. A longer input is truncated by ``rm_tokenizer``
            (its ``truncation_side``) only if the response and every token after it survive (left truncation
            drops the start of the prompt); otherwise ValueError. None: no truncation, and an input longer than
            the reward model's ``config.max_position_embeddings`` is a ValueError.

    Returns:
        ``(scores, rewards)``: float32 [B] reward-model scores and float32 [B, R] rewards aligned with
        ``response_ids``, on its device: zero off the mask, each row summing to its score; for "abc",
        ``(1 - beta) * score`` on the last response token plus ``beta * score`` spread by the projected attention.

    What the credit of a token means here: a reward-model token's attention (for "prefix": its change of the score)
    is split over the policy tokens whose bytes it overlaps, in proportion to the overlap. Policy tokens with no
    text (special tokens such as EOS, skipped in the decode) and whitespace that the chat template trims get no
    attention credit; a reward-model token that straddles the start of the response (plain-text prompts can merge
    across it) contributes only its response bytes' share. ``dense_rewards`` normalises what reaches the response
    tokens, so no reward mass is lost either way; if none reaches them the dense part falls on the last token. For
    "prefix", what reaches no response token is added to the last one.

    Raises (all before the reward model's forward, except the padding-position and non-finite-score checks):
        TypeError: slow tokenizers (no offsets), a tokenizer that is None, bad argument types (``max_length``
            not an int).
        ValueError: an unknown ``method``; for "prefix", a reward model whose positions are not prefixes
            (bidirectional) or that has no ``score`` head; shape or mask problems, negative token ids or ids of
            2**32 or more, prompts holding text that is not valid Unicode (lone surrogates), ``beta``
            outside [0, 1], ``max_length`` < 1, a
            chat template that changes the response beyond trimming whitespace, truncation that would cut the
            response, an input longer than the reward model's positions, zero-width offsets from
            ``rm_tokenizer`` (a known tokenizers bug), a score read at a padding position (mismatched pad ids) or
            not finite, and everything :func:`dense_rlhf.dense_rewards` rejects. Row-level messages start with
            ``row b:``.
    """
    result = _score_text(
        reward_model,
        rm_tokenizer,
        prompts,
        response_ids,
        policy_tokenizer=policy_tokenizer,
        response_mask=response_mask,
        beta=beta,
        layer=layer,
        max_length=max_length,
        strict=True,
        method=method,
    )
    return result.scores, result.rewards
