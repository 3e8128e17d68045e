"""Loads the compiled extension, which registers ``torch.ops.dense_rlhf.dense_rewards``, and its fake kernel."""

from __future__ import annotations

import torch

try:
    from dense_rlhf import _C  # noqa: F401  (importing registers the op and its CPU/CUDA kernels)

    IMPORT_ERROR: Exception | None = None
except ImportError as error:  # not built: the reference backend still works
    IMPORT_ERROR = error

_OP_NAME = "dense_rlhf::dense_rewards"


def is_built() -> bool:
    """True when the compiled extension imported and registered the op."""
    return IMPORT_ERROR is None


def _registered(dispatch_key: str) -> bool:
    return is_built() and torch._C._dispatch_has_kernel_for_dispatch_key(_OP_NAME, dispatch_key)


# Read once at import: a plain dict lookup is all that torch.compile has to trace on each call.
KERNELS = {"cpu": _registered("CPU"), "cuda": _registered("CUDA")}


def has_kernel(device_type: str) -> bool:
    """True when the native op has a kernel for this device type ("cpu", "cuda")."""
    return KERNELS.get(device_type, False)


def build_hint(device_type: str) -> str:
    if not is_built():
        return f"Build it with `pip install --no-build-isolation .` (import failed: {IMPORT_ERROR})."
    return (
        f"The extension was built without {device_type} support; rebuild on a machine with nvcc and a CUDA "
        "torch (DENSE_RLHF_CUDA=1 forces it)."
    )


if is_built():

    @torch.library.register_fake(_OP_NAME)
    def _dense_rewards_fake(attn, score, mask, beta, reward_index):
        batch, length = mask.shape
        out = attn.new_empty((batch, length), dtype=torch.float32)
        status = attn.new_empty((batch,), dtype=torch.int32)
        return out, status
