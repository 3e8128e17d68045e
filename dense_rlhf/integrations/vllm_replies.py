"""How :class:`dense_rlhf.integrations.vllm.ServedRewardModel` reads a server's replies: never trusted. A body is
read up to a size limit, decoded as UTF-8 and parsed as JSON by the checks here, and a ``token_classify`` reply is
checked against the request, value by value, before any number reaches the caller. Every failure is a
:class:`~dense_rlhf.integrations.vllm_messages.ServedRewardModelError` that names the URL, the row where one is
at fault, and keeps the server's own message. Nothing here imports aiohttp; :func:`read_body` takes its reply."""

from __future__ import annotations

import json

import torch

from dense_rlhf.capture.model import _score_of
from dense_rlhf.integrations.vllm_messages import POOLER_CONFIG, VERL_POOLER_CONFIG_KEY, ServedRewardModelError

REPLY_FLOOR_BYTES = 1 << 20
"""The least a reply may hold (1 MiB): room for a model listing or an error body, whatever the request."""
REPLY_BYTES_PER_VALUE = 64
"""Bytes of JSON allowed per value a ``token_classify`` reply should hold (tokens x 3: the ABC plugin's three
channels, more than a reward model's one or two logits): a float's JSON text with its separators takes at most about
30."""
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def reply_limit(rows: list[list[int]] | None = None) -> int:
    """The most bytes read of a reply: :data:`REPLY_BYTES_PER_VALUE` for each value the reply to ``rows`` should
    hold (3 per token), at least :data:`REPLY_FLOOR_BYTES`."""
    values = 3 * sum(len(row) for row in rows) if rows else 0
    return max(REPLY_FLOOR_BYTES, REPLY_BYTES_PER_VALUE * values)


async def read_body(reply, limit: int, what: str, url: str) -> bytes:
    """The body of an aiohttp reply, read in chunks and given up as soon as it passes ``limit`` bytes (also when its
    Content-Length says so), so that no reply is held in memory whole beyond the limit."""
    too_long = ServedRewardModelError(
        f"{what} answered HTTP {reply.status} with a body of more than {limit} bytes, more than a reply to this "
        f"request can hold (the client reads at most {REPLY_BYTES_PER_VALUE} bytes per expected value, at least "
        f"{REPLY_FLOOR_BYTES}); is {url} a vLLM server?",
        url=url,
        status=reply.status,
    )
    if reply.content_length is not None and reply.content_length > limit:
        raise too_long
    chunks, size = [], 0
    async for chunk in reply.content.iter_chunked(1 << 16):
        size += len(chunk)
        if size > limit:
            raise too_long
        chunks.append(chunk)
    return b"".join(chunks)


def _loads(text: str):
    """JSON of ``text``; ValueError for anything that is not (nesting too deep for the parser included)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def error_text(body: bytes) -> tuple[str, object]:
    """(message, param) of an error reply: vLLM's ``{"error": {"message", "param"}}``, its older
    ``{"object": "error", "message"}``, FastAPI's ``{"detail"}``, or the text itself (bytes that are not UTF-8
    shown with escapes)."""
    text = body.decode("utf-8", errors="backslashreplace")
    try:
        reply = _loads(text)
    except ValueError:
        return text.strip()[:500], None
    if isinstance(reply, dict):
        error = reply.get("error")
        if isinstance(error, dict):
            return str(error.get("message", error))[:500], error.get("param")
        if error is not None:
            return str(error)[:500], None
        if "detail" in reply:
            return str(reply["detail"])[:500], None
        if "message" in reply:
            return str(reply["message"])[:500], None
    return text.strip()[:500], None


def json_reply(body: bytes, what: str, url: str):
    """The JSON of a 200 reply. A body that is not UTF-8 or not JSON, and an error reply sent with status 200
    (``{"error": ...}`` or ``{"object": "error", ...}``, as some servers and proxies do), raise with the server's
    message."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as error:
        raise ServedRewardModelError(
            f"{what} answered 200 with a body that is not UTF-8 ({error.reason} at byte {error.start}): {body[:200]!r}",
            url=url,
            status=200,
        ) from None
    try:
        reply = _loads(text)
    except ValueError as error:
        raise ServedRewardModelError(
            f"{what} answered 200 with a body that is not JSON ({error}): {text[:200]!r}", url=url, status=200
        ) from None
    if isinstance(reply, dict) and (reply.get("error") is not None or reply.get("object") == "error"):
        message, _ = error_text(body)
        raise ServedRewardModelError(f"{what} answered 200 with an error: {message}", url=url, status=200)
    return reply


def model_listing(reply, url: str) -> dict:
    """``{name: max_model_len or None}`` of a ``GET /v1/models`` reply; an entry without a string ``id`` raises."""
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(data, list):
        raise ServedRewardModelError(
            f"GET {url} answered without a list of models ('data'): {str(reply)[:200]}; pass model= (the served "
            "model's name)",
            url=url,
            status=200,
        )
    listing = {}
    for k, entry in enumerate(data):
        name = entry.get("id") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not name:
            raise ServedRewardModelError(
                f"GET {url} listed a model without a name (entry {k}: {str(entry)[:200]}); pass model= (the served "
                "model's name)",
                url=url,
                status=200,
            )
        listing[name] = entry.get("max_model_len")
    return listing


def _row_logits(values, n: int, row: str, url: str) -> torch.Tensor:
    """[n, C] float32 logits of one row's reply values: n numbers, or n lists of C = 1 or 2 numbers, or 3 (the ABC
    plugin's reply, :func:`is_abc_reply`) (JSON numbers only: no booleans, strings or nulls), each finite and within
    float32's range."""

    def bad(what: str) -> ServedRewardModelError:
        return ServedRewardModelError(f"POST {url} returned {what} for {row}", url=url, status=200)

    if not isinstance(values, list) or len(values) != n:
        got = len(values) if isinstance(values, list) else type(values).__name__
        raise ServedRewardModelError(
            f"POST {url} returned {got} per-token values for {row}, which has {n} tokens: the server does not apply "
            "the score head at every token (is its pooler token_classify with tok_pooling_type ALL?) or truncated "
            "the input",
            url=url,
            status=200,
        )
    widths = {len(v) if type(v) is list else None for v in values}  # None: a bare number per token
    if len(widths) != 1 or widths.pop() not in (None, 1, 2, 3):
        raise ServedRewardModelError(
            f"POST {url} returned per-token values for {row} that are not one logit (the score) or two "
            "(logit[1] - logit[0]) for every token, nor dense-rlhf's ABC reply (score, attention weight, position)",
            url=url,
            status=200,
        )
    flat = [x for v in values for x in (v if type(v) is list else (v,))]
    if not all(type(x) is float or type(x) is int for x in flat):
        kinds = sorted({type(x).__name__ for x in flat if type(x) not in (float, int)})
        raise bad(f"values that are not numbers ({', '.join(kinds)})")
    try:
        wide = torch.tensor(flat, dtype=torch.float64)
    except (OverflowError, RuntimeError):  # an integer beyond float64
        raise bad("a value beyond float32's range") from None
    if not bool(torch.isfinite(wide).all()):
        where = (~torch.isfinite(wide)).nonzero().flatten()[0]
        raise bad(f"a value that is not finite ({float(wide[where])})")
    if bool((wide.abs() > _FLOAT32_MAX).any()):
        raise bad(f"a value that overflows float32 ({float(wide[wide.abs().argmax()]):g})")
    return wide.float().reshape(n, -1)


def reply_rows(reply, rows: list[list[int]], url: str, labels: list | None = None) -> list[torch.Tensor]:
    """float32 [n_b, C] values per row of a token_classify reply, checked against the request (one result per row,
    each as :func:`_row_logits` checks it). ``labels``: how the messages name request row i (default
    ``sequence i``)."""
    data = reply.get("data") if isinstance(reply, dict) else None
    if not isinstance(data, list) or len(data) != len(rows):
        got = len(data) if isinstance(data, list) else type(data).__name__
        raise ServedRewardModelError(
            f"POST {url} returned {got} results for {len(rows)} sequences", url=url, status=200
        )
    out: list[torch.Tensor | None] = [None] * len(rows)
    for position, item in enumerate(data):
        index = item.get("index", position) if isinstance(item, dict) else None
        if type(index) is not int or not 0 <= index < len(rows) or out[index] is not None:
            raise ServedRewardModelError(
                f"POST {url} returned a result with a bad index ({str(index)[:50]})", url=url, status=200
            )
        label = labels[index] if labels is not None else f"sequence {index}"
        out[index] = _row_logits(item.get("data"), len(rows[index]), label, url)
    return out


def is_abc_reply(values: torch.Tensor) -> bool:
    """Whether a row's [n, C] values are the ABC plugin's ``[score, attention weight, position]`` per token: three
    channels whose third counts the tokens 0..n-1, which no classifier head's logits do."""
    return values.shape[1] == 3 and torch.equal(values[:, 2], torch.arange(len(values), dtype=torch.float32))


def prefix_rows(reply, rows: list[list[int]], url: str, labels: list | None = None) -> list[torch.Tensor]:
    """float32 [n_b] scores per row from a token_classify reply, checked against the request (:func:`reply_rows`):
    a one- or two-logit head's (``logit[1] - logit[0]``), or the score channel of an ABC reply."""
    out = []
    for index, values in enumerate(reply_rows(reply, rows, url, labels)):
        if values.shape[1] == 3:
            if not is_abc_reply(values):
                label = labels[index] if labels is not None else f"sequence {index}"
                raise ServedRewardModelError(
                    f"POST {url} returned three values per token for {label} whose third is not the token's "
                    "position: a three-label head, which a reward model is not, or a reply to another request",
                    url=url,
                    status=200,
                )
            out.append(values[:, 0].contiguous())
        else:
            out.append(_score_of(values, "the served logits"))
    return out


def refusal(error, url: str, base_url: str, model: str | None, served: list | None) -> ServedRewardModelError:
    """A refused /pooling request (``error``: the client's ``_Permanent``), said in terms of what to change;
    ``served``: the model names the server lists, where asked."""
    if error.param == "task" or (error.status in (400, 501) and "pooling_task" in error.message):
        return ServedRewardModelError(
            f"the server at {base_url} does not answer token_classify, the per-token scores that prefix "
            f"rewards need (HTTP {error.status}: {error.message}). Start vLLM with --pooler-config "
            f"'{POOLER_CONFIG}' (in verl 0.9.x: +{VERL_POOLER_CONFIG_KEY}='{POOLER_CONFIG}'); one vLLM server "
            "answers one pooling task, so it then answers /pooling for token_classify and no longer /classify",
            url=url,
            status=error.status,
        )
    if error.status == 404 and "does not exist" in error.message:
        listing = f"it serves {served}" if served else "see GET /v1/models"
        return ServedRewardModelError(
            f"the server at {base_url} has no model named {model!r} ({listing}); pass one of its names "
            "as model=, or None to take the one it serves",
            url=url,
            status=404,
        )
    if error.status == 404:
        return ServedRewardModelError(
            f"POST {url} answered HTTP 404 ({error.message}): the server has no pooling API. Serve the reward "
            f"model as a pooling model: vLLM with --runner pooling --pooler-config '{POOLER_CONFIG}' (a "
            "*ForSequenceClassification checkpoint selects the pooling runner by itself)",
            url=url,
            status=404,
        )
    return ServedRewardModelError(
        f"POST {url} answered HTTP {error.status}: {error.message}", url=url, status=error.status
    )
