"""The oracle reward methods (the task's true credit delivered the way ABC delivers its credit), the paper's PPO
settings on the command line, and the oracle study's statistics."""

import random
from dataclasses import replace

import pytest
import torch

pytest.importorskip("transformers")

from dense_rlhf.study import methods as M  # noqa: E402
from dense_rlhf.study import sentiment_task as task  # noqa: E402


def grammar_batch(n=64, seed=0):
    """Grammar texts with sentiment of every kind: most rows have credited tokens, some do not."""
    rng = random.Random(seed)
    words = [task.sample_words(rng, task.Style.random_for_preferences(rng)) for _ in range(n)]
    codec = task.Codec()
    return codec, codec.encode(words), words


def test_oracle_rewards_are_the_true_credit_and_sum_to_the_score():
    codec, seq, words = grammar_batch()
    credit = task.credits_of(codec, seq)
    score = torch.randn(seq.shape[0], generator=torch.Generator().manual_seed(0)) * 3
    for k in (1.0, 0.33):
        r = M.token_rewards(
            "oracle-0.8", score, None, None, None, task.PROMPT_LEN, task.COMPLETION_LEN, credit=credit, credit_scale=k
        )
        torch.testing.assert_close(r.sum(1), score, atol=1e-5, rtol=0)
        for b, w in enumerate(words):  # a plain loop over the task's own true_credit, word by word
            truth = task.true_credit(w[: task.PROMPT_WORDS], w[task.PROMPT_WORDS :])
            for t in range(task.COMPLETION_LEN - 1):
                assert r[b, t].item() == pytest.approx(0.8 * k * truth[t], abs=1e-6)
            assert r[b, -1].item() == pytest.approx(
                0.8 * k * truth[-1] + score[b].item() - 0.8 * k * sum(truth), abs=1e-5
            )
    assert (credit != 0).any(1).float().mean() > 0.8  # the batch does exercise credited tokens


def test_oracle_in_abcs_shape_spreads_the_score_by_absolute_credit():
    codec, seq, words = grammar_batch(seed=1)
    credit = task.credits_of(codec, seq)
    score = torch.randn(seq.shape[0], generator=torch.Generator().manual_seed(1)) * 3
    r = M.token_rewards("oracle-abs-0.8", score, None, None, None, task.PROMPT_LEN, task.COMPLETION_LEN, credit=credit)
    torch.testing.assert_close(r.sum(1), score, atol=1e-5, rtol=0)
    none = 0
    for b, w in enumerate(words):
        truth = [abs(c) for c in task.true_credit(w[: task.PROMPT_WORDS], w[task.PROMPT_WORDS :])]
        total = sum(truth)
        if total == 0:  # nothing credited: the sparse reward, as ABC's op does for a row summing to 0
            none += 1
            expected = [0.0] * (len(truth) - 1) + [score[b].item()]
        else:
            expected = [0.8 * score[b].item() * c / total for c in truth]
            expected[-1] += 0.2 * score[b].item()
        assert r[b].tolist() == pytest.approx(expected, abs=1e-5)
    # ABC's shape: every credited token gets the score's sign, whatever its credit's sign
    credited = credit != 0
    assert (torch.sign(r[credited]) == torch.sign(score[:, None].expand_as(r)[credited])).all()
    zero = torch.zeros(2, 5)
    torch.testing.assert_close(
        M.oracle_rewards(zero, torch.tensor([1.0, -2.0]), 0.8, abc_shape=True),
        torch.tensor([[0, 0, 0, 0, 1.0], [0, 0, 0, 0, -2.0]]),
    )
    assert none < len(words)


def test_oracle_names():
    assert M.oracle_spec("oracle-0.8") == (0.8, False)
    assert M.oracle_spec("oracle-abs-0.8") == (0.8, True)
    assert set(M.ORACLE_METHODS) <= set(M.ALL_METHODS) and not set(M.ORACLE_METHODS) & set(M.METHODS)


def test_oracle_score_fn_hands_ppo_the_true_credit_of_the_rollout():
    from dense_rlhf.rl.ppo import PolicyWithValue, rollout
    from dense_rlhf.study.models import SetupConfig, new_policy, new_reward_model

    torch.manual_seed(0)
    codec = task.Codec()
    cfg = SetupConfig(n_embd=32, rm_n_embd=32, n_layer=1, rm_n_layer=1, n_head=2, rm_n_head=2)
    lm, rm = new_policy(codec, cfg).eval(), new_reward_model(codec, cfg).eval()
    ro = rollout(
        PolicyWithValue(lm, codec.special_ids),
        lm,
        codec.encode(task.sample_prompts(random.Random(3), 8)),
        12,
        torch.Generator().manual_seed(3),
        1.0,
    )
    scale = M.rm_scale(rm, codec, 12)
    for method in M.ORACLE_METHODS:
        rewards, stats = M.make_score_fn(method, rm, codec)(ro)
        ids, _ = M.rm_inputs(codec, ro.seq)
        score = M.rm_forward(rm, ids, prefix=False).score
        beta, abc_shape = M.oracle_spec(method)
        expected = M.oracle_rewards(task.credits_of(codec, ro.seq), score, beta, abc_shape, scale=scale)
        torch.testing.assert_close(rewards, expected, atol=0, rtol=0)
        assert stats["rm_score"] == pytest.approx(score.mean().item())
        assert stats["gt_score"] == pytest.approx(task.scores_of(codec, ro.seq).mean().item())


def test_rm_scale_is_the_least_squares_slope_on_the_hidden_score():
    from dense_rlhf.study.models import SetupConfig, new_reward_model

    torch.manual_seed(0)
    codec = task.Codec()
    rm = new_reward_model(codec, SetupConfig(rm_n_embd=16, rm_n_layer=1, rm_n_head=2)).eval()
    k = M.rm_scale(rm, codec, 10, n=300, seed=5)
    rng = random.Random(5)  # the same texts, fitted with numpy
    words = [task.sample_words(rng, task.Style.random_for_preferences(rng), task.PROMPT_WORDS + 10) for _ in range(300)]
    seq = codec.encode(words)
    hidden = [task.true_score(w) for w in words]
    with torch.no_grad():
        score = rm(input_ids=M.rm_inputs(codec, seq)[0]).logits[:, 0].double().numpy()
    import numpy as np

    assert k == pytest.approx(np.polyfit(np.array(hidden), score, 1)[0], rel=1e-6)
    assert M.rm_scale(rm, codec, 10, n=300, seed=5) == k  # deterministic


# ------------------------------------------------------------------------------------------ the command line


def test_default_command_line_keeps_the_studys_ppo_exactly():
    from dense_rlhf.study.config import PPO, parse_args, ppo_settings

    assert ppo_settings(parse_args([])) == {"ours": PPO}
    got = ppo_settings(parse_args(["--steps", "7", "--kl-coef", "0.2", "--lr", "1e-3", "--batch-size", "8"]))
    assert got == {"ours": replace(PPO, steps=7, kl_coef=0.2, lr=1e-3, batch_size=8)}


def test_paper_settings_on_the_command_line():
    from dense_rlhf.study.config import PAPER_PPO, PPO, parse_args, ppo_settings

    paper = ppo_settings(parse_args(["--ppo", "paper"]))["paper"]
    assert paper == PAPER_PPO
    assert (paper.batch_size, paper.steps, paper.minibatch_size, paper.ppo_epochs) == (16, 150, 1, 4)
    assert (paper.kl_coef, paper.kl_target, paper.kl_horizon) == (0.2, 6.0, 10000.0)
    assert (paper.max_grad_norm, paper.adam_eps, paper.vf_coef, paper.lam, paper.gamma) == (None, 1e-8, 0.1, 0.95, 1.0)
    assert paper.lr == PPO.lr == 3e-4  # ours: trl's 1.41e-5 is for a pretrained GPT-2 (experiments/README.md)
    assert PPO.kl_target is None  # ours: a fixed coefficient
    assert ppo_settings(parse_args(["--ppo", "paper", "--steps", "3"]))["paper"] == replace(PAPER_PPO, steps=3)
    both = ppo_settings(parse_args(["--study", "oracle"]))
    assert both == {"ours": PPO, "paper": PAPER_PPO}
    with pytest.raises(SystemExit):
        ppo_settings(parse_args(["--ppo", "ours,paper"]))  # --study methods runs one setting
    with pytest.raises(SystemExit):
        ppo_settings(parse_args(["--ppo", "trl"]))


# ------------------------------------------------------------------------------------------ the study's statistics


def test_share_of_the_oracles_speed_up():
    from dense_rlhf.study.oracle import shares_of_oracle

    ratios = {
        "oracle-0.8": {"mean_curve_ratio": 0.5},
        "abc-0.8": {"mean_curve_ratio": 0.8},
        "prefix-0.8": {"mean_curve_ratio": 0.4},
        "uniform": {"mean_curve_ratio": None},
    }
    shares = shares_of_oracle(ratios, "oracle-0.8")
    assert shares["abc-0.8"] == pytest.approx(0.4) and shares["prefix-0.8"] == pytest.approx(1.2)
    assert shares["uniform"] is None
    ratios["oracle-0.8"]["mean_curve_ratio"] = 1.0  # the oracle no faster than sparse: no speed-up to share
    assert set(shares_of_oracle(ratios, "oracle-0.8").values()) == {None}
