"""ABC and prefix-difference rewards from a reward model served by vLLM, through its pooling API.

Prefix-difference rewards need only the score head's output at every position, and vLLM serves exactly that; ABC
also needs the attention row, which the ABC architectures of dense-rlhf's vLLM plugin
(:mod:`dense_rlhf.integrations.vllm_plugin`) add to the same reply. Started with
``--pooler-config '{"task":"token_classify","use_activation":false}'``, a vLLM server answers
``POST /pooling`` with ``"task": "token_classify"`` by applying a sequence classifier's head to every token: for
a decoder reward model (``*ForSequenceClassification``), the score of every prefix, the input of
:func:`dense_rlhf.prefix_rewards`, at serving speed and with no copy of the weights in the caller.

:class:`ServedRewardModel` is an HTTP client for that endpoint (aiohttp, which verl and vLLM both bring; nothing
here imports vLLM). It sends token ids, not text, so that the positions it gets back are the positions it
aligned; it retries connection errors, timeouts and server errors with exponential backoff, and says what to
change when the server cannot answer (no ``token_classify`` pooler, an unknown model name, a reply that does not
match the request). Every call has an ``a...`` twin for an asyncio event loop:

- :meth:`ServedRewardModel.score_and_densify_text`: :func:`dense_rlhf.score_and_densify_text` with the forward on
  the server (the same rendering, tokenising and mapping onto the policy's tokens);
- :meth:`ServedRewardModel.score_and_densify`: :func:`dense_rlhf.score_and_densify` on the reward model's ids;
- :meth:`ServedRewardModel.prefix_scores`, :meth:`ServedRewardModel.attention_rows`: the values themselves.

``dense_rlhf.integrations.verl.ServedPrefixRewardManager`` uses it inside verl's reward loop.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import torch

from dense_rlhf.align.render import Prompts
from dense_rlhf.align.scoring import _finish_text, _prepare_text
from dense_rlhf.integrations.vllm_abc import VERL_HF_OVERRIDES_KEY, _abc_rows, _ABCClient, abc_hf_overrides
from dense_rlhf.integrations.vllm_messages import (
    _MAX_BACKOFF_S,
    _RETRIED_STATUS,
    POOLER_CONFIG,
    VERL_POOLER_CONFIG_KEY,
    ServedRewardModelError,
    TokenRows,
    _check_batch,
    _check_method,
    _check_number,
    _Permanent,
    _pooled_positions,
    _run,
    _token_rows,
    check_pad_token_id,
    pooled_index,
)
from dense_rlhf.integrations.vllm_replies import (
    error_text,
    json_reply,
    model_listing,
    prefix_rows,
    read_body,
    refusal,
    reply_limit,
)
from dense_rlhf.ops import check_beta, dense_rewards, prefix_rewards, sparse_rewards, uniform_rewards

try:
    import aiohttp
except ImportError as error:  # pragma: no cover - exercised only where aiohttp is missing
    raise ImportError("dense_rlhf.integrations.vllm needs aiohttp: pip install 'dense-rlhf[served]'") from error

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ServedRewardModel",
    "ServedRewardModelError",
    "POOLER_CONFIG",
    "VERL_POOLER_CONFIG_KEY",
    "VERL_HF_OVERRIDES_KEY",
    "abc_hf_overrides",
]


class ServedRewardModel(_ABCClient):
    """A reward model behind a vLLM server started with ``--pooler-config '{"task":"token_classify",
    "use_activation":false}'`` (:data:`POOLER_CONFIG`; in verl 0.9.x the key :data:`VERL_POOLER_CONFIG_KEY`).

    Args:
        base_url: the server, ``http://host:port`` (``host:port``, as verl hands over its reward router's
            address, means ``http://host:port``). A router that forwards ``/pooling`` to the servers (verl's does)
            works the same.
        model: the served model's name (vLLM's ``--served-model-name``, by default the path it was started
            with); None asks the server (``GET /v1/models``) on first use and takes the one model it serves.
        timeout: seconds for one HTTP request, connection included.
        max_retries: further attempts after a connection error, a timeout or a server error (HTTP 408, 429, 500,
            502, 503, 504), waiting ``backoff * 2**k`` seconds (at most 30) before retry k + 1. Other replies
            are not retried.
        backoff: the first wait, in seconds.

    Every request sends token ids (``"input": [[id, ...], ...]``, one row per sequence) with
    ``"use_activation": false``, so the values are the head's raw logits whatever the server's default.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        *,
        timeout: float = 60.0,
        max_retries: int = 3,
        backoff: float = 0.5,
    ):
        if not isinstance(base_url, str) or not base_url.strip():
            raise TypeError(f"base_url must be a non-empty string such as 'http://127.0.0.1:8000', got {base_url!r}")
        base_url = base_url.strip().rstrip("/")
        if "://" not in base_url:
            base_url = "http://" + base_url
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http:// or https:// address, got {base_url!r}")
        if model is not None and (not isinstance(model, str) or not model):
            raise TypeError(f"model must be the served model's name (a non-empty string) or None, got {model!r}")
        self.base_url = base_url
        self.model = model
        self._listing: dict | None = None  # served model name -> its max_model_len, from GET /v1/models
        self.timeout = _check_number(timeout, "timeout", strict=True)
        self.max_retries = _check_number(max_retries, "max_retries", integer=True)
        self.backoff = _check_number(backoff, "backoff")

    def __repr__(self) -> str:
        return f"ServedRewardModel({self.base_url!r}, model={self.model!r})"

    # ------------------------------------------------------------------------------------------------ HTTP

    def _session(self) -> aiohttp.ClientSession:
        return aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))

    async def _request(self, session: aiohttp.ClientSession, method: str, path: str, payload=None, limit=None):
        """The JSON reply of one request, retried as the class says; ServedRewardModelError after the last try, or
        at once for a reply that retrying cannot change (``_Permanent`` is raised for the caller to explain). At most
        ``limit`` bytes of the reply are read (:func:`~dense_rlhf.integrations.vllm_replies.reply_limit`)."""
        url = self.base_url + path
        what = f"{method} {url}"
        limit = reply_limit() if limit is None else limit
        attempts = self.max_retries + 1
        last, status = None, None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(min(self.backoff * 2 ** (attempt - 1), _MAX_BACKOFF_S))
            try:
                async with session.request(method, url, json=payload) as reply:
                    body = await read_body(reply, limit, what, url)
                    if reply.status == 200:
                        return json_reply(body, what, url)
                    message, param = error_text(body)
                    if reply.status not in _RETRIED_STATUS:
                        raise _Permanent(reply.status, message, param)
                    last, status = f"HTTP {reply.status}: {message}", reply.status
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
                last, status = f"{type(error).__name__}: {error}", None
            except asyncio.TimeoutError:
                last, status = f"no reply within timeout={self.timeout} s", None
        raise ServedRewardModelError(
            f"{what} failed after {attempts} attempt{'s' if attempts > 1 else ''} (max_retries="
            f"{self.max_retries}); last: {last}. Is the reward-model server running at {self.base_url}?",
            url=url,
            status=status,
        )

    async def _served_models(self, session) -> dict:
        """``{name: max_model_len or None}`` of the models ``GET /v1/models`` lists (asked once)."""
        if self._listing is None:
            reply = await self._request(session, "GET", "/v1/models")
            self._listing = model_listing(reply, self.base_url + "/v1/models")
        return self._listing

    async def _model_name(self, session) -> str:
        if self.model is not None:
            return self.model
        url = self.base_url + "/v1/models"
        try:
            served = list(await self._served_models(session))
        except _Permanent as error:
            raise ServedRewardModelError(
                f"GET {url} answered HTTP {error.status}: {error.message}; pass model= (the served model's name)",
                url=url,
                status=error.status,
            ) from None
        if not served:
            raise ServedRewardModelError(f"GET {url} listed no model; pass model= (the served model's name)", url=url)
        if len(served) != 1:
            raise ServedRewardModelError(
                f"the server at {self.base_url} serves {len(served)} models ({served}); pass model= to choose one",
                url=url,
            )
        self.model = served[0]
        return self.model

    async def _max_model_len(self, session) -> int | None:
        """The most tokens the served model takes (its ``max_model_len`` in ``GET /v1/models``), None if not said."""
        model = await self._model_name(session)
        try:
            limit = (await self._served_models(session)).get(model)
        except _Permanent:
            return None
        return limit if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0 else None

    async def _pool(self, session, rows: list[list[int]], labels: list[str] | None = None, abc: bool = False) -> list:
        """Per row, its score at every position; with ``abc``, ``(scores, attention weights)`` of an ABC reply."""
        model = await self._model_name(session)
        url = self.base_url + "/pooling"
        payload = {"model": model, "input": rows, "task": "token_classify", "use_activation": False}
        try:
            reply = await self._request(session, "POST", "/pooling", payload, limit=reply_limit(rows))
        except _Permanent as error:
            raise await self._explain(session, error, url) from None
        if abc:
            return _abc_rows(reply, rows, url, self.base_url, labels)
        return prefix_rows(reply, rows, url, labels)

    async def _explain(self, session, error: _Permanent, url: str) -> ServedRewardModelError:
        """A refused /pooling request, said in terms of what to change."""
        served = None
        if error.status == 404 and "does not exist" in error.message:
            self._listing = None  # the server may have been restarted with another model
            try:
                served = list(await self._served_models(session))
            except (_Permanent, ServedRewardModelError):
                pass
        return refusal(error, url, self.base_url, self.model, served)

    # ------------------------------------------------------------------------------------------ public API

    async def aprefix_scores(self, token_ids: TokenRows) -> list[torch.Tensor]:
        """Async :meth:`prefix_scores`."""
        rows = _token_rows(token_ids)
        async with self._session() as session:
            return await self._pool(session, rows)

    def prefix_scores(self, token_ids: TokenRows) -> list[torch.Tensor]:
        """The reward model's score at every position of each sequence, in one request.

        Args:
            token_ids: B sequences of the reward model's token ids, unpadded (lists of ints or 1-D integer tensors,
                or a [B, L] tensor whose rows are all real tokens); each is scored as it is, with no special
                tokens added.

        Returns:
            B float32 CPU tensors, row b of length ``len(token_ids[b])``: the score of the prefix ending at each
            position (a one-logit head's logit, or ``logit[1] - logit[0]``), as
            :func:`dense_rlhf.capture_prefix_scores` reads it in-process; the sequence's score is the one at
            ``pooled_index(token_ids[b], pad_token_id)`` (:mod:`~dense_rlhf.integrations.vllm_messages`).

        Raises:
            TypeError, ValueError: bad ``token_ids``, before any request.
            ServedRewardModelError: the server is unreachable or keeps failing (after ``max_retries``), does not
                answer ``token_classify`` (the message names ``--pooler-config`` and verl's key), has no such
                model, or gives a reply that is not one to this request (checked as
                :mod:`~dense_rlhf.integrations.vllm_replies` says: size, encoding, shape, finite float32 numbers);
                always with the URL, the server's message and the row at fault.
        """
        return _run(self.aprefix_scores(token_ids))

    async def ascore_and_densify(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        method: str = "prefix",
        beta: float = 0.8,
        pad_token_id: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Async :meth:`score_and_densify`."""
        _check_method(method)
        beta = check_beta(beta)
        pad_token_id = check_pad_token_id(pad_token_id)
        attention, completion = _check_batch(input_ids, attention_mask, completion_mask)
        ids_cpu = input_ids.cpu()
        rows = [ids_cpu[b][attention[b]].tolist() for b in range(ids_cpu.shape[0])]
        empty = [b for b, row in enumerate(rows) if not row]
        if empty:
            raise ValueError(f"attention_mask has no token in rows {empty[:10]}")
        real, pooled, reward_index = _pooled_positions(rows, attention, completion, pad_token_id)
        labels = [f"row {b}" for b in range(len(rows))]
        async with self._session() as session:
            if method == "abc":  # each row up to where the model pools: the plugin reads the request's last token
                values = await self._pool_abc(session, [row[: k + 1] for row, k in zip(rows, pooled)], labels)
            else:
                values = await self._pool(session, rows, labels)
        prefix, weights = torch.zeros(attention.shape), torch.zeros(attention.shape)
        for b, row in enumerate(values):
            if method == "abc":
                prefix[b, real[b][: len(row[0])]], weights[b, real[b][: len(row[0])]] = row
            else:
                prefix[b, attention[b]] = row
        scores = prefix[torch.arange(len(rows)), reward_index]
        device = input_ids.device
        completion = completion.to(device)
        if method == "abc":
            rewards = dense_rewards(weights.to(device), scores.to(device), completion, beta=beta, layout="row")
        elif method == "prefix":
            rewards = prefix_rewards(prefix.to(device), completion, beta=beta, reward_index=reward_index.to(device))
        elif method == "sparse":
            rewards = sparse_rewards(scores.to(device), completion)
        else:
            rewards = uniform_rewards(scores.to(device), completion)
        return scores.to(device), rewards

    def score_and_densify(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        completion_mask: torch.Tensor,
        *,
        method: str = "prefix",
        beta: float = 0.8,
        pad_token_id: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`dense_rlhf.score_and_densify` with the forward on the server: ``(scores [B], rewards [B, L])``.

        Args:
            input_ids: [B, L] the reward model's token ids (prompt + completion, padded on either side).
            attention_mask: [B, L] bool or 0/1, True on real tokens; each row's real tokens are sent, unpadded,
                so positions count from its first real token (with right padding, exactly the local forward's
                positions; with left padding, equal for position-relative models such as rotary ones).
            completion_mask: [B, L] bool or 0/1, True on completion tokens (inside the attention mask).
            method: "prefix" (default: :func:`dense_rlhf.prefix_rewards` of the served prefix scores), "sparse",
                "uniform", or "abc" (:func:`dense_rlhf.dense_rewards` of the served attention rows; the server
                must run an ABC architecture, checked by one probe request per client before any scoring).
            beta: in [0, 1], as in :func:`dense_rlhf.prefix_rewards`.
            pad_token_id: the served reward model's ``config.pad_token_id``, which the client cannot see: the
                score is read where the model pools it, at each row's last real token whose id is not this one
                (:func:`~dense_rlhf.integrations.vllm_messages.pooled_index`), as the local call does. Pass it
                whenever the model has one: where the pad id is also the EOS id that ends a completion, the last
                token is not the pooled one. None: the last real token.

        Returns:
            float32 ``scores`` [B] (the score at the pooled position) and ``rewards`` [B, L], each row summing to
            its score, zero off ``completion_mask``; on ``input_ids``' device. Completion tokens after the pooled
            position get what the local call gives them (the whole row is sent, so their prefix scores are the
            model's own).

        Raises:
            TypeError, ValueError: bad arguments, and a row whose completion tokens all come after the pooled
                position, before any request; ServedRewardModelError as :meth:`prefix_scores` does.
        """
        return _run(
            self.ascore_and_densify(
                input_ids, attention_mask, completion_mask, method=method, beta=beta, pad_token_id=pad_token_id
            )
        )

    async def _ascore_text(
        self,
        rm_tokenizer,
        prompts,
        response_ids,
        *,
        policy_tokenizer,
        response_mask,
        beta,
        method,
        max_length,
        strict: bool,
    ):
        """The served twin of ``dense_rlhf.align.scoring._score_text``: the same preparation (decode, render,
        tokenise) and the same finish (projection, rewards), with the per-token scores from the server.
        ``strict=False``: rows that cannot be scored or mapped are reported (``failed``, ``unmapped``) instead of
        raising."""
        _check_method(method)
        batch = _prepare_text(
            rm_tokenizer,
            prompts,
            response_ids,
            policy_tokenizer=policy_tokenizer,
            response_mask=response_mask,
            beta=beta,
            max_length=max_length,
            strict=strict,
            method=method,
        )
        inputs = batch.inputs
        async with self._session() as session:
            limit = await self._max_model_len(session)
            for b, row in enumerate(inputs.rows):
                if row is not None and limit is not None and len(row["input_ids"]) > limit:
                    inputs.fail(
                        b,
                        f"the reward model's input has {len(row['input_ids'])} tokens but the server at "
                        f"{self.base_url} takes at most {limit} (its max_model_len); pass "
                        f"max_length={limit} (with rm_tokenizer.truncation_side = 'left' to cut the prompt) "
                        "or shorten the prompts",
                    )
            todo = [b for b, row in enumerate(inputs.rows) if row is not None]
            rows = [inputs.rows[b]["input_ids"] for b in todo]
            labels = [f"row {b}" for b in todo]
            ends = [pooled_index(ids, getattr(rm_tokenizer, "pad_token_id", None)) for ids in rows]
            if not todo:
                values = []
            elif method == "abc":  # each row up to where the model pools; the tokens after it get no attention
                served = await self._pool_abc(session, [ids[: k + 1] for ids, k in zip(rows, ends)], labels)
                values = [(s[-1], torch.cat([w, w.new_zeros(len(ids) - len(w))])) for ids, (s, w) in zip(rows, served)]
            else:
                served = await self._pool(session, rows, labels)
                values = [(row[k], row) for k, row in zip(ends, served)]
        results = {b: (float(score), row) for b, (score, row) in zip(todo, values)}
        return _finish_text(batch, results, method)

    async def ascore_and_densify_text(
        self,
        rm_tokenizer: PreTrainedTokenizerBase,
        prompts: Prompts,
        response_ids: torch.Tensor,
        *,
        policy_tokenizer: PreTrainedTokenizerBase,
        response_mask: torch.Tensor | None = None,
        beta: float = 0.8,
        method: str = "prefix",
        max_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Async :meth:`score_and_densify_text`."""
        result = await self._ascore_text(
            rm_tokenizer,
            prompts,
            response_ids,
            policy_tokenizer=policy_tokenizer,
            response_mask=response_mask,
            beta=beta,
            method=method,
            max_length=max_length,
            strict=True,
        )
        return result.scores, result.rewards

    def score_and_densify_text(
        self,
        rm_tokenizer: PreTrainedTokenizerBase,
        prompts: Prompts,
        response_ids: torch.Tensor,
        *,
        policy_tokenizer: PreTrainedTokenizerBase,
        response_mask: torch.Tensor | None = None,
        beta: float = 0.8,
        method: str = "prefix",
        max_length: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """:func:`dense_rlhf.score_and_densify_text` with the reward model on the server: ``(scores [B],
        rewards [B, R])`` on the policy's response tokens, equal to the local call on the same weights for
        ``method="prefix"`` (default), ``"sparse"`` and ``"uniform"``.

        The responses are decoded, rendered with ``rm_tokenizer``'s chat template (or appended to plain-text
        prompts) and tokenised by the same code as the local call (``dense_rlhf.align.render_and_tokenize``:
        control tokens spelled by a response stay text); the reward model's token ids go to the server, one request
        for the batch, unpadded; its score at every position comes back, and the changes of the score over the
        response's tokens are mapped onto the policy's tokens as the local call maps them. ``method="abc"`` maps the
        served attention row instead (the server must run an ABC architecture, as :meth:`score_and_densify` says).

        Args:
            rm_tokenizer: the served reward model's fast tokenizer (the one the server was started with); each
                row's score is read at its last token that is not ``rm_tokenizer.pad_token_id`` (assumed to be the
                served model's ``config.pad_token_id``), as the model pools it.
            prompts, response_ids, policy_tokenizer, response_mask, beta, max_length: as in
                :func:`dense_rlhf.score_and_densify_text`. An input longer than the server's ``max_model_len``
                (from ``GET /v1/models``) is refused before the request, like one longer than a local model's
                positions.

        Raises:
            what :func:`dense_rlhf.score_and_densify_text` raises for its arguments and rows (before any request),
            and ServedRewardModelError as :meth:`prefix_scores` does.
        """
        return _run(
            self.ascore_and_densify_text(
                rm_tokenizer,
                prompts,
                response_ids,
                policy_tokenizer=policy_tokenizer,
                response_mask=response_mask,
                beta=beta,
                method=method,
                max_length=max_length,
            )
        )
