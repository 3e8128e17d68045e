"""Every bad input is rejected with an error naming the argument; nothing is silently lost."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from conftest import DEVICES, make_case

import dense_rlhf
from dense_rlhf import _native

BACKENDS = [
    "reference",
    pytest.param("native", marks=pytest.mark.skipif(not _native.has_kernel("cpu"), reason="native CPU op not built")),
]


@pytest.fixture
def case():
    return make_case(3, 2, 8, prompt=2)


def call(attn, score, mask, **kwargs):
    return dense_rlhf.dense_rewards(attn, score, mask, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_shape_and_type_errors(case, backend):
    attn, score, mask, _ = case
    bad = [
        (TypeError, "attn must be a torch.Tensor", (attn.numpy(), score, mask), {}),
        (TypeError, "attn must be float16", (attn.long(), score, mask), {}),
        (ValueError, "attn must be \\[B, H, L, L\\]", (attn[0, 0, 0], score, mask), {}),
        (ValueError, "attn must be \\[B, H, L, L\\]", (attn[None], score, mask), {}),
        (ValueError, "square maps", (attn[..., :5, :], score, mask), {}),
        (ValueError, "mask has L=8", (attn[..., :7, :7], score, mask), {}),
        (ValueError, "mask has B=2 but attn/score have B=3", (attn, score, mask[:2]), {}),
        (ValueError, "score must be \\[B\\] or \\[B, 1\\] with B=3", (attn, score[:2], mask), {}),
        (ValueError, "score must be \\[B\\] or \\[B, 1\\]", (attn, score[:, None, None], mask), {}),
        (TypeError, "score must be a float tensor", (attn, score.long(), mask), {}),
        (TypeError, "score must be a torch.Tensor", (attn, 1.0, mask), {}),
        (TypeError, "mask must be bool or an integer", (attn, score, mask.float()), {}),
        (ValueError, "mask must be \\[B, L\\]", (attn, score, mask[0]), {}),
        (ValueError, "beta must be a number in \\[0, 1\\]", (attn, score, mask), {"beta": 1.5}),
        (ValueError, "beta must be a number in \\[0, 1\\]", (attn, score, mask), {"beta": -0.1}),
        (ValueError, "beta must be a number in \\[0, 1\\]", (attn, score, mask), {"beta": math.nan}),
        (TypeError, "reward_index must be an integer tensor", (attn, score, mask), {"reward_index": torch.zeros(3)}),
        (
            ValueError,
            "reward_index must be \\[B\\]=\\[3\\]",
            (attn, score, mask),
            {"reward_index": torch.zeros(2, dtype=torch.long)},
        ),
    ]
    for error, message, args, kwargs in bad:
        with pytest.raises(error, match=message):
            call(*args, backend=backend, **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_value_errors_name_the_rows(case, backend):
    attn, score, mask, _ = case
    empty = mask.clone()
    empty[1] = False
    with pytest.raises(ValueError, match=r"mask has no completion token.* rows \[1\]"):
        call(attn, score, empty, backend=backend)
    with pytest.raises(ValueError, match="mask must hold only 0 and 1"):
        call(attn, score, mask.long() * 2, backend=backend)
    nan_score = score.clone()
    nan_score[2] = math.nan
    with pytest.raises(ValueError, match=r"score is NaN or Inf in rows \[2\]"):
        call(attn, nan_score, mask, backend=backend)
    with pytest.raises(ValueError, match=r"reward_index is outside \[0, L\) in rows \[0\]"):
        call(attn, score, mask, reward_index=torch.tensor([8, 0, 7]), backend=backend)
    with pytest.raises(ValueError, match=r"reward_index is outside"):
        call(attn, score, mask, reward_index=torch.tensor([0, -1, 7]), backend=backend)
    last = torch.where(mask, torch.arange(8), -1).amax(1)
    for bad_value in (math.nan, math.inf):
        bad_attn = attn.clone()
        bad_attn[0, 1, last[0], last[0]] = bad_value
        with pytest.raises(ValueError, match=r"attn has NaN or Inf .* rows \[0\]"):
            call(bad_attn, score, mask, backend=backend)
    negative = attn.clone()
    negative[1, 0, last[1], last[1]] = -5.0  # the head sum at a completion token is < 0: not attention weights
    with pytest.raises(ValueError, match=r"attn has negative values .*attention weights are >= 0.* rows \[1\]"):
        call(negative, score, mask, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_outside_the_values_used_is_ignored(case, backend):
    attn, score, mask, _ = case
    poisoned = attn.clone()
    poisoned[~mask[:, None, None, :].expand_as(attn)] = math.nan  # prompt and padding columns
    last = torch.where(mask, torch.arange(8), -1).amax(1)
    keep = torch.ones_like(poisoned[:, 0, :, 0], dtype=torch.bool)
    keep[torch.arange(3), last] = False
    poisoned[keep[:, None, :, None].expand_as(attn)] = math.nan  # every row that is not the reward row
    torch.testing.assert_close(call(poisoned, score, mask, backend=backend), call(attn, score, mask, backend=backend))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_without_validation_the_output_never_holds_nan(device, backend):
    attn, score, mask, _ = make_case(6, 2, 8, prompt=2, device=device)
    last = torch.where(mask, torch.arange(8, device=device), -1).amax(1)
    mask[0] = False  # empty row: zeros
    score[1] = math.nan  # bad score: zeros
    attn[2, :, last[2], last[2]] = math.inf  # bad attention: sparse fallback
    index = last.clone()
    index[3] = 99  # bad reward index: sparse fallback
    attn[5, 0, last[5], last[5]] = -5.0  # negative attention: sparse fallback
    out = call(attn, score, mask, reward_index=index, backend=backend, validate=False)
    assert torch.isfinite(out).all()
    assert (out[0] == 0).all() and (out[1] == 0).all()
    for row in (2, 3, 5):
        expected = torch.zeros(8, device=device)
        expected[last[row]] = score[row]
        torch.testing.assert_close(out[row], expected)
    torch.testing.assert_close(out[4].sum(), score[4])


def test_devices_must_agree(case):
    attn, score, mask, _ = case
    with pytest.raises(ValueError, match="score is on meta"):
        call(attn, score.to("meta"), mask)
    with pytest.raises(ValueError, match="mask is on meta"):
        call(attn, score, mask.to("meta"))
    with pytest.raises(ValueError, match="reward_index is on meta"):
        call(attn, score, mask, reward_index=torch.zeros(3, dtype=torch.long, device="meta"))


@pytest.mark.skipif(not _native.is_built(), reason="native op not built")
def test_raw_op_checks_its_inputs(case):
    attn, score, mask, _ = case
    op = torch.ops.dense_rlhf.dense_rewards
    with pytest.raises(ValueError, match="mask must be a bool"):
        op(attn, score, mask.long(), 0.8, None)
    with pytest.raises(ValueError, match="score must be a float32"):
        op(attn, score.double(), mask, 0.8, None)
    with pytest.raises(ValueError, match="beta must be in"):
        op(attn, score, mask, 2.0, None)
    with pytest.raises(TypeError, match="attn must be float16"):
        op(attn.int(), score, mask, 0.8, None)
    with pytest.raises(ValueError, match="reward_index must be an int64"):
        op(attn, score, mask, 0.8, torch.zeros(3, dtype=torch.int32))


# ----------------------------------------------------------------------------------------- beta, everywhere


def _dense(beta, backend="reference"):
    attn, score, mask, _ = make_case(3, 2, 8, prompt=2)
    return dense_rlhf.dense_rewards(attn, score, mask, beta=beta, backend=backend)


def _prefix(beta):
    scores = torch.randn(3, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(3, 8, dtype=torch.bool)
    mask[:, 2:6] = True
    return dense_rlhf.prefix_rewards(scores, mask, beta=beta)


BETA_FUNCTIONS = {"dense_rewards reference": _dense, "prefix_rewards": _prefix}
if _native.has_kernel("cpu"):
    BETA_FUNCTIONS["dense_rewards native"] = lambda beta: _dense(beta, "native")


@pytest.mark.parametrize("function", list(BETA_FUNCTIONS))
def test_beta_accepts_any_real_number(function):
    """Configs read through NumPy or torch hand over NumPy scalars and 0-dim tensors."""
    rewards = BETA_FUNCTIONS[function]
    expected = rewards(0.5)
    for beta in (
        np.float32(0.5),
        np.float64(0.5),
        np.array(0.5),
        np.array(0.5, dtype=np.float16),
        torch.tensor(0.5),
        torch.tensor(0.5, dtype=torch.float64),
        torch.tensor(0.5).requires_grad_(),
        Fraction(1, 2),
    ):
        torch.testing.assert_close(rewards(beta), expected, rtol=0, atol=0, msg=f"beta={beta!r}")
    for whole in (0, 1, np.int64(1), torch.tensor(0), np.array(1, dtype=np.uint8)):
        torch.testing.assert_close(rewards(whole), rewards(float(whole)), rtol=0, atol=0, msg=f"beta={whole!r}")


@pytest.mark.parametrize("function", list(BETA_FUNCTIONS))
def test_beta_rejects_the_rest_naming_the_type(function):
    rewards = BETA_FUNCTIONS[function]
    wrong_type = [
        ("0.5", "got str"),
        (None, "got NoneType"),
        ([0.5], "got list"),
        (True, "got bool"),
        (np.bool_(True), "got numpy.bool"),
        (0.5 + 0j, "got complex"),
        (np.complex64(0.5), "got numpy.complex64"),
        (torch.tensor([0.5]), r"got torch.Tensor of shape \(1,\)"),
        (torch.tensor(True), "dtype torch.bool"),
        (np.array([0.5]), r"got numpy.ndarray of shape \(1,\)"),
    ]
    for beta, named in wrong_type:
        with pytest.raises(TypeError, match="beta must be a real number in \\[0, 1\\].*" + named):
            rewards(beta)
    for beta in (1.5, -0.1, math.nan, math.inf, np.float32(2.0), torch.tensor(-1.0), np.array(1.01)):
        with pytest.raises(ValueError, match="beta must be a number in \\[0, 1\\], got"):
            rewards(beta)


@pytest.mark.parametrize("function", ["dense_rewards", "prefix_rewards", "sparse_rewards", "uniform_rewards"])
def test_a_float64_score_beyond_float32_is_said_to_overflow_not_to_be_nan(function):
    mask = torch.tensor([[0, 1, 1], [0, 1, 1]], dtype=torch.bool)
    score = torch.tensor([1.0, 1e300], dtype=torch.float64)
    calls = {
        "dense_rewards": lambda: dense_rlhf.dense_rewards(torch.full((2, 3), 0.5), score, mask),
        "prefix_rewards": lambda: dense_rlhf.prefix_rewards(score[:, None].expand(2, 3), mask),
        "sparse_rewards": lambda: dense_rlhf.sparse_rewards(score, mask),
        "uniform_rewards": lambda: dense_rlhf.uniform_rewards(score, mask),
    }
    with pytest.raises(ValueError, match=rf"{function}: \w+ overflows float32 .*1e\+300\) in rows \[1\]"):
        calls[function]()
    unused = torch.tensor([[1e300, 1.0, 2.0], [1e300, 3.0, 4.0]], dtype=torch.float64)  # never read: no error
    torch.testing.assert_close(dense_rlhf.prefix_rewards(unused, mask, beta=1.0).sum(1), torch.tensor([2.0, 4.0]))
