"""What :class:`dense_rlhf.integrations.vllm.ServedRewardModel` reads from a server that runs dense-rlhf's ABC
architecture (:mod:`dense_rlhf.integrations.vllm_plugin`): each token's ``[score, attention weight, position]``,
checked before it is used, the message that says how to start such a server, and the client's calls for it (a mixin
whose requests go through the client's own session and checks)."""

from __future__ import annotations

import json

import torch

from dense_rlhf.integrations.vllm_messages import POOLER_CONFIG, ServedRewardModelError, TokenRows, _run, _token_rows
from dense_rlhf.integrations.vllm_plugin import ARCHITECTURES
from dense_rlhf.integrations.vllm_replies import is_abc_reply, reply_rows

__all__ = ["VERL_HF_OVERRIDES_KEY", "abc_hf_overrides"]

VERL_HF_OVERRIDES_KEY = "reward.reward_model.rollout.engine_kwargs.vllm.hf_overrides"
"""Where verl 0.9.x takes the reward-model server's ``--hf-overrides`` from."""
WEIGHT_SUM_TOLERANCE = 1e-3
"""How far from 1 a request's attention weights may sum (float32 rounding over thousands of tokens is ~1e-5)."""


def abc_hf_overrides(architecture: str = "ABCLlamaForSequenceClassification") -> str:
    """The ``--hf-overrides`` value that selects an ABC architecture (one of
    :data:`dense_rlhf.integrations.vllm_plugin.ARCHITECTURES`), as JSON."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {sorted(ARCHITECTURES)}, got {architecture!r}")
    return json.dumps({"architectures": [architecture]})


def not_abc_message(base_url: str, reason: str) -> str:
    twins = ", ".join(f"{checkpoint} -> {abc}" for abc, checkpoint in ARCHITECTURES.items())
    return (
        f"the server at {base_url} does not run dense-rlhf's ABC architecture ({reason}), so method='abc' has no "
        f"attention row to read. Install dense-rlhf beside vLLM and start the server with --hf-overrides "
        f"'{abc_hf_overrides()}' (the ABC twin of the checkpoint's architecture: {twins}) and --pooler-config "
        f"'{POOLER_CONFIG}'; in verl 0.9.x: +{VERL_HF_OVERRIDES_KEY}='{abc_hf_overrides()}'. Its replies still "
        "serve method='prefix', 'sparse' and 'uniform'"
    )


def _abc_rows(
    reply, rows: list[list[int]], url: str, base_url: str, labels: list | None = None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(scores [n_b], weights [n_b])`` float32 per row of an ABC reply, checked as every reply is
    (:func:`~dense_rlhf.integrations.vllm_replies.reply_rows`: shape, finite float32 numbers) and then as ABC's: three
    channels whose third is each token's position (the reply is this request's row, not a classifier's logits), and
    weights not negative, summing to about 1 over the request."""
    out = []
    for index, values in enumerate(reply_rows(reply, rows, url, labels)):
        label = labels[index] if labels is not None else f"sequence {index}"
        if not is_abc_reply(values):
            reason = (
                f"it returned {values.shape[1]} value{'s' if values.shape[1] > 1 else ''} per token, a classifier's "
                "logits"
                if values.shape[1] < 3
                else f"its three values per token for {label} are not [score, weight, position 0..n-1]"
            )
            raise ServedRewardModelError(not_abc_message(base_url, reason), url=url, status=200)
        weights = values[:, 1]
        total = float(weights.sum())
        if not bool((weights >= 0).all()) or not abs(total - 1.0) <= WEIGHT_SUM_TOLERANCE:
            raise ServedRewardModelError(
                f"POST {url} returned attention weights for {label} that are not a distribution over its "
                f"{len(weights)} tokens (sum {total}, min {float(weights.min())}): the server at {base_url} is not "
                "computing ABC's row correctly",
                url=url,
                status=200,
            )
        out.append((values[:, 0].contiguous(), weights.contiguous()))
    return out


class _ABCClient:
    """:class:`~dense_rlhf.integrations.vllm.ServedRewardModel`'s calls for an ABC server (mixed into it; they use its
    ``_session`` and ``_pool``)."""

    _abc_server: bool = False  # set once a probe request found an ABC reply at this server

    async def _check_abc(self, session, probe: list[int]) -> None:
        """Before the first ABC request: one request of one token, whose reply must be ABC's (else the message says
        how to start the server); asked once per client."""
        if not self._abc_server:
            await self._pool(session, [probe[:1]], ["the probe"], abc=True)
            self._abc_server = True

    async def _pool_abc(self, session, rows: list[list[int]], labels=None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        await self._check_abc(session, rows[0])
        return await self._pool(session, rows, labels, abc=True)

    async def aattention_rows(self, token_ids: TokenRows) -> list[torch.Tensor]:
        """Async :meth:`attention_rows`."""
        rows = _token_rows(token_ids)
        async with self._session() as session:
            return [weights for _, weights in await self._pool_abc(session, rows)]

    def attention_rows(self, token_ids: TokenRows) -> list[torch.Tensor]:
        """ABC's attention row of each sequence from a server running dense-rlhf's ABC architecture: the layer's
        attention from the sequence's last token to each of its tokens, averaged over heads (float32 [n_b], summing
        to 1), as :func:`dense_rlhf.capture_reward_attention` captures it in-process. ``token_ids`` as in
        :meth:`prefix_scores`, whose scores the same server gives.

        Raises:
            ServedRewardModelError: as :meth:`prefix_scores`, and where the server does not run an ABC architecture
                (the message names the ``--hf-overrides`` to serve and verl's key for it) or its weights are not a
                distribution over the request's tokens.
        """
        return _run(self.aattention_rows(token_ids))
