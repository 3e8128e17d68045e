"""ABC's token-level credit in trl's ``GRPOTrainer`` (trl 1.16; the ``trl`` extra pins it).

``ABCGRPOTrainer`` is trl's GRPOTrainer with the reward computed by a Hugging Face reward model under
:func:`dense_rlhf.capture_reward_attention`, so that every completion also gets ABC's credit ``alpha`` (the
reward model's last-layer attention from its scoring token, over the completion tokens, summing to 1), and
with trl's one-advantage-per-completion replaced by per-token advantages of one of the schemes of
:mod:`dense_rlhf.rl.grpo`:

- ``"credit"`` (scheme 2): ``A[i, t] = A_i * n_i * (credit_beta * alpha[i, t] + (1 - credit_beta) / n_i)``,
  with trl's own group-normalised ``A_i``; the mean over each completion stays ``A_i``.
- ``"dense"`` (scheme 3): the return-to-go of ABC's rewards ``dense_rewards(alpha, score, beta=abc_beta)``,
  centred on the mean over the group's still-generating completions at the same step and divided by the
  group's score std (``args.scale_rewards``: ``"group"``, ``"batch"`` or ``"none"``).
- ``"plain"`` (scheme 1): ``A[i, t] = A_i``, trl's usual update through the same reward path (for A/B runs).

```python
from dense_rlhf.integrations.trl import ABCGRPOTrainer
trainer = ABCGRPOTrainer(model=policy, reward_model=rm, args=GRPOConfig(...), train_dataset=prompts,
                         processing_class=tokenizer, scheme="credit")
trainer.train()
```

How it hooks into trl 1.16 (two overrides and a reward function; no trl code copied):
- ``_generate`` is called as is; the override keeps the prompt token ids it returns, because trl hands reward
  functions the completion ids but not the prompt ids.
- The reward is a reward function that trl calls with the local completions: it runs the reward model on
  ``prompt ids + completion ids (+ reward_suffix_ids)`` inside the capture, returns the scores to trl (which
  normalises them into ``A_i`` and logs them as usual) and keeps ``alpha``.
- ``_generate_and_score_completions`` calls trl's, then replaces ``output["advantages"]`` [B] by the [B, T]
  token advantages; trl's ``_compute_loss`` accepts [B, T] advantages (it unsqueezes only 1-D ones), and
  the buffering, shuffling and splitting between generation and loss index rows only.

Requirements: the reward model reads the policy's token ids (same tokenizer; ``reward_suffix_ids`` appends,
e.g., the token whose hidden state the reward model was trained to score). It must be a sequence classifier
with one logit (the score) or two (``logit[1] - logit[0]``) whose attention goes through transformers'
``AttentionInterface`` (see ``capture_reward_attention``). Tool calling and environments are not supported
(tool tokens inside a completion would take credit that the loss masks out). Multi-process training gathers
ABC's credit across processes for scheme 3 as trl gathers the rewards; it is tested on one process only.
"""

from __future__ import annotations

import warnings
from typing import TYPE_CHECKING, Any

import torch
from trl import GRPOTrainer

from dense_rlhf._padding import pad_rows
from dense_rlhf.capture import capture_reward_attention, score_with_credit
from dense_rlhf.ops import check_beta
from dense_rlhf.rl import grpo

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["ABCGRPOTrainer", "TESTED_TRL"]

TESTED_TRL = "1.16"


def _check_trl_version() -> None:
    import trl

    if not trl.__version__.startswith(TESTED_TRL + "."):
        warnings.warn(
            f"ABCGRPOTrainer overrides GRPOTrainer methods of trl {TESTED_TRL}; trl {trl.__version__} is "
            "installed and may have changed them",
            RuntimeWarning,
            stacklevel=3,
        )


class ABCGRPOTrainer(GRPOTrainer):
    """trl's GRPOTrainer with a reward model's score as the reward and ABC's per-token advantages (see the module
    docstring). Every argument of ``GRPOTrainer`` except ``reward_funcs`` and ``reward_processing_classes`` is
    passed on.

    Args:
        reward_model: a ``*ForSequenceClassification`` model with 1 or 2 labels that reads the policy's token ids;
            it is put in eval mode and moved to the trainer's device.
        scheme: ``"credit"`` (default), ``"dense"`` or ``"plain"``.
        credit_beta: scheme 2's share of the advantage spread by attention; 0.5 keeps half of every token's plain
            advantage (the value used in the study, experiments/README.md).
        abc_beta: scheme 3's ABC mix of dense and terminal reward (the paper's 0.8).
        reward_suffix_ids: token ids appended after each completion before the reward model reads it.
        reward_layer: the reward-model layer whose attention is ABC's credit (default the last).

    Raises (in ``__init__``, before any generation): TypeError or ValueError naming the argument for a reward model
    that is not a 1- or 2-label ``*ForSequenceClassification`` model, has no ``config.pad_token_id`` (it could not
    pool the padded batch) or too few positions for ``args.max_completion_length`` and the suffix, a
    ``reward_layer`` it does not have, suffix ids that are not ints of its vocabulary, or a policy tokenizer with
    more tokens than its embeddings. A batch whose prompts leave too few positions for ``max_completion_length``
    raises ValueError naming them when they are tokenised, before their generation.
    """

    def __init__(
        self,
        model: str | PreTrainedModel,
        reward_model: PreTrainedModel,
        *,
        scheme: str = "credit",
        credit_beta: float = 0.5,
        abc_beta: float = 0.8,
        reward_suffix_ids: list[int] | None = None,
        reward_layer: int = -1,
        **kwargs: Any,
    ):
        _check_trl_version()
        for name in ("reward_funcs", "reward_processing_classes"):
            if kwargs.get(name) is not None:
                raise TypeError(f"ABCGRPOTrainer computes the reward with reward_model; do not pass {name}")
        for name in ("tools", "environment_factory"):
            if kwargs.get(name):
                raise ValueError(
                    f"ABCGRPOTrainer does not support {name}: tool or environment tokens inside a "
                    "completion would take credit that the loss masks out"
                )
        if scheme not in grpo.SCHEMES:
            raise ValueError(f"scheme must be one of {grpo.SCHEMES}, got {scheme!r}")
        credit_beta, abc_beta = check_beta(credit_beta, "credit_beta"), check_beta(abc_beta, "abc_beta")
        reward_vocab = _check_reward_model(reward_model, reward_layer)
        suffix_ids = _check_suffix_ids(reward_suffix_ids, reward_vocab)
        args = kwargs.get("args")
        if args is not None:
            if args.reward_weights is not None:
                raise ValueError("args.reward_weights must be None: the reward model is the only reward")
            if args.multi_objective_aggregation != "sum_then_normalize":
                raise ValueError(
                    "args.multi_objective_aggregation must be 'sum_then_normalize': the reward model is the only reward"
                )
        _check_positions(reward_model, args, len(suffix_ids))  # before trl's own setup too
        self.abc_scheme = scheme
        self.abc_credit_beta = credit_beta
        self.abc_beta = abc_beta
        self.abc_reward_model = reward_model
        self.abc_suffix_ids = suffix_ids
        self.abc_layer = reward_layer
        self._abc_prompt_ids: list[list[int]] | None = None
        self._abc_credit: dict | None = None
        super().__init__(model, reward_funcs=[self.abc_reward], **kwargs)
        _check_policy_vocabulary(self.processing_class, reward_vocab)
        self.abc_position_limit = _check_positions(reward_model, self.args, len(suffix_ids))  # trl's default args
        self.abc_reward_model.to(self.accelerator.device).eval()

    # -------------------------------------------------------------------------------- hooks into trl 1.16

    def _tokenize_prompts(self, prompts: list):
        """trl's prompt ids, checked before generation: prompt + the longest completion + the suffix must fit the
        reward model's positions, or its forward would fail after the generation."""
        result = super()._tokenize_prompts(prompts)
        limit, longest = self.abc_position_limit, self.args.max_completion_length
        if limit is not None and longest is not None:
            room = limit - longest - len(self.abc_suffix_ids)
            long = [b for b, ids in enumerate(result[0]) if len(ids) > room]
            if long:
                raise ValueError(
                    f"prompts {long[:10]} of this batch have more than {room} tokens: with max_completion_length="
                    f"{longest} and {len(self.abc_suffix_ids)} reward_suffix_ids, they exceed the reward model's "
                    f"{limit} positions (its config's max_position_embeddings); shorten the prompts or "
                    "max_completion_length"
                )
        return result

    def _generate(self, prompts: list):
        result = super()._generate(prompts)
        self._abc_prompt_ids = [[int(t) for t in ids] for ids in result[0]]
        return result

    def abc_reward(
        self, prompts: list, completions: list, completion_ids: list[list[int]], **kwargs: Any
    ) -> list[float]:
        """trl reward function: the reward model's score of each local completion. Keeps ABC's credit alpha
        [B, T] (completion-aligned, right-padded) and the completion mask for the advantages."""
        prompt_ids = self._abc_prompt_ids
        if prompt_ids is None or len(prompt_ids) != len(completion_ids):
            raise RuntimeError("ABCGRPOTrainer: the prompt ids of this batch were not recorded by _generate")
        scores, alpha, mask = self.score_with_credit(prompt_ids, completion_ids)
        self._abc_credit = {"alpha": alpha, "mask": mask, "scores": scores}
        return scores.tolist()

    def _generate_and_score_completions(self, inputs):
        self._abc_credit = None
        output = super()._generate_and_score_completions(inputs)
        if "tool_mask" in output:
            raise ValueError("ABCGRPOTrainer does not support env_mask/tool_mask from a rollout_func")
        credit, self._abc_credit, self._abc_prompt_ids = self._abc_credit, None, None
        if credit is None:
            raise RuntimeError("ABCGRPOTrainer: the reward function did not run for this batch")
        width = output["completion_mask"].shape[1]  # trl may pad further (pad_to_multiple_of)
        alpha = _pad_columns(credit["alpha"], width)
        mask = _pad_columns(credit["mask"], width)
        advantages = self.token_advantages(output["advantages"], credit["scores"], alpha, mask)
        output["advantages"] = advantages * output["completion_mask"]  # also zero on rows trl masked out
        return output

    # ---------------------------------------------------------------------------------------- the credit

    def score_with_credit(
        self, prompt_ids: list[list[int]], completion_ids: list[list[int]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reward-model scores [B] and ABC's credit alpha [B, T] on the completion tokens (mask [B, T] bool, T the
        longest completion), from one reward-model forward over ``prompt + completion + suffix``, right-padded
        (:func:`dense_rlhf.capture.score_with_credit`)."""
        rm = self.abc_reward_model
        device = self.accelerator.device
        rows = [list(p) + list(c) + self.abc_suffix_ids for p, c in zip(prompt_ids, completion_ids)]
        pad_id = rm.config.pad_token_id if rm.config.pad_token_id is not None else 0
        ids, attention_mask = pad_rows(rows, pad_id)
        completion_mask = torch.zeros(ids.shape, dtype=torch.bool)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            completion_mask[i, len(p) : len(p) + len(c)] = True
        scores, alpha_full = score_with_credit(
            rm, ids.to(device), attention_mask.long().to(device), completion_mask.to(device), layer=self.abc_layer
        )  # [B], [B, L]
        # completion-aligned: alpha[i, t] = alpha_full[i, len(prompt_i) + t]
        mask = pad_rows(completion_ids, 0)[1].to(device)
        starts = torch.tensor([len(p) for p in prompt_ids], device=device)
        cols = (starts[:, None] + torch.arange(mask.shape[1], device=device)).clamp(max=ids.shape[1] - 1)
        alpha = alpha_full.gather(1, cols) * mask
        return scores, alpha, mask

    def token_advantages(
        self, advantages: torch.Tensor, scores: torch.Tensor, alpha: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """[B, T] advantages of the local completions. ``advantages``: trl's A_i [B] (schemes 1 and 2 weight
        them); scheme 3 needs every group member's credit and score, gathered across processes."""
        if self.abc_scheme == "plain":
            return grpo.plain_advantages(advantages, mask)
        if self.abc_scheme == "credit":
            return grpo.credit_weighted_advantages(advantages, alpha, mask, self.abc_credit_beta)
        mode = "train" if self.model.training else "eval"
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        local, width = alpha.shape
        acc = self.accelerator
        all_alpha = acc.gather(acc.pad_across_processes(alpha, dim=1))
        all_mask = acc.gather(acc.pad_across_processes(mask, dim=1))
        all_scores = acc.gather(scores)
        adv = grpo.token_advantages(
            "dense", all_scores, all_alpha, all_mask, group_size, abc_beta=self.abc_beta, scale=self.scale_rewards
        )
        start = acc.process_index * local
        return adv[start : start + local, :width]


def _check_reward_model(reward_model, reward_layer) -> int:
    """The reward model's vocabulary size, after checking that it is a 1- or 2-label sequence classifier whose
    layer ``reward_layer`` can be captured."""
    name = type(reward_model).__name__
    if not isinstance(reward_model, torch.nn.Module) or not name.endswith("ForSequenceClassification"):
        raise TypeError(
            f"reward_model must be a transformers *ForSequenceClassification model with 1 or 2 labels, got {name}"
        )
    labels = getattr(getattr(reward_model, "config", None), "num_labels", None)
    if labels not in (1, 2):
        raise ValueError(
            f"reward_model must have 1 label (the score) or 2 (logit[1] - logit[0]); {name} has "
            f"config.num_labels={labels}"
        )
    if isinstance(reward_layer, bool) or not isinstance(reward_layer, int):
        raise TypeError(f"reward_layer must be an int (negative counts from the end), got {reward_layer!r}")
    try:
        capture_reward_attention(reward_model, layer=reward_layer)  # resolves the layer; runs nothing
    except TypeError as error:
        raise TypeError(f"reward_model: {error}") from None
    except (ValueError, IndexError) as error:
        raise ValueError(f"reward_layer={reward_layer}: {error}") from None
    embeddings = reward_model.get_input_embeddings()
    vocab = getattr(embeddings, "num_embeddings", None)
    if not isinstance(vocab, int):
        raise TypeError(
            f"reward_model's input embeddings ({type(embeddings).__name__}) have no num_embeddings; "
            "ABCGRPOTrainer needs a token-id reward model"
        )
    return vocab


def _check_positions(reward_model, args, suffix: int) -> int | None:
    """The reward model's position limit (None if it has none), after checking that it has a pad id to pool a
    padded batch and room for at least one prompt token beside ``args.max_completion_length`` and the suffix."""
    config = reward_model.config.get_text_config()
    if getattr(config, "pad_token_id", None) is None:
        raise ValueError(
            "reward_model.config.pad_token_id is None: ABCGRPOTrainer right-pads each batch of prompt + completion "
            "for the reward model, which pools its score at the last token that is not the pad id; set "
            "reward_model.config.pad_token_id (to the policy tokenizer's pad id)"
        )
    from dense_rlhf.align.scoring import _position_limit

    limit = _position_limit(reward_model)
    longest = getattr(args, "max_completion_length", None)
    if limit is not None and isinstance(longest, int) and longest + suffix >= limit:
        raise ValueError(
            f"args.max_completion_length={longest} with {suffix} reward_suffix_ids leaves no room for a prompt in "
            f"the reward model's {limit} positions (its config's max_position_embeddings); lower "
            "max_completion_length or use a reward model with more positions"
        )
    return limit


def _check_suffix_ids(suffix_ids, reward_vocab: int) -> list[int]:
    if suffix_ids is None:
        return []
    if isinstance(suffix_ids, (str, bytes)) or not hasattr(suffix_ids, "__iter__"):
        raise TypeError(f"reward_suffix_ids must be a list of token ids, got {type(suffix_ids).__name__}")
    ids = list(suffix_ids)
    bad = [i for i in ids if isinstance(i, bool) or not isinstance(i, int)]
    if bad:
        raise TypeError(f"reward_suffix_ids must hold ints (token ids of the reward model), got {bad[:5]}")
    outside = [i for i in ids if not 0 <= i < reward_vocab]
    if outside:
        raise ValueError(
            f"reward_suffix_ids {outside[:5]} are outside the reward model's vocabulary (0 .. {reward_vocab - 1})"
        )
    return ids


def _check_policy_vocabulary(processing_class, reward_vocab: int) -> None:
    """The reward model reads the policy's token ids: its vocabulary must cover the policy tokenizer's."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    try:
        size = len(tokenizer)
    except TypeError:
        return
    if size > reward_vocab:
        raise ValueError(
            f"reward_model has {reward_vocab} token embeddings but the policy's tokenizer "
            f"(processing_class) has {size} tokens: the reward model reads the policy's token ids, so "
            "its vocabulary must cover the tokenizer's (same tokenizer, or resize its embeddings)"
        )


def _pad_columns(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero (False) columns on the right up to ``width``."""
    if x.shape[1] >= width:
        return x
    return torch.cat([x, x.new_zeros(x.shape[0], width - x.shape[1])], dim=1)
