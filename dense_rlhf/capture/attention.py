"""ABC's input from a reward model's ordinary forward: each head's attention row from the reward position
(:func:`capture_reward_attention`), without ``output_attentions``.

ABC needs, from one layer of the reward model, each head's attention row from the token whose hidden state
the score head reads. ``output_attentions=True`` forces eager attention and keeps every layer's
[B, H, L, L] maps; this capture instead computes only the B * H needed rows, inside the model's own
attention implementation (sdpa, eager or flash attention), from the query and key tensors that the
attention function receives (so after rotary embeddings, with grouped-query heads and the model's mask).
How the model is routed through the capturing attention function is in :mod:`dense_rlhf.capture.interface`,
the row maths in :mod:`dense_rlhf.capture.rows`.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

import torch

from dense_rlhf.capture import interface
from dense_rlhf.capture.model import _configs_of, _is_self_attention, _last_non_pad, _recorded
from dense_rlhf.capture.rows import _reward_rows

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["RewardAttentionCapture", "capture_reward_attention"]


class RewardAttentionCapture:
    """Context manager returned by :func:`capture_reward_attention`; read ``rows`` after the forward."""

    def __init__(self, model: PreTrainedModel, *, layer: int = -1, reward_index: int | torch.Tensor | None = None):
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
            reward_index.dtype.is_floating_point
            or reward_index.dtype.is_complex
            or reward_index.dtype == torch.bool
            or reward_index.dim() > 1
        ):
            raise TypeError(
                f"reward_index tensor must be integer with shape [B], got {reward_index.dtype} "
                f"{tuple(reward_index.shape)}"
            )
        self.model = model
        self._reward_index_arg = reward_index
        text_config = model.config.get_text_config()
        n_layers = getattr(text_config, "num_hidden_layers", None)
        if not isinstance(n_layers, int):
            raise ValueError(f"{type(model).__name__}'s config has no num_hidden_layers; cannot resolve layer={layer}")
        if not -n_layers <= layer < n_layers:
            raise IndexError(
                f"layer={layer} is out of range for a model with {n_layers} layers (use -{n_layers} .. {n_layers - 1})"
            )
        self.layer = layer % n_layers
        self._pad_token_id = getattr(text_config, "pad_token_id", None)
        self._targets = {
            id(m): m for m in model.modules() if getattr(m, "layer_idx", None) == self.layer and _is_self_attention(m)
        }
        if not self._targets:
            raise ValueError(
                f"capture_reward_attention: found no self-attention module with layer_idx={self.layer} "
                f"in {type(model).__name__}"
            )
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
        return _recorded(self._rows, self._error, "capture_reward_attention")

    @property
    def reward_index(self) -> torch.Tensor:
        """long [B]: the query position each row was taken from (last forward)."""
        _ = self.rows  # raises the same errors
        return self._index

    # -- entering and leaving -----------------------------------------------------------------------------

    def __enter__(self) -> RewardAttentionCapture:
        if self._entered:
            raise RuntimeError("a capture_reward_attention object can be entered only once; create a new one")
        model = self.model
        if not type(model)._can_set_attn_implementation():
            raise ValueError(
                f"{type(model).__name__} does not route its attention through transformers' "
                "AttentionInterface, so its attention cannot be captured"
            )
        target_configs = {id(m.config) for m in self._targets.values() if getattr(m, "config", None) is not None}
        configs = []
        for config in _configs_of(model):
            impl = config._attn_implementation
            prefix = interface.PREFIX
            orig = impl[len(prefix) :] if isinstance(impl, str) and impl.startswith(prefix) else impl
            if orig in interface.SUPPORTED:
                configs.append((config, orig))
            elif id(config) in target_configs:
                raise NotImplementedError(
                    f"capture_reward_attention supports attention implementations {interface.SUPPORTED}, "
                    f"but layer {self.layer} uses {impl!r}"
                )
        if not any(id(c) in target_configs for c, _ in configs):
            raise ValueError(
                f"capture_reward_attention: the attention modules of layer {self.layer} have no config "
                "to switch to the capturing implementation"
            )
        for _config, orig in configs:
            if orig == "eager" and any(getattr(m, "reorder_and_upcast_attn", False) for m in model.modules()):
                raise NotImplementedError(
                    "capture_reward_attention: eager attention with reorder_and_upcast_attn=True "
                    "(GPT-2) bypasses AttentionInterface; use sdpa or disable it"
                )
        self._owner = threading.get_ident()
        self._depth = 0
        self._inputs = None
        self._entered = True
        with interface._lock:
            self._configs = interface.switch(configs, self)
            try:
                self._hooks = [
                    model.register_forward_pre_hook(self._pre_hook, with_kwargs=True),
                    model.register_forward_hook(self._post_hook, with_kwargs=True, always_call=True),
                ]
            except BaseException:
                self._release()
                raise
        return self

    def __exit__(self, *exc) -> bool:
        with interface._lock:
            if not self._exited:
                self._exited = True
                for hook in getattr(self, "_hooks", ()):
                    hook.remove()
                self._release()
        return False

    def _release(self) -> None:
        """Undo this capture's config switches (called under the lock); the names stay registered."""
        interface.restore(self._configs, self)
        self._configs = []

    # -- hooks --------------------------------------------------------------------------------------------

    # The hooks take their kwargs as optional: torch adds a hook before marking it with_kwargs, and a forward in
    # another thread may iterate over a snapshot of the hooks while a closing capture removes that mark, so such a
    # forward may call them without kwargs. Those calls are never from the owner's thread; they record nothing.

    def _pre_hook(self, module, args, kwargs=None):
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

    def _post_hook(self, module, args, *kwargs_and_output):
        if threading.get_ident() != self._owner:
            return None
        self._depth -= 1
        if self._depth == 0:
            self._forwards += 1
            self._inputs = None
            if not self._reached and self._error is None:
                if not self._saw_interface:
                    self._error = (
                        f"capture_reward_attention: the forward of {type(self.model).__name__} never called "
                        "an attention function through transformers' AttentionInterface; its attention "
                        "cannot be captured"
                    )
                else:
                    self._error = (
                        f"capture_reward_attention: the forward never reached layer {self.layer}'s "
                        "attention, so there are no rows"
                    )
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
                    "capture_reward_attention: padding-free (cu_seq_lens) batches are not supported"
                )
            from transformers.modeling_flash_attention_utils import _is_packed_sequence

            if _is_packed_sequence(kwargs.get("position_ids"), batch):
                raise NotImplementedError("capture_reward_attention: packed sequences (position_ids) are not supported")

        if attention_mask is None:
            self._check_mask_delivered(length)
        index = self._resolve_index(batch, length, causal, query.device)
        with torch.no_grad():
            rows = _reward_rows(
                query.detach(),
                key.detach(),
                attention_mask,
                index,
                kind=kind,
                scaling=kwargs.get("scaling"),
                causal=causal,
                sliding_window=kwargs.get("sliding_window"),
                softcap=kwargs.get("softcap"),
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
                f"The mask function for '{interface.PREFIX}...' is missing from transformers' AttentionMaskInterface, "
                "so the model would attend to padding; this is a bug in dense_rlhf.capture"
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
            raise ValueError(
                f"capture_reward_attention: input_ids {tuple(input_ids.shape)} do not match the "
                f"attention's batch {batch} and length {length}"
            )
        return _last_non_pad(input_ids.to(device), self._pad_token_id)


def capture_reward_attention(
    model: PreTrainedModel, *, layer: int = -1, reward_index: int | torch.Tensor | None = None
) -> RewardAttentionCapture:
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
