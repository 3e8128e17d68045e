"""prefix_rewards: against a plain per-row loop, conservation, beta mixing, bad inputs, torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import DEVICES
from hypothesis import given, settings
from hypothesis import strategies as st

import dense_rlhf

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def naive_prefix_rewards(scores, mask, beta, reward_index=None):
    """The issue's definition, one row at a time in float64 from the float32 scores."""
    scores = scores.float().double()
    out = torch.zeros(scores.shape, dtype=torch.float64)
    for b in range(scores.shape[0]):
        positions = mask[b].nonzero().flatten().tolist()
        r = positions[-1] if reward_index is None else int(reward_index[b])
        s = scores[b]
        dense = {}
        for k, c in enumerate(positions):
            dense[c] = s[c] - (s[positions[k - 1]] if k > 0 else 0.0)
        dense[positions[-1]] += s[r] - s[positions[-1]]
        for c in positions:
            out[b, c] = beta * dense[c] + (1 - beta) * s[r] * (c == positions[-1])
    return out


def random_case(batch, length, *, seed, gaps=True, padding="right", prompt=0, dtype=torch.float32, scale=3.0):
    """Random prefix scores and a completion mask with at least one token per row (gaps or contiguous)."""
    g = torch.Generator().manual_seed(seed)
    scores = (torch.randn(batch, length, generator=g) * scale).to(dtype)
    mask = torch.zeros(batch, length, dtype=torch.bool)
    for b in range(batch):
        used = int(torch.randint(1, length + 1, (1,), generator=g))
        start = 0 if padding == "right" else length - used
        first = start + min(prompt, used - 1)
        if gaps:
            mask[b, first : start + used] = torch.rand(start + used - first, generator=g) > 0.4
        else:
            mask[b, first : start + used] = True
        mask[b, start + used - 1] = True
    return scores, mask


def fixed_case(batch):
    """Prompt of 2, completions of 3 to 6 tokens from position 2, right padding: every row has 2+ tokens."""
    scores = torch.randn(batch, 8, generator=torch.Generator().manual_seed(batch)) * 3
    mask = torch.zeros(batch, 8, dtype=torch.bool)
    for b in range(batch):
        mask[b, 2 : 5 + b % 4] = True
    return scores, mask


def row_scale(scores):
    return scores.float().abs().amax(1, keepdim=True).clamp(min=1.0)


@settings(max_examples=200, deadline=None)
@given(
    batch=st.integers(1, 6),
    length=st.integers(1, 24),
    dtype=st.sampled_from(DTYPES),
    padding=st.sampled_from(["left", "right"]),
    prompt=st.integers(0, 6),
    gaps=st.booleans(),
    with_reward_index=st.booleans(),
    beta=st.sampled_from([0.0, 0.25, 0.8, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_matches_the_naive_loop(batch, length, dtype, padding, prompt, gaps, with_reward_index, beta, seed):
    scores, mask = random_case(batch, length, seed=seed, gaps=gaps, padding=padding, prompt=prompt, dtype=dtype)
    index = None
    if with_reward_index:
        index = torch.randint(0, length, (batch,), generator=torch.Generator().manual_seed(seed + 1))
    out = dense_rlhf.prefix_rewards(scores, mask, beta=beta, reward_index=index)
    expected = naive_prefix_rewards(scores, mask, beta, index)
    assert out.dtype == torch.float32 and out.shape == (batch, length)
    scale = row_scale(scores)
    torch.testing.assert_close((out / scale).double(), expected / scale, rtol=0, atol=2e-6)
    assert (out[~mask] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_reward_index", [False, True])
def test_conservation(device, with_reward_index):
    scores, mask = random_case(64, 200, seed=3, prompt=20)
    index = torch.randint(0, 200, (64,), generator=torch.Generator().manual_seed(4)) if with_reward_index else None
    last = torch.where(mask, torch.arange(200), -1).amax(1)
    r = last if index is None else index
    for beta in (0.0, 0.5, 0.8, 1.0):
        out = dense_rlhf.prefix_rewards(
            scores.to(device), mask.to(device), beta=beta, reward_index=None if index is None else index.to(device)
        )
        torch.testing.assert_close(out.sum(1).cpu(), scores[torch.arange(64), r], rtol=1e-5, atol=1e-5)


def test_hand_computed_rows():
    s = torch.tensor([[9.0, 1.0, 3.0, 2.0, 7.0], [0.5, -1.0, 4.0, 4.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [0, 1, 0, 1, 0]])
    # row 0: 1, 3-1, 2-3; row 1 (gap at 2): -1, 4-(-1)
    torch.testing.assert_close(
        dense_rlhf.prefix_rewards(s, mask, beta=1.0),
        torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.0], [0.0, -1.0, 0.0, 5.0, 0.0]]),
    )
    # score read one position after the completion (an appended EOS): s[4] - s[3] is added to the last token
    at_eos = dense_rlhf.prefix_rewards(s, mask, beta=1.0, reward_index=torch.tensor([4, 4]))
    torch.testing.assert_close(at_eos, torch.tensor([[0.0, 1.0, 2.0, 4.0, 0.0], [0.0, -1.0, 0.0, 10.0, 0.0]]))
    # beta 0.5: half of the dense part plus half of the score on the last token
    torch.testing.assert_close(
        dense_rlhf.prefix_rewards(s, mask, beta=0.5),
        torch.tensor([[0.0, 0.5, 1.0, 0.5, 0.0], [0.0, -0.5, 0.0, 4.5, 0.0]]),
    )


def test_beta_mixes_with_the_sparse_reward_as_dense_rewards_does():
    scores, mask = random_case(8, 30, seed=5, prompt=4)
    last = torch.where(mask, torch.arange(30), -1).amax(1)
    score = scores[torch.arange(8), last]
    sparse = dense_rlhf.prefix_rewards(scores, mask, beta=0.0)
    torch.testing.assert_close(sparse, dense_rlhf.sparse_rewards(score, mask))
    full = dense_rlhf.prefix_rewards(scores, mask, beta=1.0)
    torch.testing.assert_close(
        dense_rlhf.prefix_rewards(scores, mask, beta=0.3), 0.3 * full + 0.7 * sparse, rtol=1e-6, atol=1e-6
    )


def test_single_token_and_constant_scores():
    """One completion token gets the score; a flat score line gives everything to the first token."""
    s = torch.tensor([[2.0, 5.0, 5.0, 5.0]])
    torch.testing.assert_close(
        dense_rlhf.prefix_rewards(s, torch.tensor([[0, 0, 0, 1]]), beta=1.0), torch.tensor([[0.0, 0.0, 0.0, 5.0]])
    )
    torch.testing.assert_close(
        dense_rlhf.prefix_rewards(s, torch.tensor([[0, 1, 1, 1]]), beta=1.0), torch.tensor([[0.0, 5.0, 0.0, 0.0]])
    )


def test_values_outside_the_positions_used_are_ignored():
    scores, mask = random_case(5, 16, seed=6, prompt=3)
    poisoned = scores.clone()
    poisoned[~mask] = math.nan
    index = torch.where(mask, torch.arange(16), -1).amax(1)
    torch.testing.assert_close(
        dense_rlhf.prefix_rewards(poisoned, mask, reward_index=index), dense_rlhf.prefix_rewards(scores, mask)
    )


@pytest.mark.parametrize("device", DEVICES)
def test_strided_inputs_integer_mask_and_no_grad(device):
    scores, mask = random_case(6, 20, seed=8, prompt=2)
    wide = torch.randn(6, 40, device=device)
    wide[:, ::2] = scores.to(device)
    strided = wide[:, ::2].requires_grad_(False)
    assert not strided.is_contiguous()
    out = dense_rlhf.prefix_rewards(strided, mask.long().to(device), beta=0.8)
    torch.testing.assert_close(out.cpu(), dense_rlhf.prefix_rewards(scores, mask, beta=0.8))
    leaf = scores.clone().requires_grad_(True)
    assert not dense_rlhf.prefix_rewards(leaf, mask).requires_grad


def test_shape_and_type_errors():
    scores, mask = random_case(3, 8, seed=9, prompt=2)
    bad = [
        (TypeError, "prefix_scores must be a torch.Tensor", (scores.numpy(), mask), {}),
        (TypeError, "prefix_scores must be float16", (scores.long(), mask), {}),
        (ValueError, "prefix_scores must be \\[B, L\\]", (scores[0], mask), {}),
        (ValueError, "prefix_scores must be \\[B, L\\]", (scores[None], mask), {}),
        (ValueError, "mask \\(3, 7\\) and prefix_scores \\(3, 8\\) must have the same", (scores, mask[:, :7]), {}),
        (ValueError, "mask \\(2, 8\\) and prefix_scores \\(3, 8\\)", (scores, mask[:2]), {}),
        (TypeError, "mask must be bool or an integer", (scores, mask.float()), {}),
        (TypeError, "mask must be a torch.Tensor", (scores, mask.tolist()), {}),
        (ValueError, "mask must be \\[B, L\\]", (scores, mask[0]), {}),
        (ValueError, "beta must be a number in \\[0, 1\\], got 1.5", (scores, mask), {"beta": 1.5}),
        (ValueError, "beta must be a number in \\[0, 1\\], got nan", (scores, mask), {"beta": math.nan}),
        (TypeError, "beta must be a real number .* got str", (scores, mask), {"beta": "0.8"}),
        (TypeError, "reward_index must be an integer tensor", (scores, mask), {"reward_index": torch.zeros(3)}),
        (TypeError, "reward_index must be a torch.Tensor", (scores, mask), {"reward_index": [1, 2, 3]}),
        (
            ValueError,
            "reward_index must be \\[B\\]=\\[3\\]",
            (scores, mask),
            {"reward_index": torch.zeros(2, dtype=torch.long)},
        ),
    ]
    for error, message, args, kwargs in bad:
        with pytest.raises(error, match=message):
            dense_rlhf.prefix_rewards(*args, **kwargs)


def test_value_errors_name_the_rows():
    scores, mask = fixed_case(4)
    last = torch.where(mask, torch.arange(8), -1).amax(1)
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"prefix_rewards: mask has no completion token.* rows \[1\]"):
        dense_rlhf.prefix_rewards(scores, empty)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        dense_rlhf.prefix_rewards(scores, mask.long() * 2)
    with pytest.raises(ValueError, match=r"reward_index is outside \[0, L\) in rows \[0, 3\]"):
        dense_rlhf.prefix_rewards(scores, mask, reward_index=torch.tensor([8, 0, 7, -1]))
    at_score = scores.clone()
    at_score[2, last[2]] = math.inf
    with pytest.raises(ValueError, match=r"prefix_scores is NaN or Inf at the reward position in rows \[2\]"):
        dense_rlhf.prefix_rewards(at_score, mask)
    first = mask.long().argmax(1)
    inside = scores.clone()
    inside[3, first[3]] = math.nan
    with pytest.raises(ValueError, match=r"prefix_scores has NaN or Inf at completion positions in rows \[3\]"):
        dense_rlhf.prefix_rewards(inside, mask)


@pytest.mark.parametrize("device", DEVICES)
def test_without_validation_the_output_never_holds_nan(device):
    scores, mask = fixed_case(5)
    last = torch.where(mask, torch.arange(8), -1).amax(1)
    first = mask.long().argmax(1)
    scores[4, :] = 0.0
    scores[4, first[4]] = 1.0
    mask[0] = False  # empty row: zeros
    index = last.clone()
    index[1] = 99  # bad reward index: no score to give, zeros
    scores[2, last[2]] = math.nan  # bad score: zeros
    scores[3, first[3]] = math.inf  # bad completion score: sparse fallback
    out = dense_rlhf.prefix_rewards(
        scores.to(device), mask.to(device), reward_index=index.to(device), validate=False
    ).cpu()
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1] == 0).all() and (out[2] == 0).all()
    expected = torch.zeros(8)
    expected[last[3]] = scores[3, last[3]]
    torch.testing.assert_close(out[3], expected)
    torch.testing.assert_close(out[4].sum(), torch.tensor(scores[4, last[4]].item()))


def test_devices_must_agree():
    scores, mask = random_case(3, 8, seed=12)
    with pytest.raises(ValueError, match="mask is on meta"):
        dense_rlhf.prefix_rewards(scores, mask.to("meta"))
    with pytest.raises(ValueError, match="reward_index is on meta"):
        dense_rlhf.prefix_rewards(scores, mask, reward_index=torch.zeros(3, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()

    def rewards(scores, mask, index):
        return dense_rlhf.prefix_rewards(scores, mask, beta=0.8, reward_index=index, validate=False) * 2.0

    compiled = torch.compile(rewards, fullgraph=True, backend="aot_eager" if device == "cpu" else "inductor")
    scores, mask = random_case(4, 12, seed=13, prompt=2)
    index = torch.tensor([11, 3, 5, 20])  # row 3 out of range: zeros, no raise, no sync
    scores, mask, index = scores.to(device), mask.to(device), index.to(device)
    torch.testing.assert_close(compiled(scores, mask, index), rewards(scores, mask, index))
    assert (compiled(scores, mask, index)[3] == 0).all()
