"""ABC served by vLLM itself: a vLLM plugin (entry point ``vllm.general_plugins``, installed with dense-rlhf) that
registers reward-model architectures whose ``token_classify`` reply carries, for every token, the score and the
attention weight from the request's last token (the position a decoder reward model pools its score from).

Select one per server with ``--hf-overrides '{"architectures": ["<name>"]}'`` and answer ``token_classify``
(``--pooler-config`` :data:`~dense_rlhf.integrations.vllm.POOLER_CONFIG`); ``layer`` other than the last with the
``hf_overrides`` key :data:`LAYER_KEY`. Each token's reply is
``[score, attention weight, position]``: the score as :func:`dense_rlhf.score_and_densify` reads it (one logit, or
``logit[1] - logit[0]``), the last layer's head-averaged attention from the request's last token (the row sums to
1 over the request), and the token's position ``0..n-1``, by which the client tells this reply from a plain
classifier's and checks that the row is the request's. ``dense_rlhf.integrations.vllm.ServedRewardModel`` reads it.

This module imports nothing of vLLM until vLLM calls :func:`register`, and the model classes
(:mod:`~dense_rlhf.integrations.vllm_plugin.models`) only when a server selects one of them.
"""

from __future__ import annotations

import re
import warnings

__all__ = ["ARCHITECTURES", "CHECKED_VERSIONS", "LAYER_KEY", "register"]

LAYER_KEY = "dense_rlhf_abc_layer"
"""The ``hf_overrides`` key that chooses the attention layer, an index as ``layer`` of
:func:`dense_rlhf.score_and_densify` (default -1, the last); checked when the model loads."""

ARCHITECTURES = {
    "ABCLlamaForSequenceClassification": "LlamaForSequenceClassification",
    "ABCQwen2ForSequenceClassification": "Qwen2ForSequenceClassification",
    "ABCQwen3ForSequenceClassification": "Qwen3ForSequenceClassification",
    "ABCQwen2ForRewardModel": "Qwen2ForRewardModel",
}
"""The registered architectures, each with the checkpoint architecture it serves."""

CHECKED_VERSIONS = ("0.24.0", "0.34.0")
"""The oldest and newest vLLM releases whose source the plugin was checked against (0.32.0 of the CPU build is
tested); outside them it loads with a warning."""


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)(?:\.(\d+))?", version)
    return tuple(int(part or 0) for part in match.groups()) if match else ()


def _check_version(version: str) -> None:
    low, high = (_release(v) for v in CHECKED_VERSIONS)
    release = _release(version)
    if not release or not low <= release <= high[:2] + (10**6,):
        warnings.warn(
            f"dense-rlhf's ABC plugin was checked against vLLM {CHECKED_VERSIONS[0]} to "
            f"{'.'.join(map(str, high[:2]))}.x; this is vLLM {version}. It refuses to load where a hook it uses is "
            "missing, but compare its rows with dense_rlhf.score_and_densify(method='abc') once on this version",
            stacklevel=2,
        )


def register() -> None:
    """The entry point vLLM calls in every process it starts: registers :data:`ARCHITECTURES` lazily (the model
    module is imported only by a server that selects one)."""
    import vllm
    from vllm import ModelRegistry

    _check_version(vllm.__version__)
    known = ModelRegistry.get_supported_archs()
    for name in ARCHITECTURES:
        if name not in known:
            ModelRegistry.register_model(name, f"{__name__}.models:{name}")
