"""The ABC vLLM plugin's parts that run without vLLM: the attention row's math (grouped-query heads, the split of heads
under tensor parallelism), the version check and what loading the entry point imports. The plugin inside real vLLM
servers is tested in tests/test_vllm.py."""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import tomllib
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dense_rlhf.integrations.vllm_plugin import ARCHITECTURES, CHECKED_VERSIONS, LAYER_KEY, _check_version
from dense_rlhf.integrations.vllm_plugin.attention import head_row_sums
from dense_rlhf.integrations.vllm_plugin.checks import Refused, check_attention, check_config

ROOT = Path(__file__).resolve().parents[1]


def naive_row(q_last, k, scaling):
    """The head-averaged row, one head at a time: query head h reads key-value head h // (H // KV)."""
    heads, kv_heads = q_last.shape[0], k.shape[1]
    rows = []
    for h in range(heads):
        logits = torch.tensor([float(q_last[h] @ k[j, h // (heads // kv_heads)]) for j in range(k.shape[0])])
        rows.append(torch.softmax(logits * scaling, 0))
    return torch.stack(rows).mean(0)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 9),
    kv_heads=st.integers(1, 3),
    group=st.integers(1, 4),
    dim=st.sampled_from([1, 4, 8]),
    seed=st.integers(0, 2**16),
)
def test_the_row_equals_a_loop_over_heads(n, kv_heads, group, dim, seed):
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(kv_heads * group, dim, generator=generator, dtype=torch.float64)
    k = torch.randn(n, kv_heads, dim, generator=generator, dtype=torch.float64) * 2
    row = head_row_sums(q, k, dim**-0.5) / (kv_heads * group)
    torch.testing.assert_close(row, naive_row(q, k, dim**-0.5).float(), atol=1e-6, rtol=0)
    assert row.dtype == torch.float32 and abs(float(row.sum()) - 1) < 1e-5


def vllm_head_split(q, k, tp, rank):
    """What rank ``rank`` of ``tp`` holds, as vLLM's QKVParallelLinear splits heads: a contiguous block of query
    heads, and the key-value heads they read (replicated when there are fewer key-value heads than ranks)."""
    heads, kv_heads = q.shape[0], k.shape[1]
    local = heads // tp
    if kv_heads >= tp:
        kv_local = kv_heads // tp
        kv = slice(rank * kv_local, (rank + 1) * kv_local)
    else:
        kv_rank = rank // (tp // kv_heads)
        kv = slice(kv_rank, kv_rank + 1)
    return q[rank * local : (rank + 1) * local], k[:, kv]


@pytest.mark.parametrize("heads, kv_heads, tp", [(4, 4, 2), (8, 2, 2), (8, 2, 4), (4, 1, 2), (6, 3, 3), (8, 4, 2)])
def test_tensor_parallel_ranks_sum_to_the_full_row(heads, kv_heads, tp):
    """What the pooler does under tensor parallelism: each rank sums its own heads, an all-reduce adds the sums, the
    total is divided by the layer's number of heads."""
    torch.manual_seed(heads * 10 + tp)
    q, k = torch.randn(heads, 16), torch.randn(11, kv_heads, 16)
    reduced = sum(head_row_sums(*vllm_head_split(q, k, tp, rank), 0.25) for rank in range(tp)) / heads
    torch.testing.assert_close(reduced, naive_row(q, k, 0.25), atol=1e-6, rtol=0)


def test_shapes_that_do_not_fit_are_refused():
    with pytest.raises(ValueError, match="KV | H"):
        head_row_sums(torch.zeros(3, 4), torch.zeros(5, 2, 4), 1.0)
    with pytest.raises(ValueError, match="not \\[H, d\\]"):
        head_row_sums(torch.zeros(2, 4), torch.zeros(5, 2, 8), 1.0)


@pytest.mark.parametrize("version", ["0.24.0", "0.32.0+cpu", "0.34.0", "0.34.2"])
def test_checked_versions_load_quietly(version):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check_version(version)


@pytest.mark.parametrize("version", ["0.23.1", "0.35.0", "1.0.0", "dev"])
def test_other_versions_get_a_warning_naming_the_range(version):
    with pytest.warns(
        UserWarning, match=f"checked against vLLM {CHECKED_VERSIONS[0]} to 0.34.x; this is vLLM {version}"
    ):
        _check_version(version)


def test_the_entry_point_is_declared_and_loads_nothing_heavy():
    """vLLM loads the entry point in every process it starts: that import loads neither vLLM (``register`` imports
    it when vLLM calls it; the model classes load when a server selects one) nor transformers."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["entry-points"]["vllm.general_plugins"] == {
        "dense_rlhf_abc": "dense_rlhf.integrations.vllm_plugin:register"
    }
    code = (
        "import sys, dense_rlhf.integrations.vllm_plugin as p; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('vllm', 'transformers') "
        "or m.startswith('dense_rlhf.integrations.vllm_plugin.'))); print(callable(p.register))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.split("\n")[:2] == ["[]", "True"]
    assert set(ARCHITECTURES) == {f"ABC{family}" for family in ARCHITECTURES.values()}


def vllm_config(pipeline=1, **text):
    """What the checks read of vLLM's config: the parallel sizes and the model's text config."""
    from types import SimpleNamespace

    config = SimpleNamespace(num_hidden_layers=4, **text)
    config.get_text_config = lambda: config
    return SimpleNamespace(
        model_config=SimpleNamespace(hf_config=config),
        parallel_config=SimpleNamespace(pipeline_parallel_size=pipeline),
    )


@pytest.mark.parametrize(
    "settings, match",
    [
        (dict(pipeline=2), r"pipeline parallelism \(pipeline_parallel_size=2\)"),
        (dict(dual_chunk_attention_config={"chunk_size": 8}), "dual-chunk attention"),
        (dict(rope_parameters={"rope_type": "default", "mrope_section": [16, 24, 24]}), "mrope"),
        (dict(layer_types=["full_attention"] * 3 + ["sliding_attention"], sliding_window=8), "sliding_attention in"),
        (dict(sliding_window=4096), r"sliding-window attention \(sliding_window=4096\)"),
        (dict(sliding_window=4096, use_sliding_window=True, layer_types=["full_attention"] * 4), "sliding-window"),
        ({LAYER_KEY: 4}, r"dense_rlhf_abc_layer=4 must be an integer layer index in \[-4, 3\]"),
        ({LAYER_KEY: "1"}, "must be an integer layer index"),
        ({LAYER_KEY: True}, "must be an integer layer index"),
    ],
    ids=["pipeline", "dual-chunk", "mrope", "layer-types", "mistral-window", "qwen-window", "layer", "str", "bool"],
)
def test_variants_the_recomputation_does_not_cover_are_refused_naming_them(settings, match):
    with pytest.raises(Refused, match=match) as error:
        check_config(vllm_config(**settings), "ABCLlamaForSequenceClassification")
    assert str(error.value).startswith("ABCLlamaForSequenceClassification")


def test_configs_the_recomputation_covers_pass_with_their_layer():
    assert check_config(vllm_config(), "A") == 3
    assert check_config(vllm_config(**{LAYER_KEY: 0}), "A") == 0
    assert check_config(vllm_config(**{LAYER_KEY: -2}), "A") == 2
    # Qwen2/Qwen3 configs carry a window they do not use
    assert check_config(
        vllm_config(sliding_window=4096, use_sliding_window=False, layer_types=["full_attention"] * 4), "A"
    )
    assert check_config(vllm_config(rope_parameters={"rope_type": "llama3", "factor": 8.0}), "A") == 3


def attention_module(**changes):
    from types import SimpleNamespace

    impl = SimpleNamespace(logits_soft_cap=None, sinks=None)
    attn = SimpleNamespace(sliding_window=None, impl=impl, attn_type="decoder")
    fields = dict(qkv_proj=1, q_size=1, kv_size=1, num_heads=1, num_kv_heads=1, head_dim=1, scaling=1.0)
    module = SimpleNamespace(rotary_emb=SimpleNamespace(), attn=attn, **fields)
    for key, value in changes.items():
        target, name = (
            (impl, key[5:])
            if key.startswith("impl_")
            else (attn, key[5:])
            if key.startswith("attn_")
            else (module, key)
        )
        setattr(target, name, value)
    return module


def test_the_built_attention_is_checked():
    check_attention(attention_module(), "A", 3, "0.32.0")
    with pytest.raises(Refused, match=r"sliding-window attention \(window 128 in layer 3\)"):
        check_attention(attention_module(attn_sliding_window=128), "A", 3, "0.32.0")
    with pytest.raises(Refused, match="logit soft-capping"):
        check_attention(attention_module(impl_logits_soft_cap=30.0), "A", 3, "0.32.0")
    with pytest.raises(Refused, match="attention sinks"):
        check_attention(attention_module(impl_sinks=torch.zeros(2)), "A", 3, "0.32.0")
    with pytest.raises(Refused, match=r"non-causal attention \(attn_type=AttentionType.ENCODER_ONLY\)"):
        check_attention(attention_module(attn_attn_type="AttentionType.ENCODER_ONLY"), "A", 3, "0.32.0")
    module = attention_module()
    del module.qkv_proj
    with pytest.raises(RuntimeError, match=r"in vLLM 9.9.9 has no \['qkv_proj'\]"):
        check_attention(module, "A", 3, "9.9.9")
