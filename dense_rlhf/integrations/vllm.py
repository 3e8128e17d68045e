"""Prefix-difference rewards from a reward model served by vLLM, through its pooling API.

ABC needs the reward model's attention, which no inference server exposes; prefix-difference rewards need only
the score head's output at every position, and vLLM serves exactly that. Started with
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
- :meth:`ServedRewardModel.prefix_scores`: the per-position scores themselves.

``dense_rlhf.integrations.verl.ServedPrefixRewardManager`` uses it inside verl's reward loop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import math
import numbers
from collections.abc import Sequence

import torch

try:
    import aiohttp
except ImportError as error:  # pragma: no cover - exercised only where aiohttp is missing
    raise ImportError("dense_rlhf.integrations.vllm needs aiohttp: pip install 'dense-rlhf[served]'") from error

__all__ = ["ServedRewardModel", "ServedRewardModelError", "POOLER_CONFIG", "VERL_POOLER_CONFIG_KEY"]

POOLER_CONFIG = '{"task":"token_classify","use_activation":false}'
"""The value of vLLM's ``--pooler-config`` that makes a reward-model server answer ``token_classify``."""
VERL_POOLER_CONFIG_KEY = "reward.reward_model.rollout.engine_kwargs.vllm.pooler_config"
"""Where verl 0.9.x takes that value from for the reward-model server it starts."""
METHODS = ("prefix", "sparse", "uniform")
_RETRIED_STATUS = {408, 429, 500, 502, 503, 504}  # 501 (Not Implemented) is permanent
_MAX_BACKOFF_S = 30.0


class ServedRewardModelError(RuntimeError):
    """The served reward model could not give the prefix scores: ``url`` is the request's address, ``status`` the
    last HTTP status (None when no reply came)."""

    def __init__(self, message: str, *, url: str, status: int | None = None):
        super().__init__(message)
        self.url, self.status = url, status


class _Permanent(Exception):
    """An HTTP reply that retrying cannot change (raised inside a try, turned into ServedRewardModelError)."""

    def __init__(self, status: int, message: str, param):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _run(coroutine):
    """Run a coroutine to completion from synchronous code, also when this thread already runs an event loop (a
    notebook, an async framework): then in a helper thread with its own loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coroutine).result()


def _error_text(body: str) -> tuple[str, object]:
    """(message, param) of an error reply: vLLM's ``{"error": {"message", "param"}}``, FastAPI's ``{"detail"}``,
    or the text itself."""
    try:
        reply = json.loads(body)
    except ValueError:
        return body.strip()[:500], None
    if isinstance(reply, dict):
        error = reply.get("error")
        if isinstance(error, dict):
            return str(error.get("message", error))[:500], error.get("param")
        if "detail" in reply:
            return str(reply["detail"])[:500], None
        if "message" in reply:
            return str(reply["message"])[:500], None
    return body.strip()[:500], None


def _check_number(value, name: str, *, integer: bool = False, minimum: float = 0.0, strict: bool = False):
    kind = numbers.Integral if integer else numbers.Real
    if isinstance(value, bool) or not isinstance(value, kind):
        raise TypeError(f"{name} must be {'an integer' if integer else 'a number'}, got {type(value).__name__}")
    if not math.isfinite(float(value)) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{name} must be {'above' if strict else 'at least'} {minimum}, got {value!r}")
    return int(value) if integer else float(value)


def _token_rows(token_ids, argument: str = "token_ids") -> list[list[int]]:
    """A batch of token-id rows as lists of Python ints: a sequence of sequences or 1-D integer tensors, or a 2-D
    integer tensor (every row then has the same length)."""
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 2:
            raise ValueError(f"{argument} as a tensor must be 2-D [B, L], got shape {tuple(token_ids.shape)}")
        token_ids = list(token_ids)
    if isinstance(token_ids, (str, bytes)) or not isinstance(token_ids, Sequence):
        raise TypeError(f"{argument} must be a list of token-id lists, got {type(token_ids).__name__}")
    rows = []
    for b, row in enumerate(token_ids):
        if isinstance(row, torch.Tensor):
            if row.dim() != 1 or row.dtype.is_floating_point or row.dtype.is_complex or row.dtype == torch.bool:
                raise TypeError(f"{argument}[{b}] must be a 1-D integer tensor, got {row.dtype} of shape "
                                f"{tuple(row.shape)}")
            row = row.tolist()
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence):
            raise TypeError(f"{argument}[{b}] must be a list of token ids, got {type(row).__name__}")
        if not row:
            raise ValueError(f"{argument}[{b}] is empty: a reward model scores at least one token")
        if not all(isinstance(t, numbers.Integral) and not isinstance(t, bool) and t >= 0 for t in row):
            raise TypeError(f"{argument}[{b}] must hold non-negative integer token ids")
        rows.append([int(t) for t in row])
    if not rows:
        raise ValueError(f"{argument} is empty")
    return rows


class ServedRewardModel:
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

    def __init__(self, base_url: str, model: str | None = None, *, timeout: float = 60.0, max_retries: int = 3,
                 backoff: float = 0.5):
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

    async def _request(self, session: aiohttp.ClientSession, method: str, path: str, payload=None):
        """The JSON reply of one request, retried as the class says; ServedRewardModelError after the last try, or
        at once for a reply that retrying cannot change (``_Permanent`` is raised for the caller to explain)."""
        url = self.base_url + path
        attempts = self.max_retries + 1
        last, status = None, None
        for attempt in range(attempts):
            if attempt:
                await asyncio.sleep(min(self.backoff * 2 ** (attempt - 1), _MAX_BACKOFF_S))
            try:
                async with session.request(method, url, json=payload) as reply:
                    body = await reply.text()
                    if reply.status == 200:
                        try:
                            return json.loads(body)
                        except ValueError:
                            raise ServedRewardModelError(f"{method} {url} answered 200 with a body that is not "
                                                         f"JSON: {body[:200]!r}", url=url, status=200) from None
                    message, param = _error_text(body)
                    if reply.status not in _RETRIED_STATUS:
                        raise _Permanent(reply.status, message, param)
                    last, status = f"HTTP {reply.status}: {message}", reply.status
            except (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError) as error:
                last, status = f"{type(error).__name__}: {error}", None
            except asyncio.TimeoutError:
                last, status = f"no reply within timeout={self.timeout} s", None
        raise ServedRewardModelError(
            f"{method} {url} failed after {attempts} attempt{'s' if attempts > 1 else ''} (max_retries="
            f"{self.max_retries}); last: {last}. Is the reward-model server running at {self.base_url}?",
            url=url, status=status)

    async def _served_models(self, session) -> dict:
        """``{name: max_model_len or None}`` of the models ``GET /v1/models`` lists (asked once)."""
        if self._listing is None:
            reply = await self._request(session, "GET", "/v1/models")
            data = reply.get("data") if isinstance(reply, dict) else None
            entries = [entry for entry in data if isinstance(entry, dict)] if isinstance(data, list) else []
            self._listing = {str(entry.get("id")): entry.get("max_model_len") for entry in entries}
        return self._listing

    async def _model_name(self, session) -> str:
        if self.model is not None:
            return self.model
        url = self.base_url + "/v1/models"
        try:
            served = list(await self._served_models(session))
        except _Permanent as error:
            raise ServedRewardModelError(f"GET {url} answered HTTP {error.status}: {error.message}; pass model= (the "
                                         "served model's name)", url=url, status=error.status) from None
        if not served:
            raise ServedRewardModelError(f"GET {url} listed no model; pass model= (the served model's name)", url=url)
        if len(served) != 1:
            raise ServedRewardModelError(f"the server at {self.base_url} serves {len(served)} models ({served}); pass "
                                         "model= to choose one", url=url)
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

    async def _pool(self, session, rows: list[list[int]]) -> list[torch.Tensor]:
        model = await self._model_name(session)
        url = self.base_url + "/pooling"
        payload = {"model": model, "input": rows, "task": "token_classify", "use_activation": False}
        try:
            reply = await self._request(session, "POST", "/pooling", payload)
        except _Permanent as error:
            raise await self._explain(session, error, url) from None
        return self._prefix_rows(reply, rows, url)

    async def _explain(self, session, error: _Permanent, url: str) -> ServedRewardModelError:
        """A refused /pooling request, said in terms of what to change."""
        if error.param == "task" or (error.status in (400, 501) and "pooling_task" in error.message):
            return ServedRewardModelError(
                f"the server at {self.base_url} does not answer token_classify, the per-token scores that prefix "
                f"rewards need (HTTP {error.status}: {error.message}). Start vLLM with --pooler-config "
                f"'{POOLER_CONFIG}' (in verl 0.9.x: +{VERL_POOLER_CONFIG_KEY}='{POOLER_CONFIG}'); one vLLM server "
                "answers one pooling task, so it then answers /pooling for token_classify and no longer /classify",
                url=url, status=error.status)
        if error.status == 404 and "does not exist" in error.message:
            self._listing = None  # the server may have been restarted with another model
            try:
                served = list(await self._served_models(session))
            except (_Permanent, ServedRewardModelError):
                served = None
            listing = f"it serves {served}" if served else "see GET /v1/models"
            return ServedRewardModelError(
                f"the server at {self.base_url} has no model named {self.model!r} ({listing}); pass one of its names "
                "as model=, or None to take the one it serves", url=url, status=404)
        if error.status == 404:
            return ServedRewardModelError(
                f"POST {url} answered HTTP 404 ({error.message}): the server has no pooling API. Serve the reward "
                f"model as a pooling model: vLLM with --runner pooling --pooler-config '{POOLER_CONFIG}' (a "
                "*ForSequenceClassification checkpoint selects the pooling runner by itself)", url=url, status=404)
        return ServedRewardModelError(f"POST {url} answered HTTP {error.status}: {error.message}", url=url,
                                      status=error.status)

    def _prefix_rows(self, reply, rows: list[list[int]], url: str) -> list[torch.Tensor]:
        """float32 [n_b] scores per row from a token_classify reply, checked against the request."""
        from dense_rlhf.capture import _score_of

        data = reply.get("data") if isinstance(reply, dict) else None
        if not isinstance(data, list) or len(data) != len(rows):
            got = len(data) if isinstance(data, list) else type(data).__name__
            raise ServedRewardModelError(f"POST {url} returned {got} results for {len(rows)} sequences", url=url,
                                         status=200)
        out: list[torch.Tensor | None] = [None] * len(rows)
        for position, item in enumerate(data):
            index = item.get("index", position) if isinstance(item, dict) else None
            values = item.get("data") if isinstance(item, dict) else None
            if not isinstance(index, int) or not 0 <= index < len(rows) or out[index] is not None:
                raise ServedRewardModelError(f"POST {url} returned a result with a bad index ({index!r})", url=url,
                                             status=200)
            n = len(rows[index])
            if not isinstance(values, list) or len(values) != n:
                got = len(values) if isinstance(values, list) else type(values).__name__
                raise ServedRewardModelError(
                    f"POST {url} returned {got} per-token values for sequence {index}, which has {n} tokens: the "
                    "server does not apply the score head at every token (is its pooler token_classify with "
                    "tok_pooling_type ALL?) or truncated the input", url=url, status=200)
            try:
                logits = torch.tensor(values, dtype=torch.float32)
            except (TypeError, ValueError):
                raise ServedRewardModelError(f"POST {url} returned values for sequence {index} that are not numbers",
                                             url=url, status=200) from None
            if logits.dim() == 1:
                logits = logits[:, None]
            if logits.dim() != 2 or logits.shape[1] not in (1, 2):
                raise ServedRewardModelError(
                    f"POST {url} returned {tuple(logits.shape[1:])} values per token for sequence {index}; a reward "
                    "model has one logit (the score) or two (logit[1] - logit[0])", url=url, status=200)
            out[index] = _score_of(logits, "the served logits")
        return out

    # ------------------------------------------------------------------------------------------ public API

    async def aprefix_scores(self, token_ids) -> list[torch.Tensor]:
        """Async :meth:`prefix_scores`."""
        rows = _token_rows(token_ids)
        async with self._session() as session:
            return await self._pool(session, rows)

    def prefix_scores(self, token_ids) -> list[torch.Tensor]:
        """The reward model's score at every position of each sequence, in one request.

        Args:
            token_ids: B sequences of the reward model's token ids, unpadded (lists of ints or 1-D integer tensors,
                or a [B, L] tensor whose rows are all real tokens); each is scored as it is, with no special
                tokens added.

        Returns:
            B float32 CPU tensors, row b of length ``len(token_ids[b])``: the score of the prefix ending at each
            position (a one-logit head's logit, or ``logit[1] - logit[0]``), as
            :func:`dense_rlhf.capture_prefix_scores` reads it in-process; the last is the sequence's score.

        Raises:
            TypeError, ValueError: bad ``token_ids``, before any request.
            ServedRewardModelError: the server is unreachable or keeps failing (after ``max_retries``), does not
                answer ``token_classify`` (the message names ``--pooler-config`` and verl's key), has no such
                model, or replies with a different number of values than tokens; always with the URL.
        """
        return _run(self.aprefix_scores(token_ids))

    async def ascore_and_densify(self, input_ids, attention_mask, completion_mask, *, method: str = "prefix",
                                 beta=0.8):
        """Async :meth:`score_and_densify`."""
        from dense_rlhf.ops import check_beta, prefix_rewards, sparse_rewards, uniform_rewards

        _check_method(method)
        beta = check_beta(beta)
        attention, completion = _check_batch(input_ids, attention_mask, completion_mask)
        ids_cpu = input_ids.cpu()
        rows = [ids_cpu[b][attention[b]].tolist() for b in range(ids_cpu.shape[0])]
        empty = [b for b, row in enumerate(rows) if not row]
        if empty:
            raise ValueError(f"attention_mask has no token in rows {empty[:10]}")
        async with self._session() as session:
            values = await self._pool(session, rows)
        prefix = torch.zeros(attention.shape, dtype=torch.float32)
        for b, row in enumerate(values):
            prefix[b, attention[b]] = row
        reward_index = torch.where(attention, torch.arange(attention.shape[1]), -1).amax(1)
        scores = prefix[torch.arange(len(rows)), reward_index]
        device = input_ids.device
        completion = completion.to(device)
        if method == "prefix":
            rewards = prefix_rewards(prefix.to(device), completion, beta=beta, reward_index=reward_index.to(device))
        elif method == "sparse":
            rewards = sparse_rewards(scores.to(device), completion)
        else:
            rewards = uniform_rewards(scores.to(device), completion)
        return scores.to(device), rewards

    def score_and_densify(self, input_ids, attention_mask, completion_mask, *, method: str = "prefix", beta=0.8):
        """:func:`dense_rlhf.score_and_densify` with the forward on the server: ``(scores [B], rewards [B, L])``.

        Args:
            input_ids: [B, L] the reward model's token ids (prompt + completion, padded on either side).
            attention_mask: [B, L] bool or 0/1, True on real tokens; each row's real tokens are sent, unpadded,
                so positions count from its first real token (with right padding, exactly the local forward's
                positions; with left padding, equal for position-relative models such as rotary ones).
            completion_mask: [B, L] bool or 0/1, True on completion tokens (inside the attention mask).
            method: "prefix" (default: :func:`dense_rlhf.prefix_rewards` of the served prefix scores), "sparse"
                or "uniform". "abc" is refused: a served model exposes no attention.
            beta: in [0, 1], as in :func:`dense_rlhf.prefix_rewards`.

        Returns:
            float32 ``scores`` [B] (the score at each row's last real token, where a decoder reward model pools
            it) and ``rewards`` [B, L], each row summing to its score, zero off ``completion_mask``; on
            ``input_ids``' device.
        """
        return _run(self.ascore_and_densify(input_ids, attention_mask, completion_mask, method=method, beta=beta))


    async def _ascore_text(self, rm_tokenizer, prompts, response_ids, *, policy_tokenizer, response_mask, beta,
                           method, max_length, strict: bool):
        """The served twin of ``dense_rlhf.align._score_text``: the same preparation (decode, render, tokenise) and
        the same finish (projection, rewards), with the per-token scores from the server. ``strict=False``: rows
        that cannot be scored or mapped are reported (``failed``, ``unmapped``) instead of raising."""
        from dense_rlhf.align import _finish_text, _prepare_text

        _check_method(method)
        batch = _prepare_text(rm_tokenizer, prompts, response_ids, policy_tokenizer=policy_tokenizer,
                              response_mask=response_mask, beta=beta, max_length=max_length, strict=strict,
                              method=method)
        inputs = batch.inputs
        async with self._session() as session:
            limit = await self._max_model_len(session)
            for b, row in enumerate(inputs.rows):
                if row is not None and limit is not None and len(row["input_ids"]) > limit:
                    inputs.fail(b, f"the reward model's input has {len(row['input_ids'])} tokens but the server at "
                                   f"{self.base_url} takes at most {limit} (its max_model_len); pass "
                                   f"max_length={limit} (with rm_tokenizer.truncation_side = 'left' to cut the prompt) "
                                   "or shorten the prompts")
            todo = [b for b, row in enumerate(inputs.rows) if row is not None]
            values = await self._pool(session, [inputs.rows[b]["input_ids"] for b in todo]) if todo else []
        results = {}
        for b, row in zip(todo, values):
            if not bool(torch.isfinite(row[-1])):
                inputs.fail(b, f"the served reward model's score is {float(row[-1])}")
                continue
            results[b] = (float(row[-1]), row)
        return _finish_text(batch, results, method)

    async def ascore_and_densify_text(self, rm_tokenizer, prompts, response_ids, *, policy_tokenizer,
                                      response_mask=None, beta=0.8, method: str = "prefix", max_length=None):
        """Async :meth:`score_and_densify_text`."""
        result = await self._ascore_text(rm_tokenizer, prompts, response_ids, policy_tokenizer=policy_tokenizer,
                                         response_mask=response_mask, beta=beta, method=method,
                                         max_length=max_length, strict=True)
        return result.scores, result.rewards

    def score_and_densify_text(self, rm_tokenizer, prompts, response_ids, *, policy_tokenizer, response_mask=None,
                               beta=0.8, method: str = "prefix", max_length=None):
        """:func:`dense_rlhf.score_and_densify_text` with the reward model on the server: ``(scores [B],
        rewards [B, R])`` on the policy's response tokens, equal to the local call on the same weights for
        ``method="prefix"`` (default), ``"sparse"`` and ``"uniform"``.

        The responses are decoded, rendered with ``rm_tokenizer``'s chat template (or appended to plain-text
        prompts) and tokenised by the same code as the local call (``dense_rlhf.align.render_and_tokenize``:
        control tokens spelled by a response stay text); the reward model's token ids go to the server, one request
        for the batch, unpadded; its score at every position comes back, and the changes of the score over the
        response's tokens are mapped onto the policy's tokens as the local call maps them. ``method="abc"`` raises:
        a served model exposes no attention.

        Args:
            rm_tokenizer: the served reward model's fast tokenizer (the one the server was started with).
            prompts, response_ids, policy_tokenizer, response_mask, beta, max_length: as in
                :func:`dense_rlhf.score_and_densify_text`. An input longer than the server's ``max_model_len``
                (from ``GET /v1/models``) is refused before the request, like one longer than a local model's
                positions.

        Raises:
            what :func:`dense_rlhf.score_and_densify_text` raises for its arguments and rows (before any request),
            and ServedRewardModelError as :meth:`prefix_scores` does.
        """
        return _run(self.ascore_and_densify_text(rm_tokenizer, prompts, response_ids, policy_tokenizer=policy_tokenizer,
                                                 response_mask=response_mask, beta=beta, method=method,
                                                 max_length=max_length))


def _check_method(method) -> None:
    if method == "abc":
        raise ValueError("method='abc' needs the reward model's attention, which a served model does not expose; use "
                         "method='prefix' (or 'sparse', 'uniform') here, or run ABC with the reward model in-process "
                         "(dense_rlhf.score_and_densify or score_and_densify_text)")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS} for a served reward model, got {method!r}")


def _as_mask(mask, name: str, shape) -> torch.Tensor:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} must have input_ids' shape {tuple(shape)}, got {tuple(mask.shape)}")
    if mask.dtype != torch.bool:
        if mask.dtype.is_floating_point or mask.dtype.is_complex or not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError(f"{name} must be bool or hold only 0 and 1")
        mask = mask.bool()
    return mask.cpu()


def _check_batch(input_ids, attention_mask, completion_mask):
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise TypeError(f"input_ids must be a 2-D [B, L] integer tensor, got {got}")
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise TypeError(f"input_ids must hold integer token ids, got {input_ids.dtype}")
    attention = _as_mask(attention_mask, "attention_mask", input_ids.shape)
    completion = _as_mask(completion_mask, "completion_mask", input_ids.shape)
    outside = (completion & ~attention).any(1).nonzero().flatten().tolist()
    if outside:
        raise ValueError(f"completion_mask marks padding (attention_mask False) in rows {outside[:10]}")
    return attention, completion
