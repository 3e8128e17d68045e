"""dense-rlhf: dense per-token RLHF rewards for free, from the reward model's own forward: Attention-Based Credit
(its attention) and prefix-difference rewards (its score at every position).

The library is what this module exports. ``dense_rlhf.rl`` holds the small trainers, ``dense_rlhf.study`` the
synthetic task and study behind ``dense-rlhf demo`` / ``experiment``, ``dense_rlhf.bench`` the microbenchmarks;
none of them is imported here, and neither is transformers (``capture`` and ``align`` import it when first
used). The exports themselves load on first use, so that importing a subpackage (vLLM loads
``dense_rlhf.integrations.vllm_plugin`` in every process it starts) loads neither torch's extension nor the rest.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from dense_rlhf._version import __version__

if TYPE_CHECKING:
    from dense_rlhf.align import score_and_densify_text
    from dense_rlhf.capture import (
        capture_prefix_scores,
        capture_reward_attention,
        score_and_densify,
        score_with_credit,
    )
    from dense_rlhf.ops import dense_rewards, prefix_rewards, sparse_rewards, uniform_rewards

_EXPORTS = {
    "dense_rewards": "dense_rlhf.ops",
    "prefix_rewards": "dense_rlhf.ops",
    "sparse_rewards": "dense_rlhf.ops",
    "uniform_rewards": "dense_rlhf.ops",
    "capture_reward_attention": "dense_rlhf.capture",
    "capture_prefix_scores": "dense_rlhf.capture",
    "score_and_densify": "dense_rlhf.capture",
    "score_with_credit": "dense_rlhf.capture",
    "score_and_densify_text": "dense_rlhf.align",
}

__all__ = [
    "dense_rewards",
    "prefix_rewards",
    "sparse_rewards",
    "uniform_rewards",
    "capture_reward_attention",
    "capture_prefix_scores",
    "score_and_densify",
    "score_with_credit",
    "score_and_densify_text",
    "__version__",
]


# The submodules that importing the package loaded when its exports were not lazy: still reachable as attributes.
_SUBMODULES = ("ops", "reference", "capture", "align", "_native", "_padding")


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        if name in _SUBMODULES:
            return importlib.import_module(f"{__name__}.{name}")
        raise AttributeError(f"module 'dense_rlhf' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
