"""Prefix-difference rewards' input from a reward model's ordinary forward: its score at every position
(:func:`capture_prefix_scores`).

Prefix scores need no attention at all: a decoder ``*ForSequenceClassification`` model applies its ``score``
head at every position before pooling the last non-pad one, so a forward hook on that head reads the score of
every prefix in the same forward.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from dense_rlhf.capture.model import _bidirectional_reason, _last_non_pad, _recorded, _score_of

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["PrefixScoreCapture", "capture_prefix_scores"]


class PrefixScoreCapture:
    """Context manager returned by :func:`capture_prefix_scores`; read ``prefix_scores`` after the forward."""

    def __init__(self, model: PreTrainedModel):
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"capture_prefix_scores needs a transformers PreTrainedModel, got {type(model).__name__}")
        reason = _bidirectional_reason(model)
        if reason is not None:
            raise ValueError(
                f"capture_prefix_scores: {type(model).__name__} is not a causal decoder ({reason}), so its score "
                "head's output at position t depends on later tokens and is not the score of the prefix ending "
                "at t. Prefix scores need a decoder reward model (e.g. LlamaForSequenceClassification)"
            )
        head = getattr(model, "score", None)
        if not isinstance(head, torch.nn.Module):
            raise ValueError(
                f"capture_prefix_scores: {type(model).__name__} has no `score` head. It needs a decoder "
                "*ForSequenceClassification model, whose `score` module maps every position's hidden state to "
                "logits before the last non-pad position is pooled"
            )
        self.model, self._head = model, head
        self._pad_token_id = getattr(model.config.get_text_config(), "pad_token_id", None)
        self._entered = self._exited = False
        self._hooks = []
        self._reset()

    def _reset(self):
        self._input_ids = None
        self._head_out = None
        self._prefix_scores = self._score = self._index = None
        self._error: str | None = None
        self._depth = 0

    @property
    def prefix_scores(self) -> torch.Tensor:
        """float32 [B, L]: the score read at every position, i.e. the score of the prefix ending there."""
        return _recorded(self._prefix_scores, self._error, "capture_prefix_scores")

    @property
    def reward_index(self) -> torch.Tensor:
        """long [B]: the position the model pooled its score from (last forward)."""
        _ = self.prefix_scores  # raises the same errors
        return self._index

    @property
    def score(self) -> torch.Tensor:
        """float32 [B]: the model's pooled score (equal to ``prefix_scores`` at ``reward_index``)."""
        _ = self.prefix_scores  # raises the same errors
        return self._score

    def __enter__(self) -> PrefixScoreCapture:
        if self._entered:
            raise RuntimeError("a capture_prefix_scores object can be entered only once; create a new one")
        self._entered = True
        self._owner = threading.get_ident()
        self._hooks = [
            self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self._head.register_forward_hook(self._head_hook),
            self.model.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True),
        ]
        return self

    def __exit__(self, *exc) -> bool:
        if not self._exited:
            self._exited = True
            for hook in self._hooks:
                hook.remove()
        return False

    # The hooks take their kwargs as optional: torch adds a hook before marking it with_kwargs, and a forward in
    # another thread may iterate over a snapshot of the hooks while a closing capture removes that mark, so such a
    # forward may call them without kwargs. Those calls are never from the owner's thread; they record nothing.

    def _pre_hook(self, module, args, kwargs=None):
        if threading.get_ident() != self._owner:
            return None
        if self._depth == 0:
            self._reset()
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            self._input_ids = input_ids if isinstance(input_ids, torch.Tensor) else None
        self._depth += 1
        return None

    def _head_hook(self, module, args, output):
        if threading.get_ident() == self._owner and self._depth > 0 and isinstance(output, torch.Tensor):
            self._head_out = output.detach()

    def _post_hook(self, module, args, *kwargs_and_output):
        if threading.get_ident() != self._owner:
            return None
        output = kwargs_and_output[-1]
        self._depth -= 1
        if self._depth == 0:
            self._finish(output)
        return None

    def _finish(self, output) -> None:
        """Turn the head's [B, L, C] output into scores, find the pooled position, check it against the output."""
        name = type(self.model).__name__
        head_out, input_ids = self._head_out, self._input_ids
        self._head_out = self._input_ids = None
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0]
        if head_out is None:
            self._error = f"capture_prefix_scores: the forward of {name} never called its `score` head"
            return
        if head_out.dim() != 3 or not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            self._error = (
                f"capture_prefix_scores: expected the `score` head to give [B, L, C] logits and the model "
                f"pooled [B, C] logits, got {tuple(head_out.shape)} and "
                f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}"
            )
            return
        with torch.no_grad():
            try:
                scores = _score_of(head_out, "the score head's output")
                pooled = _score_of(logits.detach(), "the model's logits")
            except ValueError as error:
                self._error = f"capture_prefix_scores: {error}"
                return
            batch, length = scores.shape
            if input_ids is None or self._pad_token_id is None:  # as transformers: the last position
                index = torch.full((batch,), length - 1, dtype=torch.long, device=scores.device)
            else:
                index = _last_non_pad(input_ids.to(scores.device), self._pad_token_id)
            at_index = scores[torch.arange(batch, device=scores.device), index]
            if pooled.shape != at_index.shape or not torch.allclose(
                at_index, pooled, rtol=1e-5, atol=1e-5, equal_nan=True
            ):
                self._error = (
                    f"capture_prefix_scores: {name}'s pooled score is not its score head's output at the "
                    "last non-pad position, so the head's per-position outputs cannot be read as prefix "
                    "scores"
                )
                return
        self._prefix_scores, self._score, self._index = scores, pooled, index


def capture_prefix_scores(model: PreTrainedModel) -> PrefixScoreCapture:
    """Record, during the reward model's ordinary forward, its score at every position: the prefix scores.

    A decoder ``*ForSequenceClassification`` model applies its ``score`` head to every position's hidden
    state and then pools the logits of the last non-pad token. In a causal model position t sees only the
    tokens up to t, so the head's output there is the score the model would give the sequence truncated at
    t: one forward yields the score of every prefix, which is what :func:`dense_rlhf.prefix_rewards` needs.

    Usage::

        with torch.no_grad(), dense_rlhf.capture_prefix_scores(rm) as cap:
            rm(input_ids=ids, attention_mask=mask)
        rewards = dense_rlhf.prefix_rewards(cap.prefix_scores, completion_mask, reward_index=cap.reward_index)

    After the forward: ``cap.prefix_scores`` float32 [B, L] (the logit of a one-logit head, or
    ``logit[1] - logit[0]`` of a two-logit head, at every position; values at padding are meaningless),
    ``cap.reward_index`` long [B] (the position the model pooled: the rightmost token that is not
    ``pad_token_id``, or the last position without one) and ``cap.score`` float32 [B] (the model's pooled
    score). The capture checks that the pooled score equals the head's output at ``reward_index``, so a model
    that pools some other way fails loudly instead of giving wrong prefix scores. A forward hook on the head
    (removed on exit) is all it adds: outputs are unchanged, the extra memory is the [B, L] scores. Only
    forwards in the thread that entered the capture are recorded; with several, the last one is kept.

    Prefix scores are out of distribution when the reward model was trained on complete sequences only (or
    reads its score at an appended end token): how informative they are is a property of the reward model.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``.
        ValueError: a bidirectional encoder (BERT-style) or encoder-decoder, whose positions are not prefixes;
            a model without a ``score`` head.
        RuntimeError (reading the results): no forward ran, the head was not called, its output is not
            [B, L, 1 or 2], or the pooled score does not match it.
    """
    return PrefixScoreCapture(model)
