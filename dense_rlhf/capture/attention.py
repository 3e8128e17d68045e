"""What a reward model's ordinary forward gives for free: its attention rows from the reward position (for ABC),
without ``output_attentions``, and its score at every position (for prefix-difference rewards).

ABC needs, from one layer of the reward model, each head's attention row from the token whose hidden state
the score head reads. ``output_attentions=True`` forces eager attention and keeps every layer's
[B, H, L, L] maps; this module instead computes only the B * H needed rows, inside the model's own
attention implementation (sdpa, eager or flash attention), from the query and key tensors that the
attention function receives (so after rotary embeddings, with grouped-query heads and the model's mask).

How it works: an attention function is registered in transformers' ``AttentionInterface`` under the
name ``"dense_rlhf_capture_<original>"`` (and the original's mask function under the same name in the
``AttentionMaskInterface``: without it the model would silently build no padding mask at all). While a
capture is open, the model's configs point at that name; the function calls the original implementation
with unchanged arguments, and for the captured layer, in the thread that opened the capture, also computes
``softmax(q[reward_index] . K^T * scaling + mask)`` in float32 for every query head.

The names stay registered once registered, for the life of the process: transformers reads the name from the
config, checks that it is registered, then looks it up, and a forward of the same model in another thread may
have read the name just before a capture closes. Unregistering then would give that forward a ``KeyError``, or
eager attention fed with another implementation's mask. Registered, the function is a pass-through to the
original implementation whenever no capture is open for the calling thread.

Prefix scores need no attention at all: a decoder ``*ForSequenceClassification`` model applies its ``score``
head at every position before pooling the last non-pad one, so a forward hook on that head
(``capture_prefix_scores``) reads the score of every prefix in the same forward.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Any

import torch

__all__ = ["RewardAttentionCapture", "PrefixScoreCapture", "capture_reward_attention", "capture_prefix_scores",
           "score_and_densify"]

PREFIX = "dense_rlhf_capture_"
SUPPORTED = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")

_lock = threading.RLock()
_swaps: dict[int, list[Any]] = {}  # id(config) -> [config, original _attn_implementation_internal, refcount]
_by_config: dict[int, list["RewardAttentionCapture"]] = {}  # id(config) -> open captures on that config
_registered: set[str] = set()  # originals whose capturing names are registered (never removed)


def _kind(orig: str) -> str:
    return "flash" if orig.startswith("flash_attention_") else orig


# ----------------------------------------------------------------------------------------- registration


def _register_attention(orig: str) -> None:
    from transformers.modeling_utils import AttentionInterface

    AttentionInterface.register(PREFIX + orig, _make_attention(orig))


def _register_mask(orig: str) -> None:
    """Give the new name the original's mask function. Without this, transformers' mask creation returns
    None for an unknown name (see masking_utils._preprocess_mask_arguments) and padded batches are silently
    attended as if unpadded."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    def mask_function(*args, **kwargs):
        return ALL_MASK_ATTENTION_FUNCTIONS[orig](*args, **kwargs)

    AttentionMaskInterface.register(PREFIX + orig, mask_function)


def _original_function(orig: str, module: torch.nn.Module):
    """The function the module itself would have called for ``orig``: looked up in the interface instance
    of the module's modelling file (which may override entries locally), with that file's eager function
    as the default, exactly as ``ALL_ATTENTION_FUNCTIONS.get_interface(name, eager_attention_forward)``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

    source = sys.modules.get(type(module).__module__)
    interface = getattr(source, "ALL_ATTENTION_FUNCTIONS", None)
    if not isinstance(interface, AttentionInterface):
        interface = ALL_ATTENTION_FUNCTIONS
    default = getattr(source, "eager_attention_forward", None)
    function = interface.get_interface(orig, default)
    if function is None:
        raise RuntimeError(
            f"capture_reward_attention: {type(module).__name__} uses '{orig}' attention but its modelling file "
            "has no eager_attention_forward to call"
        )
    return function


class _ConfigView:
    """Read-through view of a config that reports the original attention implementation (flash attention
    loads its kernels by that name)."""

    def __init__(self, config, orig):
        self.__dict__["_config"] = config
        self.__dict__["_attn_implementation"] = orig

    def __getattr__(self, name):
        return getattr(self.__dict__["_config"], name)


class _ModuleView:
    """Read-through view of an attention module whose ``config`` is a ``_ConfigView``."""

    def __init__(self, module, orig):
        self.__dict__["_module"] = module
        self.__dict__["config"] = _ConfigView(module.config, orig)

    def __getattr__(self, name):
        return getattr(self.__dict__["_module"], name)


def _make_attention(orig: str):
    kind = _kind(orig)

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        thread = threading.get_ident()
        for capture in tuple(_by_config.get(id(getattr(module, "config", None)), ())):
            if capture._owner == thread:
                capture._observe(module, query, key, attention_mask, kind, kwargs)
        target = _ModuleView(module, orig) if kind == "flash" else module
        return _original_function(orig, module)(target, query, key, value, attention_mask, *args, **kwargs)

    attention.__name__ = f"{PREFIX}{orig}"
    attention.__qualname__ = attention.__name__
    return attention


# ----------------------------------------------------------------------------------------- the rows


def _reward_rows(query, key, attention_mask, index, **kwargs):
    """float32 [B, Hq, L]: softmax over keys of q[b, h, index[b]] . k[b, h // rep] * scaling + mask.

    Autocast is switched off so that the rows stay float32 when the forward runs under it (trl trains reward
    models with bf16 autocast, which stays on the trained model's forward).
    """
    with torch.autocast(query.device.type, enabled=False):
        return _reward_rows_fp32(query, key, attention_mask, index, **kwargs)


def _reward_rows_fp32(query, key, attention_mask, index, *, kind, scaling, causal, sliding_window, softcap,
                      position_bias):
    batch, q_heads, q_len, dim = query.shape
    kv_heads, length = key.shape[1], key.shape[2]
    if q_heads % kv_heads:
        raise ValueError(f"capture_reward_attention: {q_heads} query heads are not a multiple of {kv_heads} kv heads")
    rows = torch.arange(batch, device=query.device)
    q = query[rows, :, index, :].float().reshape(batch, kv_heads, q_heads // kv_heads, dim)
    k = key.float()
    scores = torch.matmul(q, k.transpose(-1, -2)).reshape(batch, q_heads, length)
    scores = scores * (dim**-0.5 if scaling is None else scaling)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if position_bias is not None:
        bias = position_bias[..., :length].expand(batch, -1, -1, -1)
        scores = scores + bias[rows, :, index, :].float()

    lowest = torch.finfo(torch.float32).min
    keys = torch.arange(length, device=query.device)
    if kind in ("sdpa", "eager") and attention_mask is not None:
        if attention_mask.dim() != 4:
            raise NotImplementedError(
                f"capture_reward_attention: expected a 4D attention mask for {kind}, got {tuple(attention_mask.shape)}"
            )
        mask = attention_mask[..., :length].expand(batch, -1, -1, -1)[rows, :, index, :]  # [B, 1 or H, L]
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, lowest)
        else:
            scores = scores + mask.float()
    else:
        keep = torch.ones(batch, length, dtype=torch.bool, device=query.device)
        if kind == "flash" and attention_mask is not None:
            if attention_mask.dim() != 2:
                raise NotImplementedError(
                    f"capture_reward_attention: expected a 2D padding mask for flash attention, got "
                    f"{tuple(attention_mask.shape)}"
                )
            keep = attention_mask[:, -length:].bool()
        apply_causal = causal and (kind != "sdpa" or q_len > 1) and kind != "eager"
        if apply_causal:
            keep = keep & (keys[None, :] <= index[:, None])
        if kind == "flash" and sliding_window is not None and length > sliding_window:
            distance = index[:, None] - keys[None, :]
            keep = keep & (distance < sliding_window) & (causal | (distance > -sliding_window))
        scores = scores.masked_fill(~keep[:, None, :], lowest)
    return torch.softmax(scores, dim=-1)


# ----------------------------------------------------------------------------------------- the capture


def _configs_of(model) -> list:
    from transformers import PreTrainedConfig

    found, seen = [], set()
    stack = [getattr(m, "config", None) for m in model.modules()]
    while stack:
        config = stack.pop()
        if not isinstance(config, PreTrainedConfig) or id(config) in seen:
            continue
        seen.add(id(config))
        found.append(config)
        stack.extend(getattr(config, key, None) for key in getattr(config, "sub_configs", {}) or {})
    return found


def _is_self_attention(module) -> bool:
    name = type(module).__name__.lower()
    return "attention" in name and "cross" not in name and not getattr(module, "is_cross_attention", False)


class RewardAttentionCapture:
    """Context manager returned by :func:`capture_reward_attention`; read ``rows`` after the forward."""

    def __init__(self, model, *, layer: int = -1, reward_index=None):
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise TypeError(
                "capture_reward_attention needs a transformers PreTrainedModel whose attention goes through "
                f"AttentionInterface, got {type(model).__name__}"
            )
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layer must be an int, got {type(layer).__name__}")
        if isinstance(reward_index, bool) or not isinstance(reward_index, (type(None), int, torch.Tensor)):
            raise TypeError(f"reward_index must be None, an int or a [B] integer tensor, got {reward_index!r}")
        if isinstance(reward_index, torch.Tensor) and (
            reward_index.dtype.is_floating_point or reward_index.dtype.is_complex
            or reward_index.dtype == torch.bool or reward_index.dim() > 1
        ):
            raise TypeError(f"reward_index tensor must be integer with shape [B], got {reward_index.dtype} "
                            f"{tuple(reward_index.shape)}")
        self.model = model
        self._reward_index_arg = reward_index
        text_config = model.config.get_text_config()
        n_layers = getattr(text_config, "num_hidden_layers", None)
        if not isinstance(n_layers, int):
            raise ValueError(f"{type(model).__name__}'s config has no num_hidden_layers; cannot resolve layer={layer}")
        if not -n_layers <= layer < n_layers:
            raise IndexError(f"layer={layer} is out of range for a model with {n_layers} layers "
                             f"(use -{n_layers} .. {n_layers - 1})")
        self.layer = layer % n_layers
        self._pad_token_id = getattr(text_config, "pad_token_id", None)
        self._targets = {id(m): m for m in model.modules()
                         if getattr(m, "layer_idx", None) == self.layer and _is_self_attention(m)}
        if not self._targets:
            raise ValueError(f"capture_reward_attention: found no self-attention module with layer_idx={self.layer} "
                             f"in {type(model).__name__}")
        self._rows = None
        self._index = None
        self._error: str | None = None
        self._forwards = 0
        self._entered = False
        self._exited = False

    # -- the public results -------------------------------------------------------------------------------

    @property
    def rows(self) -> torch.Tensor:
        """float32 [B, H, L]: per query head, the attention row from the reward position (last forward)."""
        if self._error is not None:
            raise RuntimeError(self._error)
        if self._rows is None:
            raise RuntimeError("capture_reward_attention: no forward of the model ran inside the capture")
        return self._rows

    @property
    def reward_index(self) -> torch.Tensor:
        """long [B]: the query position each row was taken from (last forward)."""
        self.rows  # raises the same errors
        return self._index

    # -- entering and leaving -----------------------------------------------------------------------------

    def __enter__(self) -> "RewardAttentionCapture":
        if self._entered:
            raise RuntimeError("a capture_reward_attention object can be entered only once; create a new one")
        model = self.model
        if not type(model)._can_set_attn_implementation():
            raise ValueError(f"{type(model).__name__} does not route its attention through transformers' "
                             "AttentionInterface, so its attention cannot be captured")
        target_configs = {id(m.config) for m in self._targets.values() if getattr(m, "config", None) is not None}
        configs = []
        for config in _configs_of(model):
            impl = config._attn_implementation
            orig = impl[len(PREFIX):] if isinstance(impl, str) and impl.startswith(PREFIX) else impl
            if orig in SUPPORTED:
                configs.append((config, orig))
            elif id(config) in target_configs:
                raise NotImplementedError(
                    f"capture_reward_attention supports attention implementations {SUPPORTED}, "
                    f"but layer {self.layer} uses {impl!r}"
                )
        if not any(id(c) in target_configs for c, _ in configs):
            raise ValueError(f"capture_reward_attention: the attention modules of layer {self.layer} have no config "
                             "to switch to the capturing implementation")
        for config, orig in configs:
            if orig == "eager" and any(getattr(m, "reorder_and_upcast_attn", False) for m in model.modules()):
                raise NotImplementedError("capture_reward_attention: eager attention with reorder_and_upcast_attn=True "
                                          "(GPT-2) bypasses AttentionInterface; use sdpa or disable it")
        self._owner = threading.get_ident()
        self._depth = 0
        self._inputs = None
        self._entered = True
        with _lock:
            self._configs = []
            try:
                for config, orig in configs:
                    if orig not in _registered:
                        _register_attention(orig)
                        _register_mask(orig)
                        _registered.add(orig)
                    swap = _swaps.get(id(config))
                    if swap is None:
                        swap = _swaps[id(config)] = [config, config._attn_implementation_internal, 0]
                        config._attn_implementation_internal = PREFIX + orig
                    swap[2] += 1
                    self._configs.append(config)
                    _by_config.setdefault(id(config), []).append(self)
                self._hooks = [
                    model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                    model.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True),
                ]
            except BaseException:
                self._release()
                raise
        return self

    def __exit__(self, *exc) -> bool:
        with _lock:
            if not self._exited:
                self._exited = True
                for hook in getattr(self, "_hooks", ()):
                    hook.remove()
                self._release()
        return False

    def _release(self) -> None:
        """Undo this capture's config swaps (called under the lock); the names stay registered (module docstring)."""
        for config in self._configs:
            captures = _by_config.get(id(config), [])
            if self in captures:
                captures.remove(self)
            if not captures:
                _by_config.pop(id(config), None)
            swap = _swaps[id(config)]
            swap[2] -= 1
            if swap[2] == 0:
                del _swaps[id(config)]
                config._attn_implementation_internal = swap[1]
        self._configs = []

    # -- hooks --------------------------------------------------------------------------------------------

    def _pre_hook(self, module, args, kwargs):
        if threading.get_ident() != self._owner:
            return None
        if self._depth == 0:
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
            self._inputs = (
                input_ids if isinstance(input_ids, torch.Tensor) else None,
                mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None,
            )
            self._reached = False
            self._saw_interface = False
            self._error = None
            self._rows = None
            self._index = None
        self._depth += 1
        return None

    def _post_hook(self, module, args, kwargs, output):
        if threading.get_ident() != self._owner:
            return None
        self._depth -= 1
        if self._depth == 0:
            self._forwards += 1
            self._inputs = None
            if not self._reached and self._error is None:
                if not self._saw_interface:
                    self._error = (f"capture_reward_attention: the forward of {type(self.model).__name__} never called "
                                   "an attention function through transformers' AttentionInterface; its attention "
                                   "cannot be captured")
                else:
                    self._error = (f"capture_reward_attention: the forward never reached layer {self.layer}'s "
                                   "attention, so there are no rows")
        return None

    # -- called from the attention function ---------------------------------------------------------------

    def _observe(self, module, query, key, attention_mask, kind, kwargs) -> None:
        if self._exited:
            return
        self._saw_interface = True
        if id(module) not in self._targets:
            return
        batch, _, q_len, _ = query.shape
        length = key.shape[2]
        if q_len != length:
            raise NotImplementedError(
                f"capture_reward_attention: layer {self.layer} got {q_len} queries for {length} keys; capture needs a "
                "full forward over the whole sequence (no cached prefix)"
            )
        if kwargs.get("s_aux") is not None:
            raise NotImplementedError("capture_reward_attention: attention sinks (s_aux) are not supported")
        is_causal = kwargs.get("is_causal")
        causal = bool(getattr(module, "is_causal", True) if is_causal is None else is_causal)
        if kind == "flash" and attention_mask is None:
            if kwargs.get("cu_seq_lens_q") is not None:
                raise NotImplementedError(
                    "capture_reward_attention: padding-free (cu_seq_lens) batches are not supported")
            from transformers.modeling_flash_attention_utils import _is_packed_sequence

            if _is_packed_sequence(kwargs.get("position_ids"), batch):
                raise NotImplementedError("capture_reward_attention: packed sequences (position_ids) are not supported")

        if attention_mask is None:
            self._check_mask_delivered(length)
        index = self._resolve_index(batch, length, causal, query.device)
        with torch.no_grad():
            rows = _reward_rows(
                query.detach(), key.detach(), attention_mask, index,
                kind=kind, scaling=kwargs.get("scaling"), causal=causal,
                sliding_window=kwargs.get("sliding_window"), softcap=kwargs.get("softcap"),
                position_bias=kwargs.get("position_bias"),
            )
        self._rows, self._index, self._reached = rows, index, True

    def _check_mask_delivered(self, length) -> None:
        """Fail loudly if the forward's 2D mask has padding but the attention function got no mask (what
        happens when the new attention name has no mask function registered)."""
        input_mask = self._inputs[1] if self._inputs is not None else None
        if input_mask is not None and input_mask.shape[-1] == length and not bool(input_mask.bool().all()):
            raise RuntimeError(
                "capture_reward_attention: the batch is padded but the attention function received no mask. "
                f"The mask function for '{PREFIX}...' is missing from transformers' AttentionMaskInterface, so the "
                "model would attend to padding; this is a bug in dense_rlhf.capture"
            )

    def _resolve_index(self, batch, length, causal, device) -> torch.Tensor:
        given = self._reward_index_arg
        if given is not None:
            index = torch.as_tensor(given, device=device).long().reshape(-1)
            if index.numel() == 1:
                index = index.expand(batch)
            if index.shape != (batch,):
                raise ValueError(f"reward_index must be an int or [B]=[{batch}], got {tuple(index.shape)}")
            bad = (index < -length) | (index >= length)
            if bool(bad.any()):
                raise ValueError(f"reward_index out of range for sequence length {length}: {given}")
            return index % length
        if not causal:  # bidirectional encoder (BERT-style): the classification head pools the first token
            return torch.zeros(batch, dtype=torch.long, device=device)
        if self._inputs is None:
            raise RuntimeError(
                "capture_reward_attention: the layer ran outside a forward of the captured model, so the reward "
                "position is unknown; call the model passed to capture_reward_attention or pass reward_index"
            )
        input_ids = self._inputs[0]
        if input_ids is None or self._pad_token_id is None:  # as transformers: the last position
            return torch.full((batch,), length - 1, dtype=torch.long, device=device)
        if input_ids.shape != (batch, length):
            raise ValueError(f"capture_reward_attention: input_ids {tuple(input_ids.shape)} do not match the "
                             f"attention's batch {batch} and length {length}")
        return _last_non_pad(input_ids.to(device), self._pad_token_id)


def _last_non_pad(input_ids: torch.Tensor, pad_token_id: int) -> torch.Tensor:
    """The rightmost token that is not pad_token_id (left or right padding), as the *ForSequenceClassification
    heads of transformers pool it. long [B]."""
    non_pad = (input_ids != pad_token_id).to(torch.int32)
    positions = torch.arange(input_ids.shape[1], device=input_ids.device, dtype=torch.int32)
    return (positions * non_pad).argmax(-1).long()


def capture_reward_attention(model, *, layer: int = -1, reward_index=None) -> RewardAttentionCapture:
    """Record, during the model's ordinary forward, each head's attention row from the reward position.

    Usage::

        with dense_rlhf.capture_reward_attention(rm) as cap:
            logits = rm(input_ids=ids, attention_mask=mask).logits
        rows = cap.rows  # float32 [B, H, L]

    Args:
        model: a transformers ``PreTrainedModel`` (e.g. ``LlamaForSequenceClassification``) whose attention
            goes through ``AttentionInterface`` with ``attn_implementation`` "sdpa", "eager" or
            "flash_attention_2/3/4" (flash: not tested here, no GPU).
        layer: which layer's self-attention (``layer_idx``), negative counts from the end; default the last.
        reward_index: the query position of the rows: an int or a [B] integer tensor (negative counts from
            the end). Default: for causal models the rightmost token that is not ``pad_token_id`` (what
            transformers' ``*ForSequenceClassification`` heads pool, left or right padding; the last position
            if there is no pad_token_id or no input_ids); for bidirectional encoders (BERT-style), position 0.

    After the forward, ``cap.rows`` is float32 [B, H, L] with H the number of query heads: softmax in
    float32 of ``q[b, h, i_b] . k[b, h // (H / H_kv)] * scaling`` plus the model's mask (padding, causal,
    sliding window), from the post-rotary query and key that the attention function receives. It equals
    eager attention's ``output_attentions`` row up to float32 rounding. Attention dropout is not applied
    (the probabilities before dropout; run reward models in eval mode). ``cap.reward_index`` gives the
    positions used. If several forwards run inside the capture, the last one's rows are kept. Rows never
    require grad.

    Extra memory: the rows (B * H * L floats) plus, while the captured layer runs, a float32 copy of that
    layer's key (only when the model is not float32) and [B, H, L] scores; never a [B, H, L, L] map.

    Model outputs are bit-identical to a run without the capture: the original attention function gets
    the same arguments. On exit (also when the forward raises) the configs' ``_attn_implementation`` are
    restored exactly and the hooks are removed. The names ``"dense_rlhf_capture_<original>"`` stay registered
    in transformers' interfaces, as pass-throughs to the original implementation (see the module docstring).

    Several captures compose: in sequence, nested (also on the same model and layer; each gets its rows),
    or on different models. Threads: entering and leaving are guarded by a lock; rows are recorded only
    from forwards run in the thread that entered the capture. A capture never changes other threads'
    forwards: while it is open, forwards of the same model in other threads go through the capturing
    function, which passes them to the original implementation (bit-identical outputs, nothing recorded),
    also when the capture opens or closes in the middle of such a forward. One capture object must not be
    shared between threads, and torch.compile / CUDA-graph capture of the forward are not supported.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``, or bad argument types.
        IndexError: ``layer`` out of range.
        ValueError: the model class does not route attention through ``AttentionInterface``; a bad
            ``reward_index``.
        NotImplementedError: an attention implementation other than sdpa/eager/flash, attention sinks,
            cached prefixes, padding-free/packed flash batches.
        RuntimeError (reading ``cap.rows``): no forward ran, the forward never reached the layer, or the
            model's attention never went through the interface.
    """
    return RewardAttentionCapture(model, layer=layer, reward_index=reward_index)


# ----------------------------------------------------------------------------------------- prefix scores


def _score_of(logits: torch.Tensor, what: str) -> torch.Tensor:
    """The score of [..., 1] or [..., 2] logits in float32: the logit, or logit[1] - logit[0]."""
    if logits.shape[-1] not in (1, 2):
        raise ValueError(f"{what} must have 1 or 2 logits per position (a one-logit score or a two-class head), "
                         f"got {tuple(logits.shape)}")
    logits = logits.float()
    return logits[..., 0] if logits.shape[-1] == 1 else logits[..., 1] - logits[..., 0]


def _pooled_scores(logits: torch.Tensor, caller: str) -> torch.Tensor:
    """float32 [B] scores from a reward model's pooled [B, 1] or [B, 2] logits (see :func:`_score_of`)."""
    if logits.dim() != 2 or logits.shape[-1] not in (1, 2):
        raise ValueError(f"{caller} needs [B, 1] or [B, 2] logits from the reward model, got {tuple(logits.shape)}")
    return _score_of(logits, "the reward model's logits")


def _bidirectional_reason(model) -> str | None:
    """Why the model's positions are not prefixes (an encoder-decoder or non-causal self-attention), or None."""
    if getattr(model.config, "is_encoder_decoder", False):
        return "it is an encoder-decoder"
    for module in model.modules():
        if _is_self_attention(module) and getattr(module, "is_causal", None) is False:
            return f"its self-attention {type(module).__name__} is bidirectional (is_causal=False)"
    return None


class PrefixScoreCapture:
    """Context manager returned by :func:`capture_prefix_scores`; read ``prefix_scores`` after the forward."""

    def __init__(self, model):
        from transformers import PreTrainedModel

        if not isinstance(model, PreTrainedModel):
            raise TypeError(f"capture_prefix_scores needs a transformers PreTrainedModel, got {type(model).__name__}")
        reason = _bidirectional_reason(model)
        if reason is not None:
            raise ValueError(
                f"capture_prefix_scores: {type(model).__name__} is not a causal decoder ({reason}), so its score "
                "head's output at position t depends on later tokens and is not the score of the prefix ending "
                "at t. Prefix scores need a decoder reward model (e.g. LlamaForSequenceClassification)"
            )
        head = getattr(model, "score", None)
        if not isinstance(head, torch.nn.Module):
            raise ValueError(
                f"capture_prefix_scores: {type(model).__name__} has no `score` head. It needs a decoder "
                "*ForSequenceClassification model, whose `score` module maps every position's hidden state to "
                "logits before the last non-pad position is pooled"
            )
        self.model, self._head = model, head
        self._pad_token_id = getattr(model.config.get_text_config(), "pad_token_id", None)
        self._entered = self._exited = False
        self._hooks = []
        self._reset()

    def _reset(self):
        self._input_ids = None
        self._head_out = None
        self._prefix_scores = self._score = self._index = None
        self._error: str | None = None
        self._depth = 0

    @property
    def prefix_scores(self) -> torch.Tensor:
        """float32 [B, L]: the score read at every position, i.e. the score of the prefix ending there."""
        if self._error is not None:
            raise RuntimeError(self._error)
        if self._prefix_scores is None:
            raise RuntimeError("capture_prefix_scores: no forward of the model ran inside the capture")
        return self._prefix_scores

    @property
    def reward_index(self) -> torch.Tensor:
        """long [B]: the position the model pooled its score from (last forward)."""
        self.prefix_scores  # raises the same errors
        return self._index

    @property
    def score(self) -> torch.Tensor:
        """float32 [B]: the model's pooled score (equal to ``prefix_scores`` at ``reward_index``)."""
        self.prefix_scores
        return self._score

    def __enter__(self) -> "PrefixScoreCapture":
        if self._entered:
            raise RuntimeError("a capture_prefix_scores object can be entered only once; create a new one")
        self._entered = True
        self._owner = threading.get_ident()
        self._hooks = [
            self.model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
            self._head.register_forward_hook(self._head_hook),
            self.model.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True),
        ]
        return self

    def __exit__(self, *exc) -> bool:
        if not self._exited:
            self._exited = True
            for hook in self._hooks:
                hook.remove()
        return False

    def _pre_hook(self, module, args, kwargs):
        if threading.get_ident() != self._owner:
            return None
        if self._depth == 0:
            self._reset()
            input_ids = kwargs.get("input_ids", args[0] if args else None)
            self._input_ids = input_ids if isinstance(input_ids, torch.Tensor) else None
        self._depth += 1
        return None

    def _head_hook(self, module, args, output):
        if threading.get_ident() == self._owner and self._depth > 0 and isinstance(output, torch.Tensor):
            self._head_out = output.detach()

    def _post_hook(self, module, args, kwargs, output):
        if threading.get_ident() != self._owner:
            return None
        self._depth -= 1
        if self._depth == 0:
            self._finish(output)
        return None

    def _finish(self, output) -> None:
        """Turn the head's [B, L, C] output into scores, find the pooled position, check it against the output."""
        name = type(self.model).__name__
        head_out, input_ids = self._head_out, self._input_ids
        self._head_out = self._input_ids = None
        logits = getattr(output, "logits", None)
        if logits is None and isinstance(output, (tuple, list)) and output:
            logits = output[0]
        if head_out is None:
            self._error = f"capture_prefix_scores: the forward of {name} never called its `score` head"
            return
        if head_out.dim() != 3 or not isinstance(logits, torch.Tensor) or logits.dim() != 2:
            self._error = (f"capture_prefix_scores: expected the `score` head to give [B, L, C] logits and the model "
                           f"pooled [B, C] logits, got {tuple(head_out.shape)} and "
                           f"{tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__}")
            return
        with torch.no_grad():
            try:
                scores = _score_of(head_out, "the score head's output")
                pooled = _score_of(logits.detach(), "the model's logits")
            except ValueError as error:
                self._error = f"capture_prefix_scores: {error}"
                return
            batch, length = scores.shape
            if input_ids is None or self._pad_token_id is None:  # as transformers: the last position
                index = torch.full((batch,), length - 1, dtype=torch.long, device=scores.device)
            else:
                index = _last_non_pad(input_ids.to(scores.device), self._pad_token_id)
            at_index = scores[torch.arange(batch, device=scores.device), index]
            if pooled.shape != at_index.shape or not torch.allclose(at_index, pooled, rtol=1e-5, atol=1e-5,
                                                                    equal_nan=True):
                self._error = (f"capture_prefix_scores: {name}'s pooled score is not its score head's output at the "
                               "last non-pad position, so the head's per-position outputs cannot be read as prefix "
                               "scores")
                return
        self._prefix_scores, self._score, self._index = scores, pooled, index


def capture_prefix_scores(model) -> PrefixScoreCapture:
    """Record, during the reward model's ordinary forward, its score at every position: the prefix scores.

    A decoder ``*ForSequenceClassification`` model applies its ``score`` head to every position's hidden
    state and then pools the logits of the last non-pad token. In a causal model position t sees only the
    tokens up to t, so the head's output there is the score the model would give the sequence truncated at
    t: one forward yields the score of every prefix, which is what :func:`dense_rlhf.prefix_rewards` needs.

    Usage::

        with torch.no_grad(), dense_rlhf.capture_prefix_scores(rm) as cap:
            rm(input_ids=ids, attention_mask=mask)
        rewards = dense_rlhf.prefix_rewards(cap.prefix_scores, completion_mask, reward_index=cap.reward_index)

    After the forward: ``cap.prefix_scores`` float32 [B, L] (the logit of a one-logit head, or
    ``logit[1] - logit[0]`` of a two-logit head, at every position; values at padding are meaningless),
    ``cap.reward_index`` long [B] (the position the model pooled: the rightmost token that is not
    ``pad_token_id``, or the last position without one) and ``cap.score`` float32 [B] (the model's pooled
    score). The capture checks that the pooled score equals the head's output at ``reward_index``, so a model
    that pools some other way fails loudly instead of giving wrong prefix scores. A forward hook on the head
    (removed on exit) is all it adds: outputs are unchanged, the extra memory is the [B, L] scores. Only
    forwards in the thread that entered the capture are recorded; with several, the last one is kept.

    Prefix scores are out of distribution when the reward model was trained on complete sequences only (or
    reads its score at an appended end token): how informative they are is a property of the reward model.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``.
        ValueError: a bidirectional encoder (BERT-style) or encoder-decoder, whose positions are not prefixes;
            a model without a ``score`` head.
        RuntimeError (reading the results): no forward ran, the head was not called, its output is not
            [B, L, 1 or 2], or the pooled score does not match it.
    """
    return PrefixScoreCapture(model)


# ----------------------------------------------------------------------------------------- score_and_densify

METHODS = ("abc", "prefix", "sparse", "uniform")


def score_and_densify(model, input_ids, attention_mask, completion_mask, *, method: str = "abc", beta=0.8,
                      layer: int = -1, reward_index=None):
    """Run a reward model once and return ``(scores [B] float32, rewards [B, L] float32)``.

    The score is the logit for a one-logit head, ``logit[1] - logit[0]`` for a two-logit head (in float32).
    ``completion_mask`` [B, L] marks completion tokens in the same positions as ``input_ids`` (prompt and
    padding False). Every method takes one forward, under ``torch.no_grad()``, and each row of the rewards
    sums to its score:

    - ``"abc"`` (default): :func:`dense_rlhf.dense_rewards` of the attention rows captured from ``layer``
      (:func:`capture_reward_attention`) at the reward position (``reward_index``, default the position the
      model pools), heads averaged, restricted to ``completion_mask`` and normalised, mixed by ``beta``.
    - ``"prefix"``: :func:`dense_rlhf.prefix_rewards` of the score at every position
      (:func:`capture_prefix_scores`; decoder ``*ForSequenceClassification`` models only), with the reward
      position where the model pools its score, mixed by ``beta``.
    - ``"sparse"``: the score on the last completion token; ``"uniform"``: score / n on each of the n.

    ``beta`` is checked for every method and used by "abc" and "prefix"; ``layer`` applies to "abc" only, and
    so does ``reward_index`` (any other method raises if it is given: the prefix method reads the score where
    the model pools it).

    Before the forward, a ``completion_mask`` that puts the score where the reward model did not read is
    refused (ValueError naming the rows): tokens on padding (``attention_mask`` 0), and, for a causal reward
    model without an explicit ``reward_index``, a row whose completion tokens all come after the position the
    model pools (the sparse fallback would put the whole score on a pad).
    """
    from dense_rlhf.ops import check_beta, dense_rewards, prefix_rewards, sparse_rewards, uniform_rewards

    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    beta = check_beta(beta)
    if reward_index is not None and method != "abc":
        raise ValueError(f"reward_index applies to method='abc' (the attention row), not to method={method!r}")
    _check_completion_mask(model, input_ids, attention_mask, completion_mask, reward_index)
    with torch.no_grad():
        if method == "abc":
            capture = capture_reward_attention(model, layer=layer, reward_index=reward_index)
        elif method == "prefix":
            capture = capture_prefix_scores(model)
        else:
            capture = contextlib.nullcontext()
        with capture:
            out = model(input_ids=input_ids, attention_mask=attention_mask)
        scores = _pooled_scores(out.logits if hasattr(out, "logits") else out[0], "score_and_densify")
        if method == "abc":
            rewards = dense_rewards(capture.rows, scores, completion_mask, beta=beta, layout="rows")
        elif method == "prefix":
            rewards = prefix_rewards(capture.prefix_scores, completion_mask, beta=beta,
                                     reward_index=capture.reward_index)
        elif method == "sparse":
            rewards = sparse_rewards(scores, completion_mask)
        else:
            rewards = uniform_rewards(scores, completion_mask)
    return scores, rewards


def _check_completion_mask(model, input_ids, attention_mask, completion_mask, reward_index) -> None:
    """Refuse completion masks that put the score where the reward model did not read: on padding, or (a causal
    reward model, the reward position where it pools) only after that position, where the attention row and
    the prefix scores have nothing and the sparse fallback would put the whole score on a pad."""
    from dense_rlhf.ops import _mask

    mask = _mask(completion_mask)
    if not isinstance(input_ids, torch.Tensor) or input_ids.shape != mask.shape:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ValueError(f"completion_mask {tuple(mask.shape)} must have input_ids' shape, got input_ids {shape}")
    problems = []
    if isinstance(attention_mask, torch.Tensor) and attention_mask.shape == mask.shape:
        on_padding = (mask & (attention_mask.to(mask.device) == 0)).any(dim=1)
        problems.append(("padding (attention_mask 0)", on_padding))
    pad_token_id = getattr(model.config.get_text_config(), "pad_token_id", None)
    if reward_index is None and _bidirectional_reason(model) is None and pad_token_id is not None:
        pooled = _last_non_pad(input_ids.to(mask.device), pad_token_id)
        positions = torch.arange(mask.shape[1], device=mask.device)
        read = (mask & (positions[None, :] <= pooled[:, None])).any(dim=1)
        problems.append(("only tokens after the position the reward model reads its score from (its last non-pad "
                         "token)", mask.any(dim=1) & ~read))
    for what, rows in problems:
        bad = rows.nonzero().flatten().tolist()
        if bad:
            raise ValueError(f"score_and_densify: completion_mask marks {what} in rows {bad[:10]}: the reward "
                             "model's score does not reflect those tokens, so no reward can be put on them")
