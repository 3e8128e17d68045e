import math

import pytest
import torch

pytest.importorskip("transformers")

from dense_rlhf.rl.ppo import (
    AdaptiveKLController,
    FixedKLController,
    PolicyWithValue,
    PPOConfig,
    gae,
    generate,
    kl_controller,
    ppo_losses,
    response_logprobs,
    rollout,
    train,
    whiten,
)
from dense_rlhf.study import methods as M
from dense_rlhf.study import sentiment_task as task
from dense_rlhf.study.models import SetupConfig, new_policy, new_reward_model


def test_gae_matches_hand_computation():
    rewards = torch.tensor([[0.0, 0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25, 0.0]])
    adv, ret = gae(rewards, values, gamma=1.0, lam=0.5)
    # deltas: 0 + .25 - .5 = -.25, 0 + 0 - .25 = -.25, 1 - 0 = 1
    # A2 = 1, A1 = -.25 + .5 * 1 = .25, A0 = -.25 + .5 * .25 = -.125
    assert adv.tolist() == [[-0.125, 0.25, 1.0]]
    assert ret.tolist() == [[0.375, 0.5, 1.0]]
    adv1, ret1 = gae(rewards, torch.zeros(1, 3), gamma=1.0, lam=1.0)
    assert ret1.tolist() == [[1.0, 1.0, 1.0]]  # lam = 1: Monte-Carlo return-to-go


def test_ppo_losses_clip_both_ways():
    old = torch.zeros(1, 2)
    adv = torch.tensor([[1.0, -1.0]])
    ret = torch.tensor([[1.0, 1.0]])
    pg, vf, clipfrac = ppo_losses(old, old, ret, ret, adv, ret, 0.2, 0.2)
    assert pg.item() == pytest.approx(0.0) and vf.item() == 0.0 and clipfrac.item() == 0.0
    logp = torch.log(torch.tensor([[2.0, 2.0]]))  # ratio 2 for both tokens
    pg, _, clipfrac = ppo_losses(logp, old, ret, ret, adv, ret, 0.2, 0.2)
    # token 0 (A>0): max(-2, -1.2) = -1.2; token 1 (A<0): max(2, 1.2) = 2
    assert pg.item() == pytest.approx((-1.2 + 2.0) / 2)
    assert clipfrac.item() == 1.0
    _, vf, _ = ppo_losses(old, old, torch.tensor([[3.0, 3.0]]), torch.zeros(1, 2), adv, ret, 0.2, 0.2)
    # V moved 0 -> 3, clipped to 0.2: max((3-1)^2, (0.2-1)^2) = 4
    assert vf.item() == pytest.approx(0.5 * 4.0)


def test_whiten():
    x = torch.tensor([1.0, 2.0, 3.0, 6.0])
    w = whiten(x)
    assert w.mean().item() == pytest.approx(0.0, abs=1e-6) and w.std(unbiased=False).item() == pytest.approx(
        1.0, abs=1e-4
    )
    assert whiten(x, shift_mean=False).mean().item() == pytest.approx(x.mean().item())


def test_response_logprobs_alignment():
    seq = torch.tensor([[5, 6, 7, 8, 9]])
    logits = torch.full((1, 5, 10), -1e4)
    for pos in range(4):
        logits[0, pos, seq[0, pos + 1]] = 0.0  # position pos predicts token pos + 1
    lp = response_logprobs(logits, seq, prompt_len=3)
    assert lp.shape == (1, 2) and torch.allclose(lp, torch.zeros(1, 2))


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    codec = task.Codec()
    cfg = SetupConfig(n_embd=32, rm_n_embd=32, n_layer=1, rm_n_layer=1, n_head=2, rm_n_head=2)
    return codec, new_policy(codec, cfg).eval(), new_reward_model(codec, cfg).eval()


def test_generation_never_emits_special_tokens(tiny):
    codec, lm, _ = tiny
    policy = PolicyWithValue(lm, codec.special_ids)
    prompts = codec.encode(task.sample_prompts(__import__("random").Random(0), 8))
    seq = generate(policy, prompts, 10, torch.Generator().manual_seed(0))
    assert seq.shape == (8, task.PROMPT_LEN + 10)
    assert torch.equal(seq[:, : task.PROMPT_LEN], prompts)
    assert not torch.isin(seq[:, task.PROMPT_LEN :], torch.tensor(codec.special_ids)).any()


@pytest.mark.parametrize("method", M.METHODS + M.ORACLE_METHODS)
def test_token_rewards_conserve_the_score_and_align_to_the_response(tiny, method):
    codec, lm, rm = tiny
    policy = PolicyWithValue(lm, codec.special_ids)
    prompts = codec.encode(task.sample_prompts(__import__("random").Random(1), 6))
    ro = rollout(policy, lm, prompts, 8, torch.Generator().manual_seed(1), 1.0, M.capture_policy_attention)
    assert ro.captured.rows.shape == (6, lm.config.n_head, task.PROMPT_LEN + 8)
    ids, mask = M.rm_inputs(codec, ro.seq)
    assert ids.shape[1] == ro.seq.shape[1] + 1 and (ids[:, -1] == codec.eos_id).all()
    assert mask.sum(1).tolist() == [8] * 6 and not mask[:, : task.PROMPT_LEN].any() and not mask[:, -1].any()
    fwd = M.rm_forward(rm, ids)
    score, rows = fwd.score, fwd.rows
    assert rows.shape == (6, rm.config.n_head, ids.shape[1]) and fwd.prefix_scores.shape == ids.shape
    assert (fwd.reward_index == ids.shape[1] - 1).all()  # [EOS]
    torch.testing.assert_close(fwd.prefix_scores[:, -1], score, atol=0, rtol=0)
    r = M.token_rewards(
        method,
        score,
        rows,
        mask,
        ro.captured.rows,
        task.PROMPT_LEN,
        8,
        fwd.prefix_scores,
        fwd.reward_index,
        task.credits_of(codec, ro.seq),
    )
    assert r.shape == (6, 8)
    assert torch.allclose(r.sum(1), score, atol=1e-5)
    if method == "sparse":
        assert torch.equal(r[:, -1], score) and (r[:, :-1] == 0).all()
    if method == "uniform":
        assert torch.allclose(r, score[:, None].expand(6, 8) / 8)
    if method == "prefix-1.0":  # token t: s(prefix through t) - s(prefix before t); the last also the step to [EOS]
        s = fwd.prefix_scores[:, task.PROMPT_LEN - 1 : -1]
        expected = s[:, 1:] - s[:, :-1]
        expected[:, 0] = s[:, 1]
        expected[:, -1] += score - s[:, -1]
        torch.testing.assert_close(r, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("length", [10, 80])
def test_longer_completions_fit_the_models_and_the_loop(length):
    """The length study's layouts: positions for [BOS] + prompt + completion + [EOS], a PPO step, every method."""
    from dense_rlhf.study.models import n_positions

    assert n_positions(SetupConfig()) == 64  # the 20-token models (and their cache keys) are unchanged
    codec = task.Codec()
    cfg = SetupConfig(completion_len=length, n_embd=16, rm_n_embd=16, n_layer=1, rm_n_layer=1, n_head=2, rm_n_head=2)
    lm, rm = new_policy(codec, cfg).eval(), new_reward_model(codec, cfg).eval()
    assert lm.config.n_positions >= task.PROMPT_LEN + length + 1 <= rm.config.n_positions
    words = task.sft_texts(0, 3, length)
    assert all(len(w) == task.PROMPT_WORDS + length for w in words)
    assert task.credits_of(codec, codec.encode(words)).shape == (3, length)
    import copy
    import random

    rng = random.Random(0)
    cfg_ppo = PPOConfig(steps=1, batch_size=4, minibatch_size=2, ppo_epochs=1)
    for method in ("sparse", "abc-0.8", "prefix-0.8", "uniform"):
        policy = PolicyWithValue(copy.deepcopy(lm), codec.special_ids)
        hist = train(
            policy,
            lm,
            lambda n: codec.encode(task.sample_prompts(rng, n)),
            length,
            M.make_score_fn(method, rm, codec),
            cfg_ppo,
            seed=0,
        )
        assert all(math.isfinite(v) for v in hist[0].values())


@pytest.mark.parametrize("method", M.ALIGNED_METHODS)
def test_aligned_methods_reward_the_policys_tokens_through_the_chat_reward_model(tiny, method):
    """The reward model with its own byte-level BPE tokenizer and chat template: rewards on the policy's word
    tokens, summing to its score; ABC's dense part is its attention projected from the BPE pieces."""
    from dense_rlhf.study.models import build_rm_tokenizer, new_chat_reward_model, rm_chat

    codec, lm, _ = tiny
    rm_tokenizer = build_rm_tokenizer(0)
    cfg = SetupConfig(rm_n_embd=32, rm_n_head=2)
    rm = new_chat_reward_model(rm_tokenizer, cfg).eval()
    policy = PolicyWithValue(lm, codec.special_ids)
    prompts = codec.encode(task.sample_prompts(__import__("random").Random(2), 5))
    ro = rollout(policy, lm, prompts, 8, torch.Generator().manual_seed(2), 1.0)
    score_fn = M.make_score_fn(method, None, codec, (rm_tokenizer, rm))
    rewards, stats = score_fn(ro)
    score, dense = M.aligned_rewards((rm_tokenizer, rm), codec, ro.seq, beta=1.0)
    assert rewards.shape == dense.shape == (5, 8)
    torch.testing.assert_close(rewards.sum(1), score, atol=1e-5, rtol=0)
    assert stats["rm_score"] == pytest.approx(score.mean().item(), abs=1e-6)
    if method == "bpe-sparse":
        assert torch.equal(rewards[:, -1], score) and (rewards[:, :-1] == 0).all()
    else:
        torch.testing.assert_close(
            rewards,
            0.8 * dense + 0.2 * torch.nn.functional.one_hot(torch.full((5,), 7), 8) * score[:, None],
            atol=1e-5,
            rtol=0,
        )
    words = codec.decode(ro.seq[:1])[0]
    rendered = rm_tokenizer.apply_chat_template(
        rm_chat(words[1 : task.PROMPT_LEN], words[task.PROMPT_LEN :]), tokenize=False
    )
    with torch.no_grad():
        direct = rm(**rm_tokenizer(rendered, add_special_tokens=False, return_tensors="pt")).logits[0, 0]
    assert float(score[0]) == pytest.approx(float(direct), abs=1e-5)  # the RM read the rendered chat


def test_capture_rows_match_eager_attention(tiny):
    codec, _, rm = tiny
    ids, _ = M.rm_inputs(codec, codec.encode(task.sft_texts(0, 4)))
    _, rows = M.score_with_attention(rm, ids)
    rm.config._attn_implementation = "eager"
    try:
        with torch.no_grad():
            att = rm(input_ids=ids, output_attentions=True).attentions[-1][:, :, -1, :]
    finally:
        rm.config._attn_implementation = "sdpa"
    assert torch.allclose(rows, att, atol=1e-5)


def test_the_plain_rollout_captures_nothing_and_the_capture_changes_no_number(tiny):
    """The rollout hook is optional and off by default; the policy's forward runs inside it, and what it returns on
    entering is the rollout's ``captured``. ABC-D's hook (the study's) leaves every number of the rollout the same."""
    import contextlib

    codec, lm, rm = tiny
    policy = PolicyWithValue(lm, codec.special_ids)
    prompts = codec.encode(task.sample_prompts(__import__("random").Random(4), 4))
    plain = rollout(policy, lm, prompts, 6, torch.Generator().manual_seed(4), 1.0)
    captured = rollout(policy, lm, prompts, 6, torch.Generator().manual_seed(4), 1.0, M.capture_policy_attention)
    assert plain.captured is None and captured.captured.rows.shape == (4, lm.config.n_head, task.PROMPT_LEN + 6)
    for name in ("seq", "old_logp", "ref_logp", "old_values"):
        assert torch.equal(getattr(plain, name), getattr(captured, name)), name
    with pytest.raises(ValueError, match="rollout_hook"):
        M.make_score_fn("abcd", rm, codec)(plain)
    rewards, _ = M.make_score_fn("abcd", rm, codec)(captured)
    assert rewards.shape == (4, 6)
    assert M.rollout_hook("abcd") is M.capture_policy_attention and M.rollout_hook("abc-0.8") is None

    calls = []

    @contextlib.contextmanager
    def hook(model, seq):
        calls.append((model, seq.shape))
        handle = model.register_forward_hook(lambda module, args, out: calls.append("forward"))
        yield "mine"
        handle.remove()

    ro = rollout(policy, lm, prompts, 6, torch.Generator().manual_seed(4), 1.0, hook)
    assert ro.captured == "mine" and calls == [(lm, (4, task.PROMPT_LEN + 6)), "forward"]  # the policy's one forward


def tiny_llama(vocab_size: int, bos: int, eos: int, pad: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        bos_token_id=bos,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    return LlamaForCausalLM(config).eval()


def test_ppo_trains_a_llama_policy(tiny):
    """Any causal LM: the value head is sized from the config's hidden_size (Llama has no n_embd), and a real
    PPO run with ABC's rewards from the GPT-2 reward model updates the Llama policy, with ABC-D's capture too."""
    import copy
    import random

    codec, _, rm = tiny
    lm = tiny_llama(codec.vocab_size, codec.bos_id, codec.eos_id, codec.pad_id)
    assert not hasattr(lm.config, "n_embd")
    policy = PolicyWithValue(copy.deepcopy(lm), codec.special_ids)
    assert policy.v_head.in_features == 48
    prompts = codec.encode(task.sample_prompts(random.Random(5), 4))
    logits, values = policy(prompts)
    assert logits.shape == (4, task.PROMPT_LEN, codec.vocab_size) and values.shape == (4, task.PROMPT_LEN)
    assert (values == 0).all()  # the head starts at zero
    before = [p.detach().clone() for p in policy.parameters()]
    rng = random.Random(0)
    cfg = PPOConfig(steps=2, batch_size=4, minibatch_size=2, ppo_epochs=2)
    for method in ("abc-0.8", "abcd"):
        hist = train(
            policy,
            lm,
            lambda n: codec.encode(task.sample_prompts(rng, n)),
            6,
            M.make_score_fn(method, rm, codec),
            cfg,
            seed=0,
            rollout_hook=M.rollout_hook(method),
        )
        assert len(hist) == 2 and all(math.isfinite(v) for h in hist for v in h.values())
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert policy.v_head.weight.abs().sum() > 0  # the value head learned
    ro = rollout(policy, lm, prompts, 5, torch.Generator().manual_seed(0), 1.0, M.capture_policy_attention)
    assert ro.captured.rows.shape == (4, 4, task.PROMPT_LEN + 5)  # Llama's 4 query heads (2 key-value heads)
    torch.testing.assert_close(ro.captured.rows.sum(-1), torch.ones(4, 4))


def test_the_value_head_reads_the_text_config():
    """A config that keeps its language model's settings in a text config (multimodal models) sizes the head
    from there."""
    from dense_rlhf.rl.common import text_config

    class Config:
        vocab_size = 11

        def get_text_config(self):
            return type("TextConfig", (), {"hidden_size": 24, "vocab_size": 11})()

    class LM(torch.nn.Module):
        config = Config()

    assert text_config(LM()).hidden_size == 24
    assert PolicyWithValue(LM(), [0]).v_head.in_features == 24


def test_short_ppo_run_updates_the_policy_and_logs_finite_metrics(tiny):
    codec, lm, rm = tiny
    import copy
    import random

    policy = PolicyWithValue(copy.deepcopy(lm), codec.special_ids)
    rng = random.Random(0)
    cfg = PPOConfig(steps=3, batch_size=8, minibatch_size=4, ppo_epochs=2)
    before = [p.detach().clone() for p in policy.parameters()]
    hist = train(
        policy,
        lm,
        lambda n: codec.encode(task.sample_prompts(rng, n)),
        6,
        M.make_score_fn("abc-0.8", rm, codec),
        cfg,
        seed=0,
    )
    assert len(hist) == 3
    for h in hist:
        assert all(math.isfinite(v) for v in h.values())
        assert {"gt_score", "rm_score", "kl", "pg_loss", "vf_loss"} <= set(h)
    assert hist[0]["kl"] == pytest.approx(0.0, abs=1e-5)  # the first rollout is the reference policy
    assert any(not torch.equal(a, b) for a, b in zip(before, policy.parameters()))
    assert all(not p.requires_grad for p in lm.parameters())  # the reference is frozen


# ------------------------------------------------------------------------------------------ KL controllers


def trl_074_update(coef, kl, target, horizon, n):
    """trl 0.7.4's AdaptiveKLController.update, written out:
    coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n / horizon)."""
    error = kl / target - 1
    error = 0.2 if error > 0.2 else (-0.2 if error < -0.2 else error)
    return coef * (1 + error * n / horizon)


def test_adaptive_kl_controller_matches_trls_formula_by_hand():
    ctl = AdaptiveKLController(0.2, 6.0, 10000.0)
    ctl.update(12.0, 16)  # error 1 -> clipped to 0.2: 0.2 * (1 + 0.2 * 16 / 10000)
    assert ctl.value == pytest.approx(0.2 * 1.00032, rel=1e-15)
    ctl = AdaptiveKLController(0.2, 6.0, 10000.0)
    ctl.update(6.6, 16)  # error 0.1, inside the clip
    assert ctl.value == pytest.approx(0.2 * (1 + 0.1 * 16 / 10000), rel=1e-15)
    ctl = AdaptiveKLController(0.2, 6.0, 10000.0)
    ctl.update(0.0, 16)  # error -1 -> -0.2
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 16 / 10000), rel=1e-15)
    ctl.update(6.0, 16)  # at the target: unchanged
    assert ctl.value == pytest.approx(0.2 * (1 - 0.2 * 16 / 10000), rel=1e-15)
    # the paper's run: batch 16, 150 steps, KL always far above the target moves 0.2 by at most 4.9%
    ctl = AdaptiveKLController(0.2, 6.0, 10000.0)
    for _ in range(150):
        ctl.update(100.0, 16)
    assert ctl.value == pytest.approx(0.2 * 1.00032**150) and 0.2098 < ctl.value < 0.2099
    with pytest.raises(ValueError, match="kl_target"):
        AdaptiveKLController(0.2, 0.0, 10000.0)


def test_adaptive_kl_controller_matches_trls_formula_on_random_sequences():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies

    @hypothesis.given(
        st.floats(1e-3, 1.0),
        st.floats(0.5, 20.0),
        st.floats(1e3, 1e5),
        st.integers(1, 512),
        st.lists(st.floats(-5.0, 200.0), min_size=1, max_size=30),
    )
    @hypothesis.settings(max_examples=200, deadline=None)
    def check(init, target, horizon, n, kls):
        ctl, expected = AdaptiveKLController(init, target, horizon), init
        for kl in kls:
            ctl.update(kl, n)
            expected = trl_074_update(expected, kl, target, horizon, n)
            assert ctl.value == pytest.approx(expected, rel=1e-12)
            assert ctl.value > 0

    check()


def test_kl_controller_of_a_config():
    fixed = kl_controller(PPOConfig())
    assert isinstance(fixed, FixedKLController) and fixed.value == 0.05
    fixed.update(1e6, 32)
    assert fixed.value == 0.05
    adaptive = kl_controller(PPOConfig(kl_coef=0.2, kl_target=6.0, kl_horizon=100.0))
    assert isinstance(adaptive, AdaptiveKLController)
    assert (adaptive.value, adaptive.target, adaptive.horizon) == (0.2, 6.0, 100.0)


def test_training_uses_and_updates_the_adaptive_coefficient(tiny, monkeypatch):
    """Each step's rewards carry the coefficient from before the update; the next step's coefficient is trl's
    update of it with this step's logged KL and batch size. Also runs trl's minibatch of 1 without clipping."""
    import copy
    import random

    from dense_rlhf.rl import ppo as ppo_module

    codec, lm, rm = tiny
    seen = []
    real_gae = ppo_module.gae

    def spy(rewards, values, gamma, lam):
        seen.append(rewards.clone())
        return real_gae(rewards, values, gamma, lam)

    monkeypatch.setattr(ppo_module, "gae", spy)
    scores = []

    def score_fn(ro):
        s = torch.linspace(-1.0, 1.0, ro.seq.shape[0])[:, None].expand(-1, 6).contiguous()
        scores.append(s)
        return s, {}

    kls = []

    def capture_kl(step, stats):
        kls.append(stats["kl"])

    # horizon 8: each step moves the coefficient by up to 20% x 4 / 8 = 10%, visibly
    cfg = PPOConfig(
        steps=4,
        batch_size=4,
        minibatch_size=1,
        ppo_epochs=1,
        kl_coef=0.2,
        kl_target=0.01,
        kl_horizon=8.0,
        max_grad_norm=None,
        adam_eps=1e-8,
        lr=1e-2,
    )
    policy = PolicyWithValue(copy.deepcopy(lm), codec.special_ids)
    rng = random.Random(0)
    hist = train(
        policy, lm, lambda n: codec.encode(task.sample_prompts(rng, n)), 6, score_fn, cfg, seed=0, on_step=capture_kl
    )
    coefs = [h["kl_coef"] for h in hist]
    assert coefs[0] == 0.2
    for i in range(3):
        assert coefs[i + 1] == pytest.approx(trl_074_update(coefs[i], kls[i], 0.01, 8.0, 4), rel=1e-12)
    assert len(set(coefs)) == 4  # it moved every step
    for rewards, s, coef, kl in zip(seen, scores, coefs, kls):
        # r_t = s_t - coef * kl_t: recover the per-token KL and check its batch-mean sum is the logged KL
        per_token = (s - rewards) / coef
        assert per_token.sum(1).mean().item() == pytest.approx(kl, rel=1e-4, abs=1e-6)


# ------------------------------------------------------------------------------------ the shared minibatch update


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_minibatch_update_is_the_written_out_loop(max_grad_norm):
    """``common.minibatch_update`` (PPO's and GRPO's update) against the loop written out: per epoch a fresh
    permutation from the generator, one Adam step per minibatch (the last one short), optional clipping, the
    logged terms averaged over the updates, eval mode after."""
    from dense_rlhf.rl.common import TrainerState, minibatch_update

    x, y = torch.randn(10, 3, generator=torch.Generator().manual_seed(0)), torch.randn(10)

    def make():
        torch.manual_seed(1)
        model = torch.nn.Linear(3, 1)
        return model, torch.optim.Adam(model.parameters(), lr=0.1)

    model, opt = make()
    state = TrainerState(model, None, opt, torch.Generator().manual_seed(2))
    logged = []

    def loss_of(rows):
        loss = ((model(x[rows]).squeeze(-1) - y[rows]) ** 2).mean()
        logged.append(loss.item())
        return loss, {"loss": loss, "rows": torch.tensor(float(len(rows)))}

    stats = minibatch_update(state, 10, 4, 3, max_grad_norm, loss_of)
    assert not model.training and len(logged) == 9  # 3 epochs of minibatches of 4, 4 and 2
    assert stats["loss"] == pytest.approx(sum(logged) / 9) and stats["rows"] == pytest.approx(30 / 9)

    ref, ref_opt = make()
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        order = torch.randperm(10, generator=gen)
        for start in range(0, 10, 4):
            rows = order[start : start + 4]
            loss = ((ref(x[rows]).squeeze(-1) - y[rows]) ** 2).mean()
            ref_opt.zero_grad()
            loss.backward()
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(ref.parameters(), max_grad_norm)
            ref_opt.step()
    for a, b in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
