"""The capturing attention functions in transformers' interfaces, and the config switches that route a model to them.

An attention function is registered in transformers' ``AttentionInterface`` under the name
``"dense_rlhf_capture_<original>"`` (and the original's mask function under the same name in the
``AttentionMaskInterface``: without it the model would silently build no padding mask at all). While a capture is
open, the model's configs point at that name; the function calls the original implementation with unchanged
arguments, and for the captured layer, in the thread that opened the capture, first hands the query and key to
the open capture (:class:`dense_rlhf.capture.RewardAttentionCapture`), which computes its rows from them.

The names stay registered once registered, for the life of the process: transformers reads the name from the
config, checks that it is registered, then looks it up, and a forward of the same model in another thread may
have read the name just before a capture closes. Unregistering then would give that forward a ``KeyError``, or
eager attention fed with another implementation's mask. Registered, the function is a pass-through to the
original implementation whenever no capture is open for the calling thread.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import torch

PREFIX = "dense_rlhf_capture_"
SUPPORTED = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flash_attention_4")

_lock = threading.RLock()
_swaps: dict[int, list[Any]] = {}  # id(config) -> [config, original _attn_implementation_internal, refcount]
_by_config: dict[int, list[Any]] = {}  # id(config) -> open captures on that config
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


def switch(configs: list[tuple[Any, str]], capture: Any) -> list[Any]:
    """Point each config at the capturing name of its original implementation (registering the names on first use)
    and record ``capture`` as open on it; returns the configs switched. Call under ``_lock``; on an error the
    switches already made are undone."""
    switched: list[Any] = []
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
            switched.append(config)
            _by_config.setdefault(id(config), []).append(capture)
    except BaseException:
        restore(switched, capture)
        raise
    return switched


def restore(configs: list[Any], capture: Any) -> None:
    """Undo :func:`switch` for ``capture`` (call under ``_lock``): each config gets its original implementation back
    when its last capture closes; the names stay registered (module docstring)."""
    for config in configs:
        captures = _by_config.get(id(config), [])
        if capture in captures:
            captures.remove(capture)
        if not captures:
            _by_config.pop(id(config), None)
        swap = _swaps.get(id(config))
        if swap is None:
            continue
        swap[2] -= 1
        if swap[2] == 0:
            del _swaps[id(config)]
            config._attn_implementation_internal = swap[1]
