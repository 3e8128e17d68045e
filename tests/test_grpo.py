"""GRPO and its token-level advantage schemes, each against a direct per-element computation."""

import copy
import math
import random
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dense_rlhf.rl.common import Policy
from dense_rlhf.rl.grpo import (
    GRPOConfig,
    credit_weighted_advantages,
    dense_return_advantages,
    group_advantages,
    grpo_losses,
    plain_advantages,
    rollout,
    token_advantages,
    train,
)
from dense_rlhf.study import sentiment_task as task
from dense_rlhf.study.methods import make_grpo_score_fn as make_score_fn

EPS = 1e-4


# ------------------------------------------------------------------------ direct computations (the spec)


def direct_group_advantages(scores, g, scale="group"):
    scores = [float(x) for x in scores]
    out = []
    for i, r in enumerate(scores):
        group = scores[(i // g) * g : (i // g + 1) * g]
        centred = r - statistics.fmean(group)
        if scale == "group":
            out.append(centred / (statistics.stdev(group) + EPS))
        elif scale == "batch":
            out.append(centred / (statistics.stdev(scores) + EPS))
        else:
            out.append(centred)
    return out


def direct_credit(adv, alpha, mask, beta):
    b, t = len(mask), len(mask[0])
    out = [[0.0] * t for _ in range(b)]
    for i in range(b):
        n = sum(mask[i])
        for s in range(t):
            if mask[i][s]:
                out[i][s] = adv[i] * n * (beta * alpha[i][s] + (1 - beta) / n)
    return out


def direct_dense(rewards, mask, g, scale="group"):
    b, t = len(mask), len(mask[0])
    ret = [[sum(rewards[i][u] for u in range(s, t) if mask[i][u]) for s in range(t)] for i in range(b)]
    totals = [ret[i][0] for i in range(b)]
    out = [[0.0] * t for _ in range(b)]
    for i in range(b):
        members = range((i // g) * g, (i // g + 1) * g)
        if scale == "group":
            div = statistics.stdev([totals[j] for j in members]) + EPS
        elif scale == "batch":
            div = statistics.stdev(totals) + EPS
        else:
            div = 1.0
        for s in range(t):
            if mask[i][s]:
                active = [ret[j][s] for j in members if mask[j][s]]
                out[i][s] = (ret[i][s] - statistics.fmean(active)) / div
    return out


def right_padded_mask(lengths, t):
    return torch.tensor([[s < n for s in range(t)] for n in lengths])


def random_alpha(mask, gen):
    a = torch.rand(mask.shape, generator=gen, dtype=torch.float64) ** 3 * mask
    return (a / a.sum(1, keepdim=True)).float()


# ------------------------------------------------------------------------------------------- the schemes


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_match_the_direct_computation(scale):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(12, generator=gen) * 3
    got = group_advantages(scores, 4, scale)
    assert torch.allclose(got, torch.tensor(direct_group_advantages(scores.tolist(), 4, scale)), atol=1e-5)


def test_group_advantages_match_trl_normalisation():
    trl_utils = pytest.importorskip("trl.trainer.utils")
    scores = torch.tensor([1.0, 2.0, 4.0, 0.5, -1.0, -1.0, 3.0, 2.0])
    mean = scores.view(-1, 4).mean(1).repeat_interleave(4)
    std = trl_utils.nanstd(scores.view(-1, 4), dim=1).repeat_interleave(4)  # trl's "group" scale
    assert torch.allclose(group_advantages(scores, 4), (scores - mean) / (std + 1e-4))


def test_plain_advantages_repeat_the_sequence_advantage_on_the_completion():
    adv = torch.tensor([1.5, -0.5])
    mask = right_padded_mask([3, 1], 4)
    assert plain_advantages(adv, mask).tolist() == [[1.5, 1.5, 1.5, 0.0], [-0.5, 0.0, 0.0, 0.0]]


@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_credit_weighted_matches_the_formula_and_keeps_the_mean(beta):
    gen = torch.Generator().manual_seed(1)
    lengths = [5, 2, 7, 7, 1, 4]
    mask = right_padded_mask(lengths, 7)
    alpha = random_alpha(mask, gen)
    adv = torch.randn(6, generator=gen)
    got = credit_weighted_advantages(adv, alpha, mask, beta)
    want = torch.tensor(direct_credit(adv.tolist(), alpha.tolist(), mask.tolist(), beta))
    assert torch.allclose(got, want, atol=1e-5)
    n = mask.sum(1)
    assert torch.allclose(got.sum(1) / n, adv, atol=1e-5)  # mean over the completion is A_i
    assert (got[~mask] == 0).all()
    if beta == 0.0:
        assert torch.allclose(got, plain_advantages(adv, mask))


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 4), st.integers(1, 3), st.integers(1, 6), st.floats(0, 1), st.integers(0, 2**31 - 1))
def test_schemes_match_direct_computation_on_random_groups(g, groups, t, beta, seed):
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    b = g * groups
    mask = right_padded_mask([rng.randint(1, t) for _ in range(b)], t)
    alpha = random_alpha(mask, gen)
    scores = torch.randn(b, generator=gen) * 2
    adv = group_advantages(scores, g)
    want = direct_credit(direct_group_advantages(scores.tolist(), g), alpha.tolist(), mask.tolist(), beta)
    got = credit_weighted_advantages(adv, alpha, mask, beta)
    assert ((got - torch.tensor(want)).abs() <= float32_atol(scores.abs(), scores, g)).all()
    rewards = torch.randn(b, t, generator=gen) * mask
    got = dense_return_advantages(rewards, mask, g)
    want = torch.tensor(direct_dense(rewards.tolist(), mask.tolist(), g))
    assert ((got - want).abs() <= float32_atol(rewards.abs().sum(1), rewards.sum(1), g)).all()


def float32_atol(magnitudes: torch.Tensor, totals: torch.Tensor, g: int) -> torch.Tensor:
    """[B, 1] tolerance of float32 advantages against the float64 loops: 1e-4, plus float32's rounding of values of
    ``magnitudes`` magnified by the division by the group's std of ``totals`` (a group of near-equal scores is
    ill-conditioned: hypothesis found one whose std was 1.8e-4)."""
    out = []
    for i in range(len(totals)):
        members = range((i // g) * g, (i // g + 1) * g)
        std = statistics.stdev([float(totals[j]) for j in members])
        out.append(1e-4 + 1e-6 * max(float(magnitudes[j]) for j in members) / (std + EPS))
    return torch.tensor(out)[:, None]


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_dense_returns_match_the_direct_computation_with_ragged_completions(scale):
    gen = torch.Generator().manual_seed(2)
    mask = right_padded_mask([6, 3, 6, 1, 5, 5, 2, 6], 6)
    rewards = torch.randn(8, 6, generator=gen) * mask
    got = dense_return_advantages(rewards, mask, 4, scale)
    want = torch.tensor(direct_dense(rewards.tolist(), mask.tolist(), 4, scale))
    assert torch.allclose(got, want, atol=1e-5)
    assert (got[~mask] == 0).all()
    # at the first token the return-to-go is the score: scheme 3 starts where plain GRPO is
    assert torch.allclose(got[:, 0], group_advantages(rewards.sum(1), 4, scale), atol=1e-5)


def test_dense_returns_with_sparse_rewards_are_plain_grpo():
    """With the whole score on the last token (ABC beta 0) and equal lengths, G[i, t] = r_i at every step."""
    scores = torch.tensor([1.0, 3.0, -2.0, 0.5])
    mask = torch.ones(4, 5, dtype=torch.bool)
    alpha = torch.full((4, 5), 0.2)
    got = token_advantages("dense", scores, alpha, mask, 4, abc_beta=0.0)
    assert torch.allclose(got, plain_advantages(group_advantages(scores, 4), mask), atol=1e-6)


def test_token_advantages_dense_uses_abc_rewards():
    gen = torch.Generator().manual_seed(3)
    mask = right_padded_mask([4, 4, 2, 3], 4)
    alpha = random_alpha(mask, gen)
    scores = torch.tensor([2.0, -1.0, 0.5, 1.0])
    beta = 0.8
    rewards = beta * scores[:, None] * alpha
    last = mask.sum(1) - 1
    rewards[torch.arange(4), last] += (1 - beta) * scores
    got = token_advantages("dense", scores, alpha, mask, 2, abc_beta=beta)
    assert torch.allclose(got, torch.tensor(direct_dense(rewards.tolist(), mask.tolist(), 2)), atol=1e-5)


def test_bad_inputs_name_the_argument():
    mask = torch.ones(4, 3, dtype=torch.bool)
    alpha = torch.full((4, 3), 1 / 3)
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.zeros(4), 1)
    with pytest.raises(ValueError, match="whole number of groups"):
        group_advantages(torch.zeros(5), 2)
    with pytest.raises(ValueError, match="scale"):
        group_advantages(torch.zeros(4), 2, scale="row")
    with pytest.raises(ValueError, match="beta"):
        credit_weighted_advantages(torch.zeros(4), alpha, mask, 1.5)
    with pytest.raises(ValueError, match="mask"):
        credit_weighted_advantages(torch.zeros(4), alpha, mask[:, :2], 0.5)
    with pytest.raises(ValueError, match="adv"):
        plain_advantages(torch.zeros(3), mask)
    with pytest.raises(ValueError, match="scheme"):
        token_advantages("oracle", torch.zeros(4), alpha, mask, 2)


# ------------------------------------------------------------------------------------------------- losses


def test_grpo_losses_clip_and_k3_kl_by_hand():
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    pg, kl, clipfrac = grpo_losses(old, old, old, adv, 0.2)
    assert pg.item() == pytest.approx(0.0) and kl.item() == 0.0 and clipfrac.item() == 0.0
    logp = torch.log(torch.tensor([[2.0, 2.0]]))  # ratio 2 for both tokens
    ref = torch.log(torch.tensor([[1.0, 4.0]]))
    pg, kl, clipfrac = grpo_losses(logp, old, ref, adv, 0.2)
    assert pg.item() == pytest.approx((-1.2 + 2.0) / 2)  # max(-2, -1.2) and max(2, 1.2)
    # k3 = pi_ref/pi - log(pi_ref/pi) - 1: ratio 1/2 -> 0.5 + log 2 - 1; ratio 2 -> 2 - log 2 - 1
    assert kl.item() == pytest.approx(((0.5 + math.log(2) - 1) + (2 - math.log(2) - 1)) / 2)
    assert clipfrac.item() == 1.0


# ------------------------------------------------------------------------------ the training loop (transformers)


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers")
    from dense_rlhf.study.models import SetupConfig, new_policy, new_reward_model

    torch.manual_seed(0)
    codec = task.Codec()
    cfg = SetupConfig(n_embd=32, rm_n_embd=32, n_layer=1, rm_n_layer=1, n_head=2, rm_n_head=2)
    return codec, new_policy(codec, cfg).eval(), new_reward_model(codec, cfg).eval()


def test_rollout_samples_groups_of_the_same_prompt(tiny):
    codec, lm, _ = tiny
    policy = Policy(lm, codec.special_ids)
    prompts = codec.encode(task.sample_prompts(random.Random(0), 3))
    ro = rollout(policy, lm, prompts, 4, 6, torch.Generator().manual_seed(0), 1.0)
    assert ro.seq.shape == (12, task.PROMPT_LEN + 6) and ro.old_logp.shape == ro.ref_logp.shape == (12, 6)
    assert torch.equal(ro.seq[:, : task.PROMPT_LEN], prompts.repeat_interleave(4, 0))
    assert torch.allclose(ro.old_logp, ro.ref_logp)  # the policy is still the reference
    assert not torch.isin(ro.seq[:, task.PROMPT_LEN :], torch.tensor(codec.special_ids)).any()


def test_score_fn_gives_scores_and_alpha_summing_to_one(tiny):
    codec, lm, rm = tiny
    prompts = codec.encode(task.sample_prompts(random.Random(1), 2))
    ro = rollout(Policy(lm, codec.special_ids), lm, prompts, 3, 5, torch.Generator().manual_seed(1), 1.0)
    scores, alpha, metrics = make_score_fn(rm, codec)(ro)
    assert scores.shape == (6,) and alpha.shape == (6, 5)
    assert torch.allclose(alpha.sum(1), torch.ones(6), atol=1e-5) and (alpha >= 0).all()
    assert {"gt_score", "rm_score"} <= set(metrics)


@pytest.mark.parametrize("scheme", ["plain", "credit", "dense"])
def test_short_grpo_run_updates_the_policy_and_logs_finite_metrics(tiny, scheme):
    codec, lm, rm = tiny
    policy, ref = Policy(copy.deepcopy(lm), codec.special_ids), copy.deepcopy(lm)
    rng = random.Random(0)
    cfg = GRPOConfig(steps=3, prompts_per_step=2, group_size=4, minibatch_size=4, epochs=2, scheme=scheme)
    before = [p.detach().clone() for p in policy.parameters()]
    hist = train(
        policy, ref, lambda n: codec.encode(task.sample_prompts(rng, n)), 6, make_score_fn(rm, codec), cfg, seed=0
    )
    assert len(hist) == 3
    for h in hist:
        assert all(math.isfinite(v) for v in h.values())
        assert {"gt_score", "rm_score", "kl", "pg_loss", "kl_loss", "clipfrac"} <= set(h)
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference policy
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert all(not p.requires_grad for p in ref.parameters())  # the reference is frozen


def test_train_rejects_an_unknown_scheme(tiny):
    codec, lm, rm = tiny
    with pytest.raises(ValueError, match="scheme"):
        train(
            Policy(lm, codec.special_ids),
            lm,
            lambda n: None,
            4,
            make_score_fn(rm, codec),
            GRPOConfig(scheme="oracle"),
            seed=0,
        )


# ---------------------------------------------------------------------------------------------- the study


def test_study_method_names():
    from dense_rlhf.study.grpo_study import kl_coef_of, parse_method

    assert parse_method("grpo-plain") == ("grpo", {"scheme": "plain"})
    assert parse_method("grpo-credit-0.5@kl0.15") == ("grpo", {"scheme": "credit", "credit_beta": 0.5, "kl_coef": 0.15})
    assert parse_method("grpo-dense-1") == ("grpo", {"scheme": "dense", "abc_beta": 1.0})
    assert parse_method("ppo-abc-0.8") == ("ppo", "abc-0.8")
    assert kl_coef_of("grpo-plain", 0.05) == 0.05 and kl_coef_of("grpo-plain@kl0.2", 0.05) == 0.2
    assert kl_coef_of("ppo-sparse", 0.05) is None
    for bad in ("grpo", "grpo-credit-x", "grpo-plain@klx", "ppo-sparse@kl0.1", "ppo-abc-0.3"):
        with pytest.raises(ValueError, match="unknown method"):
            parse_method(bad)


def test_study_threshold_is_plain_grpos_and_steps_are_counted_on_the_moving_average():
    from dense_rlhf.study.grpo_study import summarise

    def run(method, seed, scores, kl):
        return {"method": method, "seed": seed, "curves": {"gt_score": scores, "kl": kl}}

    n = 40
    ramp = [min(10.0, i / 2) for i in range(n)]  # reaches 10 at step 20
    fast = [min(10.0, i) for i in range(n)]  # reaches 10 at step 10
    results = [run("grpo-plain", s, ramp, [i / 2 for i in range(n)]) for s in (0, 1)]
    results += [run("grpo-dense-0.8", s, fast, [float(i) for i in range(n)]) for s in (0, 1)]
    results += [run("ppo-sparse", s, [0.0] * n, [0.0] * n) for s in (0, 1)]
    summary = summarise(results, ["grpo-plain", "grpo-dense-0.8", "ppo-sparse"], 0.05)
    (sec,) = summary["sections"]
    assert sec["kl_coef"] == 0.05 and sec["reference"] == "grpo-plain"
    assert sec["threshold"] == pytest.approx(0.8 * 10.0)  # SFT score 0, plain's final 10
    ma = [sum(fast[max(0, i - 4) : i + 1]) / len(fast[max(0, i - 4) : i + 1]) for i in range(n)]
    assert sec["rows"]["grpo-dense-0.8"]["steps_to_threshold"] == next(i for i, v in enumerate(ma) if v >= 8.0)
    assert sec["rows"]["ppo-sparse"]["steps_to_threshold"] is None
    assert sec["rows"]["grpo-plain"]["seeds_reaching"] == 2
    # score at KL 10: plain's MA KL first reaches 10 at step 22 (mean of i/2 over i = 18..22); its MA score there is
    # the mean of 9, 9.5, 10, 10, 10
    assert summary["methods"]["grpo-plain"]["score_at_kl"]["10"] == (pytest.approx(9.7), 2)
    assert summary["methods"]["ppo-sparse"]["score_at_kl"]["10"] == (None, 0)


def test_study_ratio_to_plain_handles_never_and_step_zero():
    from dense_rlhf.study.grpo_study import _versus_plain

    assert _versus_plain(40, 50, 100) == ("0.80", True)
    assert _versus_plain(None, 50, 100) == ("never", False)
    assert _versus_plain(40, None, 100)[1] is True
    assert _versus_plain(3, 0, 100) == ("undefined (plain at step 0)", False)
