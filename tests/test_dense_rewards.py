"""dense_rewards: native kernels against the reference, the paper's formula, conservation and edge cases."""

from __future__ import annotations

import pytest
import torch
from conftest import DEVICES, make_case
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dense_rlhf
from dense_rlhf import _native

LAYOUTS = ["maps", "rows", "row"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
needs_native_cpu = pytest.mark.skipif(not _native.has_kernel("cpu"), reason="native CPU op not built")


def both_backends(attn, score, mask, **kwargs):
    native = dense_rlhf.dense_rewards(attn, score, mask, backend="native", **kwargs)
    reference = dense_rlhf.dense_rewards(attn, score, mask, backend="reference", **kwargs)
    return native, reference


def assert_close_fp32(native, reference, score):
    # 1e-6 relative to the row's score scale: rewards are fractions of the score.
    scale = score.abs().reshape(-1, 1).clamp(min=1.0)
    torch.testing.assert_close(native / scale, reference / scale, rtol=1e-6, atol=1e-6)


@needs_native_cpu
@pytest.mark.parametrize("device", DEVICES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    batch=st.integers(1, 6),
    heads=st.integers(1, 4),
    length=st.integers(1, 24),
    layout=st.sampled_from(LAYOUTS),
    dtype=st.sampled_from(DTYPES),
    padding=st.sampled_from(["left", "right"]),
    prompt=st.integers(0, 8),
    with_reward_index=st.booleans(),
    beta=st.sampled_from([0.0, 0.3, 0.8, 1.0]),
    seed=st.integers(0, 2**31 - 1),
)
def test_native_matches_reference(
    device, batch, heads, length, layout, dtype, padding, prompt, with_reward_index, beta, seed
):
    g = torch.Generator().manual_seed(seed)
    attn, score, mask, index = make_case(
        batch,
        heads,
        length,
        layout=layout,
        dtype=dtype,
        padding=padding,
        prompt=prompt,
        with_reward_index=with_reward_index,
        device=device,
        generator=g,
    )
    native, reference = both_backends(attn, score, mask, beta=beta, reward_index=index, layout=layout)
    assert native.dtype == torch.float32 and native.shape == (batch, length)
    assert native.device == attn.device
    assert_close_fp32(native, reference, score)
    torch.testing.assert_close(native.sum(1), score, rtol=1e-5, atol=1e-5)  # the return is conserved
    assert (native[~mask] == 0).all()


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native_cpu)])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("padding", ["left", "right"])
def test_conservation(backend, layout, padding):
    attn, score, mask, _ = make_case(16, 4, 40, layout=layout, padding=padding, prompt=5)
    out = dense_rlhf.dense_rewards(attn, score, mask, backend=backend)
    torch.testing.assert_close(out.sum(1), score, rtol=1e-5, atol=1e-5)


def official_abc(maps: torch.Tensor, score: float, query_len: int, response_len: int, beta: float):
    """The paper's code path for one unpadded sample: head-averaged maps, completion block, its last row."""
    attention = maps.mean(0).numpy()  # [L, L]
    block = attention[query_len : query_len + response_len, query_len : query_len + response_len]
    row = block[-1] / block[-1].sum()
    rewards = beta * score * row
    rewards[-1] += (1 - beta) * score
    return torch.from_numpy(rewards)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native_cpu)])
@pytest.mark.parametrize("beta", [0.0, 0.5, 0.8, 1.0])
@pytest.mark.parametrize("query_len,response_len", [(0, 7), (5, 1), (9, 12)])
def test_matches_official_formula(backend, beta, query_len, response_len):
    length = query_len + response_len
    maps = torch.randn(1, 6, length, length, generator=torch.Generator().manual_seed(3)).softmax(-1)
    mask = torch.zeros(1, length, dtype=torch.bool)
    mask[0, query_len:] = True
    out = dense_rlhf.dense_rewards(maps, torch.tensor([2.5]), mask, beta=beta, backend=backend)
    expected = official_abc(maps[0], 2.5, query_len, response_len, beta)
    torch.testing.assert_close(out[0, query_len:], expected, rtol=1e-5, atol=1e-6)
    assert (out[0, :query_len] == 0).all()


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native_cpu)])
def test_layouts_agree(backend):
    maps, score, mask, _ = make_case(5, 3, 20, padding="left", prompt=4)
    last = torch.where(mask, torch.arange(20), -1).amax(1)
    rows = maps[torch.arange(5), :, last, :]
    from_maps = dense_rlhf.dense_rewards(maps, score, mask, backend=backend)
    from_rows = dense_rlhf.dense_rewards(rows, score, mask, backend=backend)
    from_row = dense_rlhf.dense_rewards(rows.mean(1), score, mask, backend=backend)
    head_averaged_maps = dense_rlhf.dense_rewards(maps.mean(1, keepdim=True), score, mask, backend=backend)
    for other in (from_rows, from_row, head_averaged_maps):
        torch.testing.assert_close(other, from_maps, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native_cpu)])
def test_beta_zero_is_sparse_and_uniform_attention_is_uniform(backend):
    attn, score, mask, _ = make_case(6, 2, 15, prompt=3)
    sparse = dense_rlhf.dense_rewards(attn, score, mask, beta=0.0, backend=backend)
    torch.testing.assert_close(sparse, dense_rlhf.sparse_rewards(score, mask))
    flat = torch.ones(6, 15)
    uniform = dense_rlhf.dense_rewards(flat, score, mask, beta=1.0, backend=backend)
    torch.testing.assert_close(uniform, dense_rlhf.uniform_rewards(score, mask))


def test_baselines():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    score = torch.tensor([[3.0], [-2.0]])
    torch.testing.assert_close(
        dense_rlhf.sparse_rewards(score, mask), torch.tensor([[0.0, 0.0, 3.0, 0.0], [0.0, 0.0, 0.0, -2.0]])
    )
    torch.testing.assert_close(
        dense_rlhf.uniform_rewards(score, mask), torch.tensor([[0.0, 1.5, 1.5, 0.0], [-0.5, -0.5, -0.5, -0.5]])
    )
    with pytest.raises(ValueError, match="no completion token"):
        dense_rlhf.sparse_rewards(score, torch.tensor([[0, 0, 0, 0], [1, 0, 0, 0]]))
    with pytest.raises(ValueError, match="no completion token"):
        dense_rlhf.uniform_rewards(score, torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]]))
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        dense_rlhf.sparse_rewards(score, [[0, 1, 1, 0], [1, 1, 1, 1]])
    with pytest.raises(ValueError, match="score must be \\[B\\] or \\[B, 1\\] with B=2"):
        dense_rlhf.uniform_rewards(score[:1], mask)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native_cpu)])
def test_zero_attention_falls_back_to_sparse(backend):
    attn = torch.zeros(2, 2, 6, 6)
    attn[1, :, :, :] = torch.rand(2, 6, 6)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    score = torch.tensor([1.5, 2.0])
    out = dense_rlhf.dense_rewards(attn, score, mask, backend=backend)
    torch.testing.assert_close(out[0], torch.tensor([0.0, 0.0, 0.0, 1.5, 0.0, 0.0]))
    torch.testing.assert_close(out.sum(1), score)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native_cpu)])
def test_non_contiguous_inputs(device, backend):
    base, score, mask, _ = make_case(4, 3, 18, prompt=2, device=device)
    expected = dense_rlhf.dense_rewards(base.contiguous(), score, mask, backend="reference")
    transposed = base.transpose(-1, -2).contiguous().transpose(-1, -2)  # column-major maps
    assert not transposed.is_contiguous()
    sliced = torch.cat([base, base], dim=1)[:, ::2]  # strided head dimension
    padded = torch.nn.functional.pad(base, (0, 5))[..., :18]  # rows with a gap between them
    for attn in (transposed, sliced, padded):
        out = dense_rlhf.dense_rewards(attn, score, mask, backend=backend)
        torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)
    mask_strided = torch.stack([mask, mask], dim=2)[..., 0]
    score_strided = torch.stack([score, score], dim=1)[:, :1]
    out = dense_rlhf.dense_rewards(base, score_strided, mask_strided, backend=backend)
    torch.testing.assert_close(out, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native_cpu)])
def test_expanded_heads_and_huge_virtual_shape(device, backend):
    batch, heads, length = 4, 16, 8192  # B * H * L * L = 2^32 elements
    assert batch * heads * length * length > 2**31
    rows = torch.rand(batch, 1, 1, length, device=device)
    attn = rows.expand(batch, heads, length, length)  # nothing large is allocated
    mask = torch.zeros(batch, length, dtype=torch.bool, device=device)
    mask[:, length // 2 :] = True
    mask[1, -100:] = False
    score = torch.tensor([1.0, -2.0, 3.0, 0.5], device=device)
    index = torch.tensor([length - 1, 5, length - 2, 0], device=device)
    out = dense_rlhf.dense_rewards(attn, score, mask, backend=backend, reward_index=index)
    expected = dense_rlhf.dense_rewards(rows[:, 0, 0], score, mask, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native_cpu)])
def test_integer_mask_and_2d_score(backend):
    attn, score, mask, _ = make_case(3, 2, 10, prompt=2)
    expected = dense_rlhf.dense_rewards(attn, score, mask, backend=backend)
    for int_mask in (mask.long(), mask.int(), mask.to(torch.uint8)):
        torch.testing.assert_close(dense_rlhf.dense_rewards(attn, score[:, None], int_mask, backend=backend), expected)
    torch.testing.assert_close(dense_rlhf.dense_rewards(attn, score.double(), mask, backend=backend), expected)


def test_result_never_requires_grad():
    attn, score, mask, _ = make_case(2, 2, 6)
    attn.requires_grad_(True)
    score.requires_grad_(True)
    for backend in ["reference"] + (["native"] if _native.has_kernel("cpu") else []):
        out = dense_rlhf.dense_rewards(attn, score, mask, backend=backend)
        assert not out.requires_grad


@needs_native_cpu
def test_backend_auto_uses_native_and_rejects_unknown():
    attn, score, mask, _ = make_case(2, 2, 6)
    torch.testing.assert_close(
        dense_rlhf.dense_rewards(attn, score, mask), dense_rlhf.dense_rewards(attn, score, mask, backend="native")
    )
    with pytest.raises(ValueError, match="backend"):
        dense_rlhf.dense_rewards(attn, score, mask, backend="triton")


def test_native_backend_for_missing_device_kernel_raises(monkeypatch):
    monkeypatch.setitem(_native.KERNELS, "cpu", False)  # as in a build without the CPU kernel
    attn, score, mask, _ = make_case(2, 2, 6)
    with pytest.raises(RuntimeError, match="native op for cpu is not built"):
        dense_rlhf.dense_rewards(attn, score, mask, backend="native", validate=False)


@pytest.mark.skipif(not (torch.cuda.is_available() and _native.has_kernel("cuda")), reason="needs a GPU")
def test_cuda_offsets_past_2_pow_31_in_real_memory():
    batch, heads, length = 2, 9, 16384  # 2 * 9 * 16384^2 bf16 elements: 9.7 GB, offsets up to 4.8e9
    attn = torch.empty(batch, heads, length, length, dtype=torch.bfloat16, device="cuda")
    rows = torch.rand(batch, heads, length, device="cuda").to(torch.bfloat16)
    index = torch.tensor([length - 3, length - 1], device="cuda")
    attn[torch.arange(batch), :, index, :] = rows
    mask = torch.ones(batch, length, dtype=torch.bool, device="cuda")
    score = torch.tensor([1.0, -3.0], device="cuda")
    out = dense_rlhf.dense_rewards(attn, score, mask, reward_index=index, backend="native")
    expected = dense_rlhf.dense_rewards(rows, score, mask, backend="reference")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["reference", pytest.param("native", marks=needs_native_cpu)])
def test_masks_with_gaps(device, backend):
    """Completion tokens need not be contiguous (e.g. several assistant turns): gaps get no reward."""
    g = torch.Generator().manual_seed(7)
    attn = torch.rand(12, 3, 33, 33, generator=g).to(device)
    mask = (torch.rand(12, 33, generator=g) > 0.5).to(device)
    mask[:, 20] = True  # no empty row
    score = (torch.randn(12, generator=g) * 3).to(device)
    out = dense_rlhf.dense_rewards(attn, score, mask, backend=backend, beta=0.7)
    expected = dense_rlhf.dense_rewards(attn, score, mask, backend="reference", beta=0.7)
    assert_close_fp32(out, expected, score)
    assert (out[~mask] == 0).all()
    torch.testing.assert_close(out.sum(1), score, rtol=1e-5, atol=1e-5)
