"""Tests of capture_reward_attention / score_and_densify on small random-initialised transformers models."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2ForSequenceClassification,
    LlamaConfig,
    LlamaForSequenceClassification,
    MistralConfig,
    MistralForSequenceClassification,
    PreTrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForSequenceClassification,
)
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS  # noqa: E402
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS  # noqa: E402

import dense_rlhf  # noqa: E402
from dense_rlhf import capture_reward_attention, score_and_densify  # noqa: E402
from dense_rlhf.capture import attention as capture_attention  # noqa: E402
from dense_rlhf.capture import interface as capture_interface  # noqa: E402
from dense_rlhf.capture import model as capture_model  # noqa: E402
from dense_rlhf.capture import rows as capture_rows  # noqa: E402

PAD = 0
VOCAB = 97
B, L = 3, 12
TOL = dict(atol=1e-5, rtol=0)


def _llama(attn):
    return LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=PAD,
            num_labels=1,
            attn_implementation=attn,
        )
    )


def _gpt2(attn):
    return GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=64,
            n_layer=3,
            n_head=4,
            n_positions=64,
            pad_token_id=PAD,
            num_labels=1,
            attn_implementation=attn,
        )
    )


def _qwen2(attn):
    return Qwen2ForSequenceClassification(
        Qwen2Config(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=PAD,
            num_labels=1,
            attn_implementation=attn,
        )
    )


def _mistral(attn):  # one kv head (MQA) and a sliding window shorter than the sequence
    return MistralForSequenceClassification(
        MistralConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=1,
            sliding_window=5,
            pad_token_id=PAD,
            num_labels=1,
            attn_implementation=attn,
        )
    )


def _bert(attn):
    return BertForSequenceClassification(
        BertConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            max_position_embeddings=64,
            pad_token_id=PAD,
            num_labels=1,
            attn_implementation=attn,
        )
    )


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The models are tiny: one intra-op thread is faster, and much faster on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


ARCHS = {"llama": _llama, "gpt2": _gpt2, "qwen2": _qwen2, "mistral": _mistral, "bert": _bert}
_cache: dict = {}


def make_model(arch, attn="sdpa"):
    """A model with fixed random weights per architecture (the same weights for every attn)."""
    key = (arch, attn)
    if key not in _cache:
        torch.manual_seed(0)
        model = ARCHS[arch](attn).eval()
        if attn != "sdpa":
            model.load_state_dict(make_model(arch, "sdpa").state_dict())
        _cache[key] = model
    return _cache[key]


def make_batch(padding, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for row, pad in enumerate([0, 4, 7][:B]):
        if pad and padding != "none":
            if padding == "left":
                mask[row, :pad] = 0
            else:
                mask[row, L - pad :] = 0
    ids[mask == 0] = PAD
    return ids, mask


def expected_index(arch, ids):
    if arch == "bert":
        return torch.zeros(ids.shape[0], dtype=torch.long)
    positions = torch.arange(ids.shape[1])
    return (positions * (ids != PAD)).argmax(-1)


def eager_rows(arch, ids, mask, layer, index):
    with torch.no_grad():
        out = make_model(arch, "eager")(input_ids=ids, attention_mask=mask, output_attentions=True)
    return out.attentions[layer][torch.arange(ids.shape[0]), :, index, :]


def _state(model):
    configs = capture_model._configs_of(model)
    return (
        [c.__dict__.get("_attn_implementation_internal") for c in configs],
        [(len(m._forward_pre_hooks), len(m._forward_hooks)) for m in model.modules()],
    )


def _all_closed():
    """No config left switched and no capture left open. The capturing names stay registered, as
    pass-throughs to the original implementations (a forward in another thread may still look them up)."""
    names = {
        k
        for k in list(ALL_ATTENTION_FUNCTIONS) + list(ALL_MASK_ATTENTION_FUNCTIONS)
        if k.startswith(capture_interface.PREFIX)
    }
    registered = {capture_interface.PREFIX + orig for orig in capture_interface._registered}
    return names == registered and not capture_interface._swaps and not capture_interface._by_config


# ----------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("padding", ["right", "left", "none"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_rows_match_eager_output_attentions(arch, padding, attn):
    model = make_model(arch, attn)
    ids, mask = make_batch(padding)
    index = expected_index(arch, ids)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        for layer in (-1, 1):
            with capture_reward_attention(model, layer=layer) as cap:
                logits = model(input_ids=ids, attention_mask=mask).logits
            assert torch.equal(logits, plain), "capture changed the model's output"
            assert cap.rows.dtype == torch.float32 and cap.rows.shape == (B, 4, L)
            assert torch.equal(cap.reward_index, index)
            torch.testing.assert_close(cap.rows, eager_rows(arch, ids, mask, layer, index), **TOL)
    assert model.config._attn_implementation == attn
    assert _all_closed()


def test_padding_actually_matters_for_the_rows():
    """Guard for the tests above: with padding the rows differ from those of the unpadded row layout."""
    ids, mask = make_batch("left")
    model = make_model("llama")
    with torch.no_grad(), capture_reward_attention(model) as cap:
        model(input_ids=ids, attention_mask=mask)
    assert float(cap.rows[2, :, :7].abs().max()) == 0.0  # nothing on the 7 left pads of row 2
    assert float(cap.rows[0, :, :7].sum()) > 0.0


def test_eager_with_output_attentions_inside_capture():
    model = make_model("llama", "eager")
    ids, mask = make_batch("left")
    index = expected_index("llama", ids)
    with torch.no_grad(), capture_reward_attention(model, layer=0) as cap:
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    torch.testing.assert_close(cap.rows, out.attentions[0][torch.arange(B), :, index, :], **TOL)


def test_rows_are_post_rotary():
    """Rows computed from pre-rotary q, k would differ: check against a recomputation without rotary."""
    model = make_model("llama")
    ids, mask = make_batch("right")
    index = expected_index("llama", ids)
    seen = {}
    attn = model.model.layers[-1].self_attn
    handle = attn.register_forward_pre_hook(lambda m, a, k: seen.update(h=k["hidden_states"]), with_kwargs=True)
    try:
        with torch.no_grad(), capture_reward_attention(model) as cap:
            model(input_ids=ids, attention_mask=mask)
    finally:
        handle.remove()
    h = seen["h"]
    with torch.no_grad():
        q = attn.q_proj(h).view(B, L, 4, 16).transpose(1, 2)
        k = attn.k_proj(h).view(B, L, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
        scores = (q[torch.arange(B), :, index][:, :, None] @ k.transpose(-1, -2)).squeeze(2) * attn.scaling
    keep = (mask.bool() & (torch.arange(L)[None] <= index[:, None]))[:, None, :]
    no_rotary = torch.softmax(scores.masked_fill(~keep, float("-inf")), -1)
    assert (no_rotary - cap.rows).abs().max() > 1e-3


def test_reward_index_override():
    model = make_model("llama")
    ids, mask = make_batch("right")
    for given, index in (
        (5, torch.full((B,), 5)),
        (-1, torch.full((B,), L - 1)),
        (torch.tensor([3, 4, 2]), torch.tensor([3, 4, 2])),
    ):
        with torch.no_grad(), capture_reward_attention(model, reward_index=given) as cap:
            model(input_ids=ids, attention_mask=mask)
        assert torch.equal(cap.reward_index, index)
        torch.testing.assert_close(cap.rows, eager_rows("llama", ids, mask, -1, index), **TOL)
    with pytest.raises(ValueError, match="out of range"):
        with torch.no_grad(), capture_reward_attention(model, reward_index=L):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(ValueError, match=r"\[B\]"):
        with torch.no_grad(), capture_reward_attention(model, reward_index=torch.tensor([1, 2])):
            model(input_ids=ids, attention_mask=mask)
    with pytest.raises(TypeError):
        capture_reward_attention(model, reward_index=1.5)
    assert _all_closed()


def test_no_pad_token_uses_last_position():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=None,
            num_labels=1,
        )
    ).eval()
    ids = torch.randint(1, VOCAB, (1, L))
    with torch.no_grad(), capture_reward_attention(model) as cap:
        model(input_ids=ids)
    assert cap.reward_index.tolist() == [L - 1]


# ----------------------------------------------------------------------------------------- the mask trap


def test_missing_mask_registration_is_caught(monkeypatch):
    """An attention function registered under a new name gets no padding mask unless a mask function is
    registered for that name too. Without it, a left-padded batch silently attends to its pads: the capture
    must say so, and the rows (and logits) would be wrong."""
    model = make_model("llama")
    ids, mask = make_batch("left")
    index = expected_index("llama", ids)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
    with capture_reward_attention(model):  # registers the names, which then stay
        pass
    monkeypatch.setattr(capture_interface, "_register_mask", lambda orig: None)
    monkeypatch.delitem(ALL_MASK_ATTENTION_FUNCTIONS._global_mapping, capture_interface.PREFIX + "sdpa")
    with pytest.raises(RuntimeError, match="no mask"):
        with torch.no_grad(), capture_reward_attention(model):
            model(input_ids=ids, attention_mask=mask)
    assert _all_closed()

    # Without the loud check, the comparison with eager attention is what catches it.
    monkeypatch.setattr(capture_attention.RewardAttentionCapture, "_check_mask_delivered", lambda *a: None)
    with torch.no_grad(), capture_reward_attention(model) as cap:
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(logits, plain)
    assert (cap.rows - eager_rows("llama", ids, mask, -1, index)).abs().max() > 1e-2
    assert float(cap.rows[2, :, :7].sum()) > 0.0  # attention on padding


# ----------------------------------------------------------------------------------------- errors


def test_layer_out_of_range():
    model = make_model("llama")
    for layer in (3, -4, 100):
        with pytest.raises(IndexError, match="out of range"):
            capture_reward_attention(model, layer=layer)
    with pytest.raises(TypeError):
        capture_reward_attention(model, layer=1.0)


def test_not_a_transformers_model():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        capture_reward_attention(torch.nn.MultiheadAttention(8, 2))


class _PlainConfig(PreTrainedConfig):
    model_type = "dense_rlhf_test_plain"

    def __init__(self, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, **kwargs):
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        super().__init__(**kwargs)


class _PlainSelfAttention(nn.Module):  # calls torch directly, not through transformers' interface
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.qkv = torch.nn.Linear(config.hidden_size, 3 * config.hidden_size)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return torch.nn.functional.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]


class _PlainModel(PreTrainedModel):
    config_class = _PlainConfig
    _supports_sdpa = True

    def __init__(self, config):
        super().__init__(config)
        self.embed = torch.nn.Embedding(10, config.hidden_size)
        self.layers = torch.nn.ModuleList(_PlainSelfAttention(config, i) for i in range(config.num_hidden_layers))
        self.post_init()

    def forward(self, input_ids, attention_mask=None):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return x


def test_model_not_going_through_the_interface(monkeypatch):
    model = _PlainModel(_PlainConfig(attn_implementation="sdpa")).eval()
    with pytest.raises(ValueError, match="AttentionInterface"):
        with capture_reward_attention(model):
            pass
    # If transformers' source heuristic says it can, the forward shows it cannot.
    monkeypatch.setattr(_PlainModel, "_can_set_attn_implementation", classmethod(lambda cls: True))
    with torch.no_grad(), capture_reward_attention(model) as cap:
        model(torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(RuntimeError, match="never called an attention function"):
        cap.rows
    assert model.config._attn_implementation == "sdpa"
    assert _all_closed()


def test_forward_never_reaching_the_layer():
    model = copy.deepcopy(make_model("llama"))
    ids, mask = make_batch("right")
    with capture_reward_attention(model, layer=2) as cap:
        full = model.model.layers
        model.model.layers = full[:2]
        try:
            with torch.no_grad():
                model(input_ids=ids, attention_mask=mask)
        finally:
            model.model.layers = full
    with pytest.raises(RuntimeError, match="never reached layer 2"):
        cap.rows


def test_no_forward():
    with capture_reward_attention(make_model("llama")) as cap:
        pass
    with pytest.raises(RuntimeError, match="no forward"):
        cap.rows


def test_gpt2_eager_reorder_and_upcast_is_refused():
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(
            vocab_size=VOCAB,
            n_embd=32,
            n_layer=2,
            n_head=2,
            pad_token_id=PAD,
            num_labels=1,
            reorder_and_upcast_attn=True,
            attn_implementation="eager",
        )
    )
    with pytest.raises(NotImplementedError, match="reorder_and_upcast_attn"):
        with capture_reward_attention(model):
            pass
    assert model.config._attn_implementation == "eager"
    assert _all_closed()


def test_unsupported_attention_implementation():
    model = copy.deepcopy(make_model("llama"))
    model.config._attn_implementation_internal = "flex_attention"
    with pytest.raises(NotImplementedError, match="flex_attention"):
        with capture_reward_attention(model):
            pass
    assert model.config._attn_implementation == "flex_attention"
    assert _all_closed()


# ----------------------------------------------------------------------------------------- restoring


def test_restored_exactly_also_when_forward_raises():
    model = make_model("qwen2")
    before = _state(model)
    ids, mask = make_batch("right")
    bad = ids.clone()
    bad[0, 0] = VOCAB + 10  # out of the embedding's range
    with pytest.raises(IndexError):
        with torch.no_grad(), capture_reward_attention(model):
            assert model.config._attn_implementation == "dense_rlhf_capture_sdpa"
            model(input_ids=bad, attention_mask=mask)
    assert _state(model) == before
    assert _all_closed()
    with torch.no_grad():  # and still works as before
        model(input_ids=ids, attention_mask=mask)


def test_sequential_nested_and_two_models():
    llama, gpt2 = make_model("llama"), make_model("gpt2")
    ids, mask = make_batch("right")
    ids2, mask2 = make_batch("left", seed=2)
    with torch.no_grad():
        with capture_reward_attention(llama) as first:
            llama(input_ids=ids, attention_mask=mask)
        with capture_reward_attention(llama) as second:
            llama(input_ids=ids2, attention_mask=mask2)
        torch.testing.assert_close(first.rows, eager_rows("llama", ids, mask, -1, expected_index("llama", ids)), **TOL)
        torch.testing.assert_close(
            second.rows, eager_rows("llama", ids2, mask2, -1, expected_index("llama", ids2)), **TOL
        )

        with capture_reward_attention(llama) as outer:
            with capture_reward_attention(llama, layer=0) as inner, capture_reward_attention(llama) as same:
                with capture_reward_attention(gpt2) as other:
                    llama(input_ids=ids, attention_mask=mask)
                    gpt2(input_ids=ids2, attention_mask=mask2)
                assert gpt2.config._attn_implementation == "sdpa"
            assert llama.config._attn_implementation == "dense_rlhf_capture_sdpa"
        assert llama.config._attn_implementation == "sdpa"
    index = expected_index("llama", ids)
    torch.testing.assert_close(outer.rows, eager_rows("llama", ids, mask, -1, index), **TOL)
    torch.testing.assert_close(same.rows, outer.rows, atol=0, rtol=0)
    torch.testing.assert_close(inner.rows, eager_rows("llama", ids, mask, 0, index), **TOL)
    torch.testing.assert_close(other.rows, eager_rows("gpt2", ids2, mask2, -1, expected_index("gpt2", ids2)), **TOL)
    assert _all_closed()


def test_overlapping_exit_order_and_shared_config():
    base = make_model("llama")
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    b.config = a.config  # two models sharing one config object
    for module in b.modules():
        if hasattr(module, "config"):
            module.config = a.config
    ids, mask = make_batch("left")
    cap_a = capture_reward_attention(a).__enter__()
    cap_b = capture_reward_attention(b, layer=0).__enter__()
    with torch.no_grad():
        a(input_ids=ids, attention_mask=mask)
        b(input_ids=ids, attention_mask=mask)
    cap_a.__exit__(None, None, None)  # not in LIFO order
    assert a.config._attn_implementation == "dense_rlhf_capture_sdpa"  # b's capture still open
    cap_b.__exit__(None, None, None)
    assert a.config._attn_implementation == "sdpa"
    index = expected_index("llama", ids)
    torch.testing.assert_close(cap_a.rows, eager_rows("llama", ids, mask, -1, index), **TOL)
    torch.testing.assert_close(cap_b.rows, eager_rows("llama", ids, mask, 0, index), **TOL)
    assert _all_closed()
    with pytest.raises(RuntimeError, match="only once"):
        cap_a.__enter__()


def test_threads():
    """Rows are recorded only from the entering thread; captures on two models in two threads are independent."""
    llama, qwen = make_model("llama"), make_model("qwen2")
    ids, mask = make_batch("right")
    ids2, mask2 = make_batch("left", seed=3)
    results, errors = {}, []

    def run(name, model, x, m):
        try:
            with torch.no_grad(), capture_reward_attention(model) as cap:
                for _ in range(3):
                    model(input_ids=x, attention_mask=m)
            results[name] = cap.rows
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [
        threading.Thread(target=run, args=("llama", llama, ids, mask)),
        threading.Thread(target=run, args=("qwen", qwen, ids2, mask2)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    torch.testing.assert_close(
        results["llama"], eager_rows("llama", ids, mask, -1, expected_index("llama", ids)), **TOL
    )
    torch.testing.assert_close(
        results["qwen"], eager_rows("qwen2", ids2, mask2, -1, expected_index("qwen2", ids2)), **TOL
    )

    with torch.no_grad(), capture_reward_attention(llama) as cap:
        other = threading.Thread(target=lambda: llama(input_ids=ids, attention_mask=mask))
        other.start()
        other.join()
    with pytest.raises(RuntimeError, match="no forward"):
        cap.rows
    assert _all_closed()


# ----------------------------------------------------------------------------------------- memory


def test_never_materialises_full_maps(monkeypatch):
    from torch.utils._python_dispatch import TorchDispatchMode

    largest = []

    class Sizes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(t, torch.Tensor):
                    largest.append(t.numel())
            return out

    original = capture_attention._reward_rows

    def spied(*args, **kwargs):
        with Sizes():
            return original(*args, **kwargs)

    monkeypatch.setattr(capture_attention, "_reward_rows", spied)
    model = make_model("llama")
    ids, mask = make_batch("left")
    with torch.no_grad(), capture_reward_attention(model) as cap:
        model(input_ids=ids, attention_mask=mask)
    heads, head_dim = 4, 16
    assert largest and max(largest) <= max(B * heads * L * head_dim, B * heads * L)
    assert max(largest) < B * heads * L * L
    assert cap.rows.shape == (B, heads, L)


# ----------------------------------------------------------------------------------------- flash branch


def test_flash_mask_logic_matches_sdpa_masks():
    """The flash path cannot run here (no GPU); check its mask handling (2D padding mask, causal, sliding
    window, none) against the 4D masks transformers builds for sdpa, on the same q and k."""
    from transformers.masking_utils import causal_mask_function, sdpa_mask, sliding_window_causal_mask_function

    torch.manual_seed(0)
    q, k = torch.randn(B, 4, L, 8), torch.randn(B, 2, L, 8)
    _, pad = make_batch("left")
    index = torch.tensor([L - 1, 6, L - 2])
    for window in (None, 4):
        for padding in (pad.bool(), None):
            fn = causal_mask_function if window is None else sliding_window_causal_mask_function(window)
            mask4 = sdpa_mask(
                batch_size=B,
                q_length=L,
                kv_length=L,
                mask_function=fn,
                attention_mask=padding,
                allow_is_causal_skip=False,
                local_size=window,
            )
            ref = capture_rows._reward_rows(
                q,
                k,
                mask4,
                index,
                kind="sdpa",
                scaling=0.3,
                causal=True,
                sliding_window=None,
                softcap=None,
                position_bias=None,
            )
            got = capture_rows._reward_rows(
                q,
                k,
                padding,
                index,
                kind="flash",
                scaling=0.3,
                causal=True,
                sliding_window=window,
                softcap=None,
                position_bias=None,
            )
            torch.testing.assert_close(got, ref, atol=1e-6, rtol=0)


def test_flash_module_view_reports_the_original_implementation():
    model = make_model("llama")
    attn = model.model.layers[0].self_attn
    view = capture_interface._ModuleView(attn, "flash_attention_2")
    assert view.config._attn_implementation == "flash_attention_2"
    assert view.layer_idx == 0 and view.is_causal and view.config.hidden_size == 64
    assert next(iter(view.modules())) is attn
    assert attn.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------------- score_and_densify


def test_score_and_densify():
    model = make_model("llama")
    ids, mask = make_batch("left")
    completion = mask.bool() & (torch.arange(L)[None] >= L - 4)
    scores, rewards = score_and_densify(model, ids, mask, completion, beta=0.8)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(scores, logits[:, 0].float(), atol=0, rtol=0)
    rows = eager_rows("llama", ids, mask, -1, expected_index("llama", ids))
    expected = dense_rlhf.dense_rewards(rows, scores, completion, beta=0.8)
    torch.testing.assert_close(rewards, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards.sum(1), scores, atol=1e-5, rtol=1e-5)
    assert rewards.shape == (B, L) and bool((rewards[~completion] == 0).all())


def test_score_and_densify_two_logits():
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            pad_token_id=PAD,
            num_labels=2,
        )
    ).eval()
    ids, mask = make_batch("right")
    completion = mask.bool() & (torch.arange(L)[None] >= 2)
    scores, rewards = score_and_densify(model, ids, mask, completion, beta=1.0)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(scores, logits[:, 1] - logits[:, 0])
    torch.testing.assert_close(rewards.sum(1), scores, atol=1e-5, rtol=1e-5)


def test_bfloat16_model():
    """Rows are computed in float32 from bf16 q and k; eager's bf16 rows agree to bf16 precision."""
    model = copy.deepcopy(make_model("llama")).to(torch.bfloat16)
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    ids, mask = make_batch("left")
    index = expected_index("llama", ids)
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with capture_reward_attention(model) as cap:
            logits = model(input_ids=ids, attention_mask=mask).logits
        expected = ref(input_ids=ids, attention_mask=mask, output_attentions=True).attentions[-1]
    assert torch.equal(logits, plain)
    assert cap.rows.dtype == torch.float32
    torch.testing.assert_close(cap.rows, expected[torch.arange(B), :, index, :].float(), atol=2e-2, rtol=0)
    torch.testing.assert_close(cap.rows.sum(-1), torch.ones(B, 4), atol=1e-5, rtol=0)


def test_under_bfloat16_autocast():
    """A reward model trained with bf16 autocast (trl's default) keeps it on its forward: rows stay float32."""
    model = make_model("llama")
    ids, mask = make_batch("left")
    index = expected_index("llama", ids)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        with capture_reward_attention(model) as cap:
            model(input_ids=ids, attention_mask=mask)
    expected = eager_rows("llama", ids, mask, -1, index)
    assert cap.rows.dtype == torch.float32
    torch.testing.assert_close(cap.rows, expected, atol=3e-2, rtol=0)
    torch.testing.assert_close(cap.rows.sum(-1), torch.ones_like(cap.rows[..., 0]), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------- prefix scores


def truncated_prefix_scores(model, ids, mask):
    """The naive computation: the model run on every truncated prefix ids[b, :t + 1] (padding kept), its pooled
    score read; NaN at padding positions, which are not prefixes of anything."""
    out = torch.full(ids.shape, float("nan"))
    with torch.no_grad():
        for b in range(ids.shape[0]):
            for t in range(ids.shape[1]):
                if mask[b, t]:
                    logits = model(input_ids=ids[b : b + 1, : t + 1], attention_mask=mask[b : b + 1, : t + 1]).logits
                    out[b, t] = logits[0, 0].float()
    return out


def differenced(prefix, completion):
    """Prefix-difference rewards (beta 1) from per-prefix scores, by a plain loop over each row's tokens."""
    out = torch.zeros(prefix.shape)
    for b in range(prefix.shape[0]):
        previous = 0.0
        for t in completion[b].nonzero().flatten().tolist():
            out[b, t] = prefix[b, t] - previous
            previous = prefix[b, t]
    return out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("padding", ["right", "left"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prefix_scores_match_running_every_truncated_prefix(arch, padding, dtype):
    model = make_model(arch)
    if dtype != torch.float32:
        model = copy.deepcopy(model).to(dtype)
    ids, mask = make_batch(padding)
    completion = mask.bool() & (
        torch.arange(L)[None]
        >= torch.tensor([[4], [2], [0]]) + (L - mask.sum(1, keepdim=True)) * int(padding == "left")
    )
    naive = truncated_prefix_scores(model, ids, mask)
    with torch.no_grad(), dense_rlhf.capture_prefix_scores(model) as cap:
        logits = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    tol = dict(atol=1e-5, rtol=0) if dtype == torch.float32 else dict(atol=4e-3, rtol=0)  # bf16: ~1 ulp at 0.5
    assert cap.prefix_scores.dtype == torch.float32 and cap.prefix_scores.shape == (B, L)
    torch.testing.assert_close(cap.prefix_scores[real], naive[real], **tol)
    assert torch.equal(cap.reward_index, expected_index(arch, ids))
    torch.testing.assert_close(cap.score, logits[:, 0].float(), atol=0, rtol=0)

    scores, rewards = score_and_densify(model, ids, mask, completion, method="prefix", beta=1.0)
    torch.testing.assert_close(scores, logits[:, 0].float(), atol=0, rtol=0)
    torch.testing.assert_close(rewards, differenced(naive, completion), **tol)
    torch.testing.assert_close(rewards.sum(1), scores, atol=1e-5, rtol=1e-5)
    assert bool((rewards[~completion] == 0).all())
    mixed = score_and_densify(model, ids, mask, completion, method="prefix", beta=0.8)[1]
    torch.testing.assert_close(
        mixed, 0.8 * rewards + 0.2 * dense_rlhf.sparse_rewards(scores, completion), atol=1e-6, rtol=1e-6
    )
    assert len(model.score._forward_hooks) == 0 and len(model._forward_hooks) == 0


def test_prefix_scores_guard_padding_and_position_matter():
    """Guards for the test above: padding and the prefix boundary both change the scores, so agreement means
    the capture reads prefixes, not a sequence that merely looks like one."""
    model = make_model("gpt2")
    ids, mask = make_batch("left")
    with torch.no_grad():
        with dense_rlhf.capture_prefix_scores(model) as cap:
            model(input_ids=ids, attention_mask=mask)
        unpadded = model(input_ids=ids[2:, 7:]).logits[0, 0]
        whole = model(input_ids=ids[:1], attention_mask=mask[:1]).logits[0, 0]
    assert (cap.prefix_scores[2, -1] - unpadded).abs() > 1e-4  # GPT-2's absolute positions see the pads
    assert (cap.prefix_scores[0, 5] - whole).abs() > 1e-4


def test_prefix_scores_two_logit_head():
    torch.manual_seed(0)
    model = GPT2ForSequenceClassification(
        GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, pad_token_id=PAD, num_labels=2)
    ).eval()
    ids, mask = make_batch("right")
    completion = mask.bool() & (torch.arange(L)[None] >= 2)
    naive = torch.full(ids.shape, float("nan"))
    with torch.no_grad():
        for b in range(B):
            for t in range(int(mask[b].sum())):
                logits = model(input_ids=ids[b : b + 1, : t + 1]).logits[0]
                naive[b, t] = logits[1] - logits[0]
    scores, rewards = score_and_densify(model, ids, mask, completion, method="prefix", beta=1.0)
    torch.testing.assert_close(rewards, differenced(naive, completion), atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards.sum(1), scores, atol=1e-5, rtol=1e-5)


def test_prefix_and_attention_captures_share_one_forward():
    model = make_model("llama")
    ids, mask = make_batch("left")
    with torch.no_grad(), capture_reward_attention(model) as rows, dense_rlhf.capture_prefix_scores(model) as prefix:
        model(input_ids=ids, attention_mask=mask)
    with torch.no_grad(), dense_rlhf.capture_prefix_scores(model) as alone:
        model(input_ids=ids, attention_mask=mask)
    torch.testing.assert_close(prefix.prefix_scores, alone.prefix_scores, atol=0, rtol=0)
    torch.testing.assert_close(rows.rows, eager_rows("llama", ids, mask, -1, expected_index("llama", ids)), **TOL)
    assert _all_closed()


def test_prefix_scores_refuse_encoders_and_models_without_a_score_head():
    with pytest.raises(ValueError, match="BertForSequenceClassification is not a causal decoder.*is_causal=False"):
        dense_rlhf.capture_prefix_scores(make_model("bert"))
    ids, mask = make_batch("right")
    with pytest.raises(ValueError, match="not a causal decoder"):
        score_and_densify(make_model("bert"), ids, mask, mask.bool(), method="prefix")
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(
        LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match="LlamaForCausalLM has no `score` head"):
        dense_rlhf.capture_prefix_scores(lm)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        dense_rlhf.capture_prefix_scores(torch.nn.Linear(2, 2))


def test_prefix_scores_check_the_pooled_position(monkeypatch):
    """A model that pools somewhere else than the capture reads fails loudly instead of giving wrong scores."""
    model = copy.deepcopy(make_model("llama"))
    ids, mask = make_batch("right")
    with torch.no_grad(), dense_rlhf.capture_prefix_scores(model) as cap:
        model.config.pad_token_id = None  # the model now pools the last position, the capture the last non-pad
        model(input_ids=ids[:1], attention_mask=mask[:1])
        model.config.pad_token_id = PAD
        model(input_ids=ids, attention_mask=mask)  # the last forward counts: consistent again
    assert torch.equal(cap.reward_index, expected_index("llama", ids))
    model.config.pad_token_id = PAD
    capture = dense_rlhf.capture_prefix_scores(model)
    model.config.pad_token_id = None
    with torch.no_grad(), capture:
        model(input_ids=ids[1:2], attention_mask=mask[1:2])
    with pytest.raises(RuntimeError, match="pooled score is not its score head's output"):
        capture.prefix_scores
    with pytest.raises(RuntimeError, match="no forward"):
        dense_rlhf.capture_prefix_scores(make_model("llama")).prefix_scores


def test_score_and_densify_methods_take_one_forward():
    model = make_model("gpt2")
    ids, mask = make_batch("left")
    completion = mask.bool() & (torch.arange(L)[None] >= L - 4)
    calls = []
    handle = model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        results = {}
        for method in ("abc", "prefix", "sparse", "uniform"):
            calls.clear()
            results[method] = score_and_densify(model, ids, mask, completion, method=method, beta=np.float32(0.8))
            assert len(calls) == 1, method
    finally:
        handle.remove()
    scores = results["abc"][0]
    for s, r in results.values():
        torch.testing.assert_close(s, scores, atol=0, rtol=0)
        torch.testing.assert_close(r.sum(1), scores, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results["sparse"][1], dense_rlhf.sparse_rewards(scores, completion))
    torch.testing.assert_close(results["uniform"][1], dense_rlhf.uniform_rewards(scores, completion))
    default = score_and_densify(model, ids, mask, completion, beta=0.8)  # "abc" stays the default
    torch.testing.assert_close(default[1], results["abc"][1], atol=0, rtol=0)


def test_score_and_densify_argument_errors():
    model = make_model("llama")
    ids, mask = make_batch("right")
    completion = mask.bool()
    with pytest.raises(ValueError, match="method must be one of"):
        score_and_densify(model, ids, mask, completion, method="red")
    with pytest.raises(ValueError, match="reward_index applies to method='abc'"):
        score_and_densify(model, ids, mask, completion, method="prefix", reward_index=3)
    with pytest.raises(TypeError, match="beta must be a real number.*got str"):
        score_and_densify(model, ids, mask, completion, method="sparse", beta="0.8")
    with pytest.raises(ValueError, match="beta must be a number in"):
        score_and_densify(model, ids, mask, completion, beta=torch.tensor(1.2))


def _bad_call(change):
    """(model, args, kwargs) of a right-padded llama batch, ``change``d."""
    model, (ids, mask) = make_model("llama"), make_batch("right")
    completion = mask.bool() & (torch.arange(L)[None] >= 3)
    args, kwargs = dict(input_ids=ids, attention_mask=mask, completion_mask=completion), {}
    return change(model, args, kwargs) or (model, args, kwargs)


def _emptied(model, args, kwargs):
    args["completion_mask"] = args["completion_mask"].clone()
    args["completion_mask"][1] = False


def _without_pad_id(model, args, kwargs):
    model = copy.deepcopy(model)
    model.config.pad_token_id = None
    return model, args, kwargs


def _three_labels(model, args, kwargs):
    model = copy.deepcopy(model)
    model.config.num_labels = 3
    model.score = torch.nn.Linear(model.score.in_features, 3, bias=False)
    return model, args, kwargs


@pytest.mark.parametrize("function", [score_and_densify, dense_rlhf.score_with_credit])
@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m, a, k: a.update(completion_mask=a["completion_mask"].long() * 2), "completion_mask must hold only 0"),
        (_emptied, r"completion_mask marks no completion token in rows \[1\]"),
        (lambda m, a, k: k.update(reward_index=torch.tensor([3, L, 0])), r"reward_index must be in \[-\d+, \d+\)"),
        (lambda m, a, k: k.update(reward_index=-L - 1), r"reward_index must be in"),
        (lambda m, a, k: k.update(reward_index=torch.tensor([1, 2, 3, 4])), r"reward_index must be an int or \[B\]"),
        (_three_labels, r"config.num_labels is 3; a reward model has one logit"),
        (_without_pad_id, r"attention_mask pads the batch but the reward model's config.pad_token_id is None"),
    ],
    ids=["mask-values", "empty-row", "index-range", "index-negative", "index-length", "num-labels", "no-pad-id"],
)
def test_argument_errors_come_before_the_forward(function, change, match):
    model, args, kwargs = _bad_call(change)
    handle = model.register_forward_pre_hook(lambda *a: pytest.fail("the reward model's forward ran"))
    try:
        with pytest.raises(ValueError, match=match):
            function(model, *args.values(), **kwargs)
    finally:
        handle.remove()
