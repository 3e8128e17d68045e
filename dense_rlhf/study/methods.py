"""The reward methods compared in the study, as per-token task rewards for ``dense_rlhf.rl.ppo``.

Each method turns the reward model's scalar score r_C of a completion into [B, N] rewards on the N
response tokens, summing to r_C:

- ``sparse``: r_C on the last response token (ABC with beta = 0).
- ``abc-<beta>``: ABC, ``dense_rewards`` of the reward model's last-layer attention row from its reward
  position ([EOS], appended after the response), restricted to the response tokens.
- ``prefix-<beta>``: prefix-difference rewards (R3HF), ``prefix_rewards`` of the reward model's score read at
  every position in the same forward (``capture_prefix_scores``): response token t gets s(x, y<=t) -
  s(x, y<t), the last one also the step to the score at [EOS].
- ``uniform``: r_C / N on every response token.
- ``abcd``: ABC-D, the same formula (beta 0.8) with the *policy's* own last-layer attention row from its
  final generated token, captured during the rollout forward by the hook ``capture_policy_attention``
  (``ppo.train(..., rollout_hook=...)``; ``rollout_hook(method)`` names it for this method only).

With a reward model that has its own tokenizer and chat template (``ALIGNED_METHODS``: a byte-level BPE trained
on the task's text, see ``models.load_or_train_chat_rm``), through ``dense_rlhf.score_and_densify_text``:

- ``bpe-sparse``: that reward model's score on the last response token (beta = 0).
- ``bpe-abc-0.8``: ABC through alignment: its last-layer row from its final ``<|end|>``, projected onto the
  policy's word tokens by byte overlap, beta 0.8.

A label-free row from the same forward (``ROW_METHODS``, ``candidate_rows``):

- ``norm-<beta>``: ABC's formula with ABC's row replaced by the norm of each token's summed contribution to the
  scoring token's attention output, ``|sum_h alpha_h,t v_h,t W_O^h|`` (Kobayashi et al., 2020), the best unsigned
  candidate of ``--study rows`` for the 1-layer reward model.

Oracles (``ORACLE_METHODS``): the task's true per-token credit c_t (``sentiment_task.credits_of``, the signed
leave-one-out effect of each token on the hidden score), delivered the way ABC delivers its credit, each row
still summing to the reward model's score r_C (``oracle_rewards``):

- ``oracle-<beta>``: the true credit in the reward model's units, r_t = beta * k * c_t + [t == T] * (r_C - beta * k *
  sum_s c_s), with k the reward model's scale (``rm_scale``: its score is about k times the hidden score): right
  tokens, right signs, right sizes on average; the last token keeps the rest of the score (the reward model's
  disagreement with the hidden score, and (1 - beta) of the credit). Without k (k = 1) the dense part would be
  about 1 / k times the reward model's own scale (k is about 0.33 here), with a last-token correction of the
  opposite sign.
- ``oracle-abs-<beta>``: ABC's shape with a perfect attention row: ``dense_rewards`` with alpha_t = |c_t| / sum_s
  |c_s|, so every token gets the score's sign as in ABC; a completion without credited tokens gets the sparse
  reward (``dense_rewards``' rule for a row that sums to 0).
"""

from __future__ import annotations

import contextlib
import random
from typing import NamedTuple

import torch

from dense_rlhf.capture import capture_prefix_scores, capture_reward_attention, score_with_credit
from dense_rlhf.ops import dense_rewards, prefix_rewards, sparse_rewards, uniform_rewards
from dense_rlhf.rl.grpo import GroupRollout
from dense_rlhf.rl.ppo import Rollout, RolloutHook
from dense_rlhf.study import sentiment_task as task
from dense_rlhf.study.candidate_rows import candidate_rows

METHODS = ["sparse", "abc-0.5", "abc-0.8", "abc-1.0", "prefix-0.8", "prefix-1.0", "uniform", "abcd"]
LABELS = {
    "sparse": "sparse (beta=0)",
    "abc-0.5": "ABC beta=0.5",
    "abc-0.8": "ABC beta=0.8",
    "abc-1.0": "ABC beta=1.0",
    "prefix-0.8": "prefix diff. beta=0.8",
    "prefix-1.0": "prefix diff. beta=1.0",
    "uniform": "uniform",
    "abcd": "ABC-D (policy attention)",
}
ABCD_BETA = 0.8
ALIGNED_METHODS = ["bpe-sparse", "bpe-abc-0.8"]
ORACLE_METHODS = ["oracle-0.8", "oracle-abs-0.8"]
ROW_METHODS = ["norm-0.8"]
RM_SCALE_TEXTS, RM_SCALE_SEED = 2048, 7  # the grammar texts rm_scale fits on
ALL_METHODS = METHODS + ALIGNED_METHODS + ORACLE_METHODS + ROW_METHODS
LABELS.update(
    {
        "bpe-sparse": "sparse, BPE chat RM",
        "bpe-abc-0.8": "ABC through alignment, BPE chat RM",
        "oracle-0.8": "oracle: true credit in RM units, beta=0.8",
        "oracle-abs-0.8": "oracle in ABC's shape (shares by absolute true credit), beta=0.8",
        "norm-0.8": "ABC with attention x output norm (Kobayashi), beta=0.8",
    }
)


def rm_inputs(codec: task.Codec, seq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model input ``seq + [EOS]`` [B, L+1] and its mask of response tokens (same positions)."""
    eos = torch.full((seq.shape[0], 1), codec.eos_id, dtype=seq.dtype)
    ids = torch.cat([seq, eos], dim=1)
    mask = torch.zeros(ids.shape, dtype=torch.bool)
    mask[:, task.PROMPT_LEN : seq.shape[1]] = True
    return ids, mask


class RewardForward(NamedTuple):
    """What one reward-model forward gives every method."""

    score: torch.Tensor  # [B] float32, read at [EOS]
    rows: torch.Tensor  # [B, H, L] last-layer attention rows from [EOS]
    prefix_scores: torch.Tensor | None  # [B, L] the score read at every position (when asked for)
    reward_index: torch.Tensor | None  # [B] the position the score is read at ([EOS]) (when asked for)


@torch.no_grad()
def rm_forward(rm, ids: torch.Tensor, prefix: bool = True) -> RewardForward:
    """One reward-model forward: scores, the last layer's rows and, with ``prefix``, the per-position scores."""
    with (
        capture_reward_attention(rm, layer=-1) as cap,
        capture_prefix_scores(rm) if prefix else contextlib.nullcontext() as scores,
    ):
        score = rm(input_ids=ids).logits[:, 0].float()  # reward position: the rightmost non-pad token
    if not prefix:
        return RewardForward(score, cap.rows, None, None)
    return RewardForward(score, cap.rows, scores.prefix_scores, scores.reward_index)


def score_with_attention(rm, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One reward-model forward: scores [B] and the last layer's per-head rows from [EOS], [B, H, L]."""
    out = rm_forward(rm, ids, prefix=False)
    return out.score, out.rows


def oracle_rewards(
    credit: torch.Tensor, score: torch.Tensor, beta: float, abc_shape: bool, scale: float = 1.0
) -> torch.Tensor:
    """[B, N] oracle rewards on the response tokens from the true credit [B, N] and the reward model's scores [B]
    (see the module docstring): ``abc_shape`` False, beta * scale * credit with the rest of the score on the last
    token; True, ``dense_rewards`` with alpha proportional to |credit| (``scale`` unused). Each row sums to its
    score."""
    score = score.float()
    if abc_shape:
        return dense_rewards(credit.abs().float(), score, torch.ones(credit.shape, dtype=torch.bool), beta=beta)
    out = (beta * scale) * credit.float()
    out[:, -1] += score - out.sum(1)
    return out


@torch.no_grad()
def rm_scale(rm, codec: task.Codec, completion_len: int, n: int = RM_SCALE_TEXTS, seed: int = RM_SCALE_SEED) -> float:
    """The reward model's scale against the hidden score: the least-squares slope of its score on the hidden score
    over ``n`` grammar texts drawn as the preference data are (very negative to very positive reviews)."""
    rng = random.Random(seed)
    words = [
        task.sample_words(rng, task.Style.random_for_preferences(rng), task.PROMPT_WORDS + completion_len)
        for _ in range(n)
    ]
    seq = codec.encode(words)
    hidden = task.scores_of(codec, seq).double()
    score = torch.cat([rm_forward(rm, rm_inputs(codec, chunk)[0], prefix=False).score for chunk in seq.split(512)])
    hidden_c = hidden - hidden.mean()
    return float((hidden_c * (score.double() - score.double().mean())).sum() / (hidden_c**2).sum())


def oracle_spec(method: str) -> tuple[float, bool]:
    """(beta, abc_shape) of an ``oracle-*`` method name."""
    body = method[len("oracle-") :]
    abc_shape = body.startswith("abs-")
    return float(body[4:] if abc_shape else body), abc_shape


def token_rewards(
    method: str,
    score: torch.Tensor,
    rm_rows: torch.Tensor,
    rm_mask: torch.Tensor,
    policy_rows: torch.Tensor | None,
    prompt_len: int,
    n_new: int,
    prefix_scores: torch.Tensor | None = None,
    reward_index: torch.Tensor | None = None,
    credit: torch.Tensor | None = None,
    credit_scale: float = 1.0,
) -> torch.Tensor:
    """[B, N] task rewards on the response tokens for one method (``prefix-*`` needs ``prefix_scores`` and the
    ``reward_index`` they were pooled at; ``oracle-*`` the true credit [B, N] of the response tokens, and the signed
    oracle the reward model's scale ``credit_scale``, see ``rm_scale``)."""
    if method.startswith("oracle-"):
        return oracle_rewards(credit, score, *oracle_spec(method), scale=credit_scale)
    if method == "sparse":
        full = sparse_rewards(score, rm_mask)
    elif method == "uniform":
        full = uniform_rewards(score, rm_mask)
    elif method.startswith("abc-"):
        full = dense_rewards(rm_rows, score, rm_mask, beta=float(method[4:]), layout="rows")
    elif method.startswith("norm-"):  # rm_rows: the candidate's one row per sequence [B, L]
        full = dense_rewards(rm_rows, score, rm_mask, beta=float(method[5:]), layout="row")
    elif method.startswith("prefix-"):
        full = prefix_rewards(prefix_scores, rm_mask, beta=float(method[7:]), reward_index=reward_index)
    elif method == "abcd":
        if policy_rows is None:
            raise ValueError(
                "abcd needs the policy's attention rows: run PPO with rollout_hook=capture_policy_attention"
            )
        mask = torch.zeros(policy_rows.shape[0], policy_rows.shape[-1], dtype=torch.bool)
        mask[:, prompt_len : prompt_len + n_new] = True
        full = dense_rewards(policy_rows, score, mask, beta=ABCD_BETA, layout="rows")
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return full[:, prompt_len : prompt_len + n_new]


@torch.no_grad()
def aligned_rewards(chat_rm, codec: task.Codec, seq: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores [B] and [B, N] rewards on the policy's response tokens from the reward model with its own tokenizer
    and chat template (``chat_rm`` = (tokenizer, model)): the text path, ``score_and_densify_text``."""
    from dense_rlhf.align import score_and_densify_text
    from dense_rlhf.study.models import rm_chat

    rm_tokenizer, rm = chat_rm
    prompts = [rm_chat(words) for words in codec.decode(seq[:, 1 : task.PROMPT_LEN])]
    response = seq[:, task.PROMPT_LEN :]
    return score_and_densify_text(
        rm,
        rm_tokenizer,
        prompts,
        response,
        policy_tokenizer=codec.tokenizer,
        response_mask=torch.ones_like(response, dtype=torch.bool),
        beta=beta,
    )


def capture_policy_attention(lm, seq: torch.Tensor):
    """ABC-D's rollout hook (``ppo.RolloutHook``): captures the policy's last-layer attention rows from its final
    token during the rollout's forward, ``Rollout.captured.rows`` [B, H, P + N] after it. The forward's outputs are
    the same with it as without."""
    return capture_reward_attention(lm, layer=-1, reward_index=seq.shape[1] - 1)


def rollout_hook(method: str) -> RolloutHook | None:
    """The hook a reward method needs on PPO's rollouts: ``capture_policy_attention`` for abcd, None for the rest."""
    return capture_policy_attention if method == "abcd" else None


def against_sparse(given: str | None, default, study: str) -> list[str]:
    """A study's ``--methods`` (comma-separated; ``default`` when not given), refused unless each is a method on the
    policy's own tokens and sparse, the baseline the study measures against, is among them."""
    methods = [m.strip() for m in (given or ",".join(default)).split(",") if m.strip()]
    for m in methods:
        if m not in ALL_METHODS or m in ALIGNED_METHODS:
            raise SystemExit(
                f"unknown method {m!r} for --study {study}; choose from "
                f"{[m for m in ALL_METHODS if m not in ALIGNED_METHODS]}"
            )
    if "sparse" not in methods:
        raise SystemExit(f"the {study} study compares against sparse: include it in --methods")
    return methods


def make_score_fn(method: str, rm, codec: task.Codec, chat_rm=None):
    """The ``score_fn`` for ``ppo.train``: per-token rewards of one method, plus the step's metrics.
    ``chat_rm`` (tokenizer, model) is the reward model of ``ALIGNED_METHODS``."""
    if method not in ALL_METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {ALL_METHODS}")
    if method in ALIGNED_METHODS:
        beta = 0.0 if method == "bpe-sparse" else float(method.rsplit("-", 1)[1])

        def aligned_score_fn(ro: Rollout):
            score, rewards = aligned_rewards(chat_rm, codec, ro.seq, beta)
            gt = task.scores_of(codec, ro.seq)
            return rewards, {"gt_score": gt.mean().item(), "rm_score": score.mean().item()}

        return aligned_score_fn

    oracle = method.startswith("oracle-")
    scale: list[float] = []  # the signed oracle's rm_scale, fitted at the first call (it needs the length)

    def score_fn(ro: Rollout):
        ids, mask = rm_inputs(codec, ro.seq)
        if method.startswith("norm-"):
            score, cands = candidate_rows(rm, ids)
            rows, prefix, index = cands["summed-output-norm"], None, None
        else:
            score, rows, prefix, index = rm_forward(rm, ids, prefix=method.startswith("prefix-"))
        n_new = ro.seq.shape[1] - task.PROMPT_LEN
        if oracle and not scale:
            scale.append(1.0 if oracle_spec(method)[1] else rm_scale(rm, codec, n_new))
        credit = task.credits_of(codec, ro.seq) if oracle else None
        policy_rows = ro.captured.rows if method == "abcd" and ro.captured is not None else None
        rewards = token_rewards(
            method,
            score,
            rows,
            mask,
            policy_rows,
            task.PROMPT_LEN,
            n_new,
            prefix,
            index,
            credit,
            scale[0] if oracle else 1.0,
        )
        gt = task.scores_of(codec, ro.seq)
        return rewards, {"gt_score": gt.mean().item(), "rm_score": score.mean().item()}

    return score_fn


def make_grpo_score_fn(rm, codec: task.Codec):
    """The ``score_fn`` for ``grpo.train``: reward-model scores [B] and ABC's credit alpha [B, N] (rows summing to
    1), from one reward-model forward over ``seq + [EOS]`` with the last layer's rows captured, plus the step's
    metrics."""

    def score_fn(ro: GroupRollout):
        ids, mask = rm_inputs(codec, ro.seq)
        score, credit = score_with_credit(rm, ids, None, mask)
        p, n_new = task.PROMPT_LEN, ro.seq.shape[1] - task.PROMPT_LEN
        alpha = credit[:, p : p + n_new]
        gt = task.scores_of(codec, ro.seq)
        return score, alpha, {"gt_score": gt.mean().item(), "rm_score": score.mean().item()}

    return score_fn
