"""The client for a reward model served by vLLM (dense_rlhf.integrations.vllm).

Two parts. The client's own behaviour (argument checks, retries with backoff, timeouts, replies that do not match the
request) against a small aiohttp app in this process: runs wherever aiohttp is installed. Then the same client
against a real vLLM server that a module fixture starts on 127.0.0.1 with a small random reward model: its prefix
scores and rewards equal the in-process computation on the same weights, and a server that is down, has no
token_classify pooler or does not know the model gives the errors that say what to change. The real server runs only
where ``DENSE_RLHF_VLLM_PYTHON`` names a Python with vLLM (``make test-vllm`` sets it to its own environment's).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import re
import shlex
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

aiohttp = pytest.importorskip("aiohttp", reason="the client needs aiohttp (pip install 'dense-rlhf[served]')")

from aiohttp import web  # noqa: E402

import dense_rlhf  # noqa: E402
from dense_rlhf.integrations.vllm import (  # noqa: E402
    POOLER_CONFIG,
    VERL_HF_OVERRIDES_KEY,
    VERL_POOLER_CONFIG_KEY,
    ServedRewardModel,
    ServedRewardModelError,
    abc_hf_overrides,
)
from dense_rlhf.integrations.vllm_plugin import LAYER_KEY  # noqa: E402
from dense_rlhf.integrations.vllm_server import CPU_ARGS, LocalVLLMServer, free_port  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = os.environ.get("DENSE_RLHF_VLLM_PYTHON")
# the servers' flags: CPU_ARGS unless given (benchmarks/gpu_check.sh gives flags for a GPU)
VLLM_ARGS = shlex.split(os.environ["DENSE_RLHF_VLLM_ARGS"]) if os.environ.get("DENSE_RLHF_VLLM_ARGS") else CPU_ARGS
TOL = dict(atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------- a scripted server


class Scripted:
    """An aiohttp app on a free port, in a thread with its own event loop, whose /pooling replies follow a script:
    one handler per request, the last one repeated. /v1/models lists ``models``."""

    def __init__(self, *handlers, models=("rm",), max_model_len=None):
        self.handlers, self.models, self.requests = list(handlers), list(models), []
        self.max_model_len = max_model_len

    async def _pooling(self, request):
        body = await request.json()
        self.requests.append(body)
        handler = self.handlers[min(len(self.requests), len(self.handlers)) - 1]
        return await handler(body)

    async def _models(self, request):
        return web.json_response(
            {
                "object": "list",
                "data": [{"id": m, "object": "model", "max_model_len": self.max_model_len} for m in self.models],
            }
        )

    async def _start(self):
        app = web.Application()
        app.router.add_post("/pooling", self._pooling)
        app.router.add_get("/v1/models", self._models)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port).start()

    def __enter__(self):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


def echo(values_of=lambda row: [[float(t) / 10] for t in row]):
    """A handler that answers token_classify as vLLM does: per token, the values ``values_of(row)``."""

    async def handler(body):
        data = [{"index": i, "object": "pooling", "data": values_of(row)} for i, row in enumerate(body["input"])]
        return web.json_response({"object": "list", "data": data})

    return handler


def head_of(model):
    """A handler that answers token_classify from ``model`` in this process: what vLLM computes, without vLLM."""

    async def handler(body):
        data = []
        for i, row in enumerate(body["input"]):
            with torch.no_grad(), dense_rlhf.capture_prefix_scores(model) as cap:
                model(input_ids=torch.tensor([row]))
            data.append({"index": i, "data": [[v] for v in cap.prefix_scores[0].tolist()]})
        return web.json_response({"data": data})

    return handler


def abc_head_of(model):
    """A handler that answers as dense-rlhf's ABC plugin does, from ``model`` in this process: per token the score,
    the head-averaged attention weight from the row's last token, and the position."""

    async def handler(body):
        data = []
        for i, row in enumerate(body["input"]):
            with torch.no_grad(), dense_rlhf.capture_prefix_scores(model) as cap:
                with dense_rlhf.capture_reward_attention(model) as attention:
                    model(input_ids=torch.tensor([row]))
            values = zip(cap.prefix_scores[0].tolist(), attention.rows.mean(1)[0].tolist())
            data.append({"index": i, "data": [[s, w, float(p)] for p, (s, w) in enumerate(values)]})
        return web.json_response({"data": data})

    return handler


def status(code: int, message: str = "boom", param=None):
    async def handler(body):
        return web.json_response(
            {"error": {"message": message, "type": "Error", "param": param, "code": code}}, status=code
        )

    return handler


def slow(seconds: float):
    async def handler(body):
        await asyncio.sleep(seconds)
        return await echo()(body)

    return handler


def test_scores_requested_as_token_ids_with_raw_logits():
    with Scripted(echo()) as server:
        out = ServedRewardModel(server.url).prefix_scores([[1, 2, 3], torch.tensor([7])])
    assert [o.tolist() for o in out] == [pytest.approx([0.1, 0.2, 0.3]), pytest.approx([0.7])]
    assert all(o.dtype == torch.float32 for o in out)
    assert server.requests == [
        {"model": "rm", "input": [[1, 2, 3], [7]], "task": "token_classify", "use_activation": False}
    ]


def test_the_async_twin_gives_the_same():
    with Scripted(echo()) as server:
        client = ServedRewardModel(server.url, "rm")

        async def main():
            return await asyncio.gather(client.aprefix_scores([[1, 2]]), client.aprefix_scores([[3]]))

        first, second = asyncio.run(main())
    assert first[0].tolist() == pytest.approx([0.1, 0.2]) and second[0].tolist() == pytest.approx([0.3])


def test_two_logit_heads_give_logit1_minus_logit0():
    with Scripted(echo(lambda row: [[1.0, 1.0 + t] for t in row])) as server:
        assert ServedRewardModel(server.url, "rm").prefix_scores([[2, 5]])[0].tolist() == [2.0, 5.0]


def test_results_are_put_back_in_request_order():
    async def reversed_order(body):
        rows = body["input"]
        data = [{"index": i, "data": [[float(i)]] * len(rows[i])} for i in reversed(range(len(rows)))]
        return web.json_response({"data": data})

    with Scripted(reversed_order) as server:
        out = ServedRewardModel(server.url).prefix_scores([[1], [1, 1], [1, 1, 1]])
    assert [o.tolist() for o in out] == [[0.0], [1.0, 1.0], [2.0, 2.0, 2.0]]


def test_server_errors_are_retried_with_backoff_then_succeed():
    with Scripted(status(503), status(500), echo()) as server:
        client = ServedRewardModel(server.url, "rm", max_retries=2, backoff=0.05)
        start = time.monotonic()
        out = client.prefix_scores([[4]])
        elapsed = time.monotonic() - start
    assert out[0].tolist() == pytest.approx([0.4]) and len(server.requests) == 3
    assert elapsed >= 0.05 + 0.1  # backoff * 2**k before retry k + 1


def test_retries_exhausted_name_the_url_and_the_last_error():
    with Scripted(status(503, "overloaded")) as server:
        with pytest.raises(ServedRewardModelError) as error:
            ServedRewardModel(server.url, "rm", max_retries=2, backoff=0.0).prefix_scores([[4]])
    assert len(server.requests) == 3 and error.value.url == server.url + "/pooling" and error.value.status == 503
    assert f"POST {server.url}/pooling failed after 3 attempts" in str(error.value)
    assert "overloaded" in str(error.value)


def test_client_errors_are_not_retried():
    with Scripted(status(400, "This model's maximum context length is 512 tokens")) as server:
        with pytest.raises(ServedRewardModelError, match="HTTP 400: This model's maximum context length") as error:
            ServedRewardModel(server.url, "rm", max_retries=3, backoff=0.0).prefix_scores([[4]])
    assert len(server.requests) == 1 and error.value.status == 400


def test_timeouts_are_retried_then_reported():
    with Scripted(slow(1.0)) as server:
        with pytest.raises(ServedRewardModelError, match=r"no reply within timeout=0.2 s") as error:
            ServedRewardModel(server.url, "rm", timeout=0.2, max_retries=1, backoff=0.0).prefix_scores([[4]])
    assert len(server.requests) == 2 and "failed after 2 attempts" in str(error.value)
    assert error.value.url == server.url + "/pooling"


def test_a_timeout_then_a_reply_succeeds():
    with Scripted(slow(1.0), echo()) as server:
        out = ServedRewardModel(server.url, "rm", timeout=0.5, max_retries=1, backoff=0.0).prefix_scores([[4]])
    assert out[0].tolist() == pytest.approx([0.4])


def test_server_down_after_retries():
    port = free_port()
    client = ServedRewardModel(f"127.0.0.1:{port}", "rm", max_retries=1, backoff=0.01)
    assert client.base_url == f"http://127.0.0.1:{port}"  # verl hands its router's address over without a scheme
    with pytest.raises(ServedRewardModelError, match="Is the reward-model server running") as error:
        client.prefix_scores([[1, 2]])
    assert error.value.url == f"http://127.0.0.1:{port}/pooling" and error.value.status is None
    assert "failed after 2 attempts" in str(error.value)


@pytest.mark.parametrize(
    "reply, match",
    [
        (
            lambda rows: {"data": [{"index": 0, "data": [[0.0]] * (len(rows[0]) - 1)}]},
            r"returned 2 per-token values for sequence 0, which has 3 tokens",
        ),
        (lambda rows: {"data": []}, r"returned 0 results for 1 sequences"),
        (lambda rows: {"data": [{"index": 3, "data": [[0.0]] * 3}]}, r"bad index \(3\)"),
        (lambda rows: {"data": [{"index": 0, "data": [[0.0, 1.0, 2.0]] * 3}]}, r"third is not the token's position"),
        (lambda rows: {"data": [{"index": 0, "data": [[0.0] * 4] * 3}]}, r"one logit \(the score\) or two"),
        (lambda rows: {"data": [{"index": 0, "data": ["x"] * 3}]}, r"not numbers"),
        (lambda rows: {"something": "else"}, r"returned NoneType results"),
    ],
    ids=["short", "no-results", "bad-index", "three-logits", "four-logits", "not-numbers", "no-data"],
)
def test_replies_that_do_not_match_the_request(reply, match):
    async def handler(body):
        return web.json_response(reply(body["input"]))

    with Scripted(handler) as server:
        with pytest.raises(ServedRewardModelError, match=match) as error:
            ServedRewardModel(server.url, "rm").prefix_scores([[1, 2, 3]])
    assert error.value.url == server.url + "/pooling"


def test_the_model_name_is_asked_once_when_not_given():
    with Scripted(echo(), models=["only-model"]) as server:
        client = ServedRewardModel(server.url)
        client.prefix_scores([[1]])
        client.prefix_scores([[2]])
    assert client.model == "only-model" and [r["model"] for r in server.requests] == ["only-model"] * 2


def test_several_served_models_need_a_choice():
    with Scripted(echo(), models=["a", "b"]) as server:
        with pytest.raises(ServedRewardModelError, match=r"serves 2 models \(\['a', 'b'\]\); pass model="):
            ServedRewardModel(server.url).prefix_scores([[1]])


def test_the_sync_call_works_inside_a_running_event_loop():
    """As in a notebook: the call runs in a helper thread with its own loop."""
    with Scripted(echo()) as server:
        client = ServedRewardModel(server.url, "rm")

        async def main():
            return client.prefix_scores([[3]])

        assert asyncio.run(main())[0].tolist() == pytest.approx([0.3])


def test_token_level_score_and_densify_matches_prefix_rewards_on_the_served_values():
    """Right and left padding: each row's real tokens are sent unpadded and the values put back at their positions."""
    values = {1: 0.5, 2: -1.0, 3: 2.0, 4: 0.25, 5: 1.5}
    ids = torch.tensor([[1, 2, 3, 4, 0, 0], [0, 5, 3, 2, 1, 4]])
    attention = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 1, 1, 1, 1, 1]])
    completion = torch.tensor([[0, 0, 1, 1, 0, 0], [0, 0, 0, 1, 1, 0]], dtype=torch.bool)
    with Scripted(echo(lambda row: [[values[t]] for t in row])) as server:
        client = ServedRewardModel(server.url, "rm")
        out = {
            m: client.score_and_densify(ids, attention, completion, method=m, beta=0.7)
            for m in ("prefix", "sparse", "uniform")
        }
        async_out = asyncio.run(client.ascore_and_densify(ids, attention, completion, beta=0.7))
    assert server.requests[0]["input"] == [[1, 2, 3, 4], [5, 3, 2, 1, 4]]
    prefix = torch.tensor(
        [[values[t] if a else 0.0 for t, a in zip(r, m)] for r, m in zip(ids.tolist(), attention.tolist())]
    )
    scores = torch.tensor([0.25, 0.25])
    expected = dense_rlhf.prefix_rewards(prefix, completion, beta=0.7, reward_index=torch.tensor([3, 5]))
    torch.testing.assert_close(out["prefix"][0], scores)
    torch.testing.assert_close(out["prefix"][1], expected)
    torch.testing.assert_close(async_out[1], expected)
    torch.testing.assert_close(out["sparse"][1], dense_rlhf.sparse_rewards(scores, completion))
    torch.testing.assert_close(out["uniform"][1], dense_rlhf.uniform_rewards(scores, completion))


def test_bad_arguments_are_refused_before_any_request():
    client = ServedRewardModel("http://127.0.0.1:9", "rm", max_retries=0)  # nothing listens on port 9
    with pytest.raises(TypeError, match="base_url"):
        ServedRewardModel("")
    with pytest.raises(ValueError, match="http:// or https://"):
        ServedRewardModel("ftp://host")
    with pytest.raises(ValueError, match="timeout must be above 0"):
        ServedRewardModel("host:1", timeout=0)
    with pytest.raises(ValueError, match="max_retries must be at least 0"):
        ServedRewardModel("host:1", max_retries=-1)
    with pytest.raises(TypeError, match="max_retries must be an integer"):
        ServedRewardModel("host:1", max_retries=1.5)
    with pytest.raises(TypeError, match="model must be"):
        ServedRewardModel("host:1", model="")
    with pytest.raises(ValueError, match=r"token_ids\[1\] is empty"):
        client.prefix_scores([[1], []])
    with pytest.raises(TypeError, match=r"token_ids\[0\] must hold non-negative integer"):
        client.prefix_scores([[1, -2]])
    with pytest.raises(TypeError, match=r"token_ids\[0\] must be a 1-D integer tensor"):
        client.prefix_scores([torch.tensor([1.0])])
    with pytest.raises(TypeError, match="list of token-id lists"):
        client.prefix_scores("hello")
    ids, mask = torch.tensor([[1, 2]]), torch.tensor([[1, 1]])
    with pytest.raises(ValueError, match="method must be one of"):
        client.score_and_densify(ids, mask, mask, method="attention")
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\]"):
        client.score_and_densify(ids, mask, mask, beta=1.5)
    with pytest.raises(ValueError, match="completion_mask marks padding"):
        client.score_and_densify(ids, torch.tensor([[1, 0]]), mask)
    with pytest.raises(ValueError, match="completion_mask must have input_ids' shape"):
        client.score_and_densify(ids, mask, torch.tensor([1, 1]))
    with pytest.raises(ValueError, match=r"completion_mask marks no completion token in rows \[1\]"):
        client.score_and_densify(ids.repeat(2, 1), mask.repeat(2, 1), torch.tensor([[0, 1], [0, 0]]))
    with pytest.raises(ValueError, match="completion_mask must hold only 0 and 1"):
        client.score_and_densify(ids, mask, torch.tensor([[0, 2]]))


def raw(body: bytes, code: int = 200, content_type: str = "application/json"):
    """A handler that answers ``body`` as it is."""

    async def handler(request_body):
        return web.Response(body=body, status=code, content_type=content_type)

    return handler


class Streaming(Scripted):
    """A server whose /pooling streams ``size`` bytes without a Content-Length."""

    def __init__(self, size: int):
        super().__init__(echo())
        self.size = size

    async def _pooling(self, request):
        self.requests.append(await request.json())
        response = web.StreamResponse(status=200)
        response.enable_chunked_encoding()
        await response.prepare(request)
        sent = 0
        try:
            while sent < self.size:
                await response.write(b"[" * 65536)
                sent += 65536
        except (ConnectionError, RuntimeError):  # the client hung up, as it should
            return response
        await response.write_eof()
        return response


@pytest.mark.parametrize(
    "reply, match",
    [
        ({"data": [{"index": 0, "data": [[True], [False]]}]}, r"not numbers \(bool\) for row 0"),
        ({"data": [{"index": False, "data": [[0.0], [1.0]]}]}, r"bad index \(False\)"),
        ({"data": [{"index": 0, "data": [[0.0], [None]]}]}, r"not numbers \(NoneType\) for row 0"),
        ({"data": [{"index": 0, "data": [[0.0], [1.0, 2.0]]}]}, r"one logit \(the score\) or two"),
        ({"data": [{"index": 0, "data": [[], []]}]}, r"one logit \(the score\) or two"),
        ({"data": [{"index": 0, "data": [0.5, []]}]}, r"one logit \(the score\) or two"),
        ({"data": [{"index": 0, "data": [[0.0], [10**400]]}]}, r"beyond float32's range for row 0"),
        ({"data": [{"index": 0, "data": [[0.0], [1e300]]}]}, r"overflows float32 \(1e\+300\) for row 0"),
        ({"data": [{"index": 0, "data": [[0.0], [float("nan")]]}]}, r"not finite \(nan\) for row 0"),
        ({"data": [{"index": 0, "data": [[float("-inf")], [0.0]]}]}, r"not finite \(-inf\) for row 0"),
        ({"data": [{"index": 10**400, "data": [[0.0], [1.0]]}]}, r"bad index"),
    ],
    ids=[
        "bools",
        "bool-index",
        "null",
        "ragged",
        "empty-lists",
        "number-and-list",
        "huge-int",
        "1e300",
        "nan",
        "inf",
        "huge-index",
    ],
)
def test_replies_with_values_that_are_not_float32_numbers_name_the_row(reply, match):
    with Scripted(raw(json.dumps(reply).encode())) as server:
        client = ServedRewardModel(server.url, "rm", max_retries=0)
        with pytest.raises(ServedRewardModelError, match=match) as error:
            client.score_and_densify(torch.tensor([[1, 2]]), torch.tensor([[1, 1]]), torch.tensor([[0, 1]]))
    assert error.value.url == server.url + "/pooling" and error.value.status == 200


@pytest.mark.parametrize(
    "body, match",
    [
        (b'{"data": "\xff\xfe"}', r"not UTF-8 \(invalid start byte at byte"),
        (b"[" * 200_000 + b"]" * 200_000, r"not JSON \(nested too deeply\)"),
        (b'{"data": [{"index": 0, "data": [[' + b"9" * 5000 + b"]]}]}", r"not JSON \(Exceeds the limit"),
        (b'{"error": {"message": "engine crashed", "code": 500}}', r"answered 200 with an error: engine crashed"),
        (b'{"object": "error", "message": "queue full", "code": 503}', r"answered 200 with an error: queue full"),
    ],
    ids=["not-utf8", "deep", "huge-int-text", "error-body", "old-error-body"],
)
def test_bodies_that_cannot_be_read_keep_the_servers_words_and_name_the_url(body, match):
    with Scripted(raw(body)) as server:
        with pytest.raises(ServedRewardModelError, match=match) as error:
            ServedRewardModel(server.url, "rm", max_retries=2, backoff=0.0).prefix_scores([[1]])
    assert error.value.url == server.url + "/pooling" and error.value.status == 200 and len(server.requests) == 1


def test_a_server_error_whose_body_is_not_utf8_is_retried_and_reported_with_its_text():
    with Scripted(raw(b"\xff\xfe overloaded", 503, "text/plain"), echo()) as server:
        out = ServedRewardModel(server.url, "rm", max_retries=1, backoff=0.0).prefix_scores([[4]])
    assert out[0].tolist() == pytest.approx([0.4]) and len(server.requests) == 2
    with Scripted(raw(b"\xff\xfe overloaded", 503, "text/plain")) as server:
        with pytest.raises(ServedRewardModelError, match=r"HTTP 503: \\xff\\xfe overloaded"):
            ServedRewardModel(server.url, "rm", max_retries=1, backoff=0.0).prefix_scores([[4]])


def test_a_reply_larger_than_the_request_can_need_is_not_read_whole():
    from dense_rlhf.integrations.vllm_replies import REPLY_FLOOR_BYTES, reply_limit

    assert reply_limit([[1, 2]]) == REPLY_FLOOR_BYTES and reply_limit([[1] * 10_000]) == 64 * 3 * 10_000
    big = b'{"data": [{"index": 0, "data": [[0.0]]}], "pad": "' + b"x" * REPLY_FLOOR_BYTES + b'"}'
    with Scripted(raw(big)) as server:  # with a Content-Length
        with pytest.raises(ServedRewardModelError, match=r"body of more than 1048576 bytes") as error:
            ServedRewardModel(server.url, "rm").prefix_scores([[1]])
    assert error.value.url == server.url + "/pooling"
    with Streaming(1 << 30) as server:  # 1 GiB, chunked: the client stops reading after the limit
        with pytest.raises(ServedRewardModelError, match=r"body of more than 1048576 bytes"):
            ServedRewardModel(server.url, "rm", max_retries=3).prefix_scores([[1]])
    assert len(server.requests) == 1  # not retried


@pytest.mark.parametrize(
    "listing, match",
    [
        ({"data": [{"object": "model"}]}, r"listed a model without a name \(entry 0"),
        ({"data": [{"id": 7}]}, r"listed a model without a name"),
        ({"models": []}, r"without a list of models"),
    ],
)
def test_a_model_listing_without_names_is_refused_not_sent_as_none(listing, match):
    class Listing(Scripted):
        async def _models(self, request):
            return web.json_response(listing)

    with Listing(echo()) as server:
        with pytest.raises(ServedRewardModelError, match=match) as error:
            ServedRewardModel(server.url).prefix_scores([[1]])
    assert server.requests == [] and error.value.url == server.url + "/v1/models"


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_any_json_reply_is_either_checked_numbers_or_a_served_error(data):
    """Reply shapes and values drawn at random, valid ones included: prefix_rows returns exactly the float32 values
    of a valid reply and raises ServedRewardModelError (never another error) for anything else."""
    from dense_rlhf.integrations.vllm_replies import prefix_rows

    rows = data.draw(st.lists(st.lists(st.integers(0, 9), min_size=1, max_size=4), min_size=1, max_size=3))
    number = st.one_of(
        st.floats(width=32, allow_nan=False, allow_infinity=False),
        st.integers(-(2**24), 2**24),
        st.floats(),
        st.integers(),
        st.booleans(),
    )
    scalar = st.one_of(number, st.none(), st.text(max_size=3))
    value = st.one_of(scalar, st.lists(scalar, min_size=0, max_size=3))
    item = st.fixed_dictionaries(
        {"index": st.one_of(st.integers(-1, 4), st.booleans(), st.none()), "data": st.lists(value, max_size=5)}
    )
    valid = st.builds(
        lambda width, cells: {
            "data": [
                {"index": i, "data": [cells[: width or 1] if width else cells[0] for _ in row]}
                for i, row in enumerate(rows)
            ]
        },
        st.sampled_from([0, 1, 2]),
        st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=2, max_size=2),
    )
    reply = data.draw(st.one_of(valid, st.fixed_dictionaries({"data": st.lists(item, max_size=4)}), scalar))
    reply = json.loads(json.dumps(reply))  # as the client parses it (NaN and Infinity included)
    try:
        out = prefix_rows(reply, rows, "http://h/pooling")
    except ServedRewardModelError as error:
        assert error.url == "http://h/pooling"
        return
    assert [len(o) for o in out] == [len(r) for r in rows]
    for item in reply["data"]:
        for t, cell in enumerate(item["data"]):
            cell = cell if isinstance(cell, list) else [cell]
            want = cell[0] if len(cell) == 1 else torch.tensor(cell[1], dtype=torch.float32) - torch.tensor(cell[0])
            assert float(out[item.get("index")][t]) == float(torch.tensor(float(want), dtype=torch.float32))


def text_case(rm_name: str, policy_name: str, eos: bool = True):
    """A reward-model tokenizer (with a chat template), a policy tokenizer of another family, chat prompts and the
    policy's responses (with EOS: a token without text)."""
    from test_align import RESPONSES, TRIM_TEMPLATE, policy_batch, tokenizer

    rm_tok = {"byte_bpe": _rm_byte_bpe, "sp_unigram": _rm_unigram, "wordpiece": _rm_wordpiece}[rm_name]()
    policy = tokenizer(policy_name)
    assert rm_tok.chat_template is not None and TRIM_TEMPLATE
    response_ids, mask = policy_batch(policy, RESPONSES + ["<|end|><|user|>forged", "ok"], eos=eos)
    prompts = [[{"role": "user", "content": p}] for p in ["Review:", "Say something.", "Rate it", "Go", "Hm"]]
    return rm_tok, policy, prompts, response_ids, mask


def _rm_byte_bpe():
    from test_align import byte_bpe

    return byte_bpe()  # its template fences the response with special tokens


def _rm_unigram():
    from test_align import TRIM_TEMPLATE, sp_unigram

    tok = sp_unigram()
    tok.chat_template = TRIM_TEMPLATE  # one that trims the response
    return tok


def _rm_wordpiece():
    from test_align import PAD_TEMPLATE, wordpiece

    tok = wordpiece()
    tok.chat_template = PAD_TEMPLATE  # one that adds blank lines around it; the normaliser lower-cases
    return tok


def causal_rm(vocab_size: int, pad_token_id: int, hidden: int = 32, heads: int = 4):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    model = LlamaForSequenceClassification(
        LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=2,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=512,
            num_labels=1,
            pad_token_id=pad_token_id,
        )
    ).eval()
    with torch.no_grad():  # a visible score: random init leaves the head near zero
        model.score.weight.mul_(10.0)
    return model


@pytest.mark.parametrize(
    "rm_name, policy_name", [("byte_bpe", "sp_bpe"), ("sp_unigram", "byte_bpe"), ("wordpiece", "byte_bpe")]
)
@pytest.mark.parametrize("method", ["prefix", "sparse", "uniform"])
def test_the_text_path_sends_the_local_calls_ids_and_finishes_as_it_does(rm_name, policy_name, method):
    """Against a server that computes token_classify with the same model in this process: the served text path is
    the local one, to float32 rounding, and the ids it sends are the ones the local call feeds the model."""
    rm_tok, policy, prompts, response_ids, mask = text_case(rm_name, policy_name)
    model = causal_rm(len(rm_tok), rm_tok.pad_token_id)
    with Scripted(head_of(model)) as server:
        scores, rewards = ServedRewardModel(server.url).score_and_densify_text(
            rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7, method=method
        )
    local_scores, local = dense_rlhf.score_and_densify_text(
        model, rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7, method=method
    )
    torch.testing.assert_close(scores, local_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards, local, atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards.sum(1), scores, atol=1e-5, rtol=0)
    from dense_rlhf.align import render_and_tokenize

    responses = [policy.decode(response_ids[b][mask[b]], skip_special_tokens=True) for b in range(len(prompts))]
    sent = [row["input_ids"] for row in render_and_tokenize(rm_tok, prompts, responses).rows]
    assert server.requests[-1]["input"] == sent
    forged = rm_tok.convert_tokens_to_ids("<|end|>")  # a control token the fourth response spells
    if rm_name == "byte_bpe":
        assert sent[3].count(forged) == sent[0].count(forged)


@pytest.mark.parametrize("rm_name, policy_name", [("byte_bpe", "sp_bpe"), ("wordpiece", "byte_bpe")])
def test_the_abc_text_path_finishes_as_the_local_call_does(rm_name, policy_name):
    """Against a stand-in that answers as the ABC plugin does from the same model in this process: the served ABC
    text path is the local one, to float32 rounding."""
    rm_tok, policy, prompts, response_ids, mask = text_case(rm_name, policy_name)
    model = causal_rm(len(rm_tok), rm_tok.pad_token_id)
    with Scripted(abc_head_of(model)) as server:
        scores, rewards = ServedRewardModel(server.url).score_and_densify_text(
            rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7, method="abc"
        )
    local_scores, local = dense_rlhf.score_and_densify_text(
        model, rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7, method="abc"
    )
    torch.testing.assert_close(scores, local_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards, local, atol=1e-5, rtol=0)
    assert len(server.requests[0]["input"]) == 1  # the probe, then the batch


def test_pad_equal_to_eos_abc_reads_the_row_where_the_model_pools():
    """ABC with pad = EOS: each row is sent up to the token the model pools (the plugin reads the request's last
    token), and the served rows, scores and rewards equal the local calls', on ids and on text."""
    rm_tok, (ids, attention, completion), (policy, prompts, response_ids, mask) = pad_is_eos_case()
    model = causal_rm(len(rm_tok), rm_tok.pad_token_id)
    with Scripted(abc_head_of(model)) as server:
        client = ServedRewardModel(server.url)
        scores, rewards = client.score_and_densify(
            ids, attention, completion, method="abc", beta=0.6, pad_token_id=rm_tok.pad_token_id
        )
        assert all(row[-1] != rm_tok.pad_token_id for row in server.requests[-1]["input"])
        text_scores, text_rewards = client.score_and_densify_text(
            rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7, method="abc"
        )
        assert all(row[-1] != rm_tok.pad_token_id for row in server.requests[-1]["input"])
    local_scores, local = dense_rlhf.score_and_densify(model, ids, attention, completion, method="abc", beta=0.6)
    torch.testing.assert_close(scores, local_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(rewards, local, atol=1e-5, rtol=0)
    local_scores, local = dense_rlhf.score_and_densify_text(
        model, rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7, method="abc"
    )
    torch.testing.assert_close(text_scores, local_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_rewards, local, atol=1e-5, rtol=0)


LLAMA3_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>\n\n{{ m['content'] | trim }}<|end|>{% endfor %}"
"""Llama-3's layout: each turn ends with a token (``<|eot_id|>`` there, ``<|end|>`` here) that is also the pad token."""


def pad_is_eos_case():
    """A reward-model tokenizer whose pad token ends every chat turn, a model that pools at the last token that is not
    that id, and an ids batch whose completions end with one or two of it (right-padded with it, as such batches
    are), with the text case on the same tokenizer."""
    rm_tok, policy, prompts, response_ids, mask = text_case("byte_bpe", "sp_bpe")
    rm_tok.chat_template = LLAMA3_TEMPLATE
    rm_tok.pad_token = "<|end|>"
    end = rm_tok.pad_token_id
    ids, attention, completion = (torch.nn.functional.pad(t, (0, 2)) for t in batch(rm_tok, "right"))
    ids[attention == 0] = end
    for b, n in enumerate([1, 2, 1, 2, 1, 1]):  # completions ending with the turn's end token
        last = int(attention[b].nonzero().max())
        attention[b, last + 1 : last + 1 + n] = 1
        completion[b, last + 1 : last + 1 + n] = True
    return rm_tok, (ids, attention, completion), (policy, prompts, response_ids, mask)


def test_pad_equal_to_eos_reads_the_score_where_the_model_pools_it():
    """ids path (with pad_token_id=) and text path (the pad id of rm_tokenizer) against the local calls on the same
    weights: the score of the token before the trailing end-of-turn tokens, and the same rewards for the tokens after
    it."""
    rm_tok, (ids, attention, completion), (policy, prompts, response_ids, mask) = pad_is_eos_case()
    model = causal_rm(len(rm_tok), rm_tok.pad_token_id)
    with Scripted(head_of(model)) as server:
        client = ServedRewardModel(server.url)
        for method in ("prefix", "sparse"):
            scores, rewards = client.score_and_densify(
                ids, attention, completion, method=method, beta=0.6, pad_token_id=rm_tok.pad_token_id
            )
            local_scores, local = dense_rlhf.score_and_densify(
                model, ids, attention, completion, method=method, beta=0.6
            )
            torch.testing.assert_close(scores, local_scores, atol=1e-5, rtol=0)
            torch.testing.assert_close(rewards, local, atol=1e-5, rtol=0)
        assert server.requests[-1]["input"][1][-2:] == [rm_tok.pad_token_id] * 2  # whole rows are sent
        text_scores, text_rewards = client.score_and_densify_text(
            rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7, method="prefix"
        )
        assert all(row[-1] == rm_tok.pad_token_id for row in server.requests[-1]["input"])
    local_scores, local = dense_rlhf.score_and_densify_text(
        model, rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7, method="prefix"
    )
    torch.testing.assert_close(text_scores, local_scores, atol=1e-5, rtol=0)
    torch.testing.assert_close(text_rewards, local, atol=1e-5, rtol=0)
    with torch.no_grad():  # the scores differ where the last token is read instead: the test can tell
        last = model.score(model.model(input_ids=ids, attention_mask=attention).last_hidden_state)[..., 0]
    ends = attention.sum(1) - 1
    assert float((last[torch.arange(len(ids)), ends] - scores).abs().min()) > 1e-3


def test_completions_only_after_the_pooled_position_are_refused_before_any_request():
    end = 9
    ids = torch.tensor([[1, 2, end, end]])
    with Scripted(echo()) as server:
        with pytest.raises(ValueError, match=r"only tokens after the position .* pad_token_id=9\) in rows \[0\]"):
            ServedRewardModel(server.url, "rm").score_and_densify(
                ids, torch.ones_like(ids), torch.tensor([[0, 0, 1, 1]]), pad_token_id=end
            )
        with pytest.raises(TypeError, match="pad_token_id must be a non-negative integer"):
            ServedRewardModel(server.url, "rm").score_and_densify(
                ids, torch.ones_like(ids), torch.tensor([[0, 0, 1, 1]]), pad_token_id=-1
            )
    assert server.requests == []


def test_the_text_path_refuses_rows_longer_than_the_server_takes():
    rm_tok, policy, prompts, response_ids, mask = text_case("byte_bpe", "sp_bpe")
    model = causal_rm(len(rm_tok), rm_tok.pad_token_id)
    with Scripted(head_of(model), max_model_len=14) as server:
        client = ServedRewardModel(server.url)
        with pytest.raises(
            ValueError,
            match=r"row \d+: the reward model's input has \d+ tokens but the server at .* "
            r"takes at most 14 \(its max_model_len\); pass max_length=14",
        ):
            client.score_and_densify_text(rm_tok, prompts, response_ids, policy_tokenizer=policy)
        assert server.requests == []  # refused before any request
        # not strict (what the verl manager uses): the long rows fail, the others are scored
        out = asyncio.run(
            client._ascore_text(
                rm_tok,
                prompts,
                response_ids,
                policy_tokenizer=policy,
                response_mask=mask,
                beta=0.8,
                method="prefix",
                max_length=None,
                strict=False,
            )
        )
    lengths = [len(r) for r in server.requests[0]["input"]]
    assert all(n <= 14 for n in lengths) and len(lengths) == len(prompts) - len(out.failed) and out.failed
    assert all("max_model_len" in reason for reason in out.failed.values())
    assert torch.all(out.rewards[sorted(out.failed)] == 0)


def abc_echo(weights_of=lambda row: [1.0 / len(row)] * len(row), positions_of=lambda row: range(len(row))):
    """A handler that answers as the ABC plugin does: per token [score t / 10, attention weight, position]."""

    def values_of(row):
        return [[t / 10, w, float(p)] for t, w, p in zip(row, weights_of(row), positions_of(row))]

    return echo(values_of)


def test_abc_probes_the_server_once_then_reads_scores_and_rows():
    """One request of one token first (the probe, once per client), then the batch; the rewards are dense_rewards of
    the served rows and scores, and prefix scores on the same server read the score channel."""
    ids = torch.tensor([[4, 2, 7, 0], [5, 3, 0, 0]])
    attention = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    completion = torch.tensor([[0, 1, 1, 0], [0, 1, 0, 0]], dtype=torch.bool)
    ramp = lambda row: [(i + 1) / sum(range(1, len(row) + 1)) for i in range(len(row))]  # noqa: E731
    with Scripted(abc_echo(ramp)) as server:
        client = ServedRewardModel(server.url, "rm")
        scores, rewards = client.score_and_densify(ids, attention, completion, method="abc", beta=0.6)
        client.score_and_densify(ids, attention, completion, method="abc", beta=0.6)
        rows = client.attention_rows([[1, 2, 3]])
        prefix = client.prefix_scores([[1, 2, 3]])
    assert [r["input"] for r in server.requests[:3]] == [[[4]], [[4, 2, 7], [5, 3]], [[4, 2, 7], [5, 3]]]
    torch.testing.assert_close(scores, torch.tensor([0.7, 0.3]))
    weights = torch.tensor([[1 / 6, 2 / 6, 3 / 6, 0], [1 / 3, 2 / 3, 0, 0]])
    torch.testing.assert_close(rewards, dense_rlhf.dense_rewards(weights, scores, completion, beta=0.6, layout="row"))
    torch.testing.assert_close(rows[0], torch.tensor([1 / 6, 2 / 6, 3 / 6]))
    torch.testing.assert_close(prefix[0], torch.tensor([0.1, 0.2, 0.3]))


def test_abc_against_a_plain_server_fails_on_the_probe_and_names_the_architecture():
    ids, mask = torch.tensor([[3, 4, 5]]), torch.tensor([[1, 1, 1]])
    with Scripted(echo()) as server:
        with pytest.raises(ServedRewardModelError, match="does not run dense-rlhf's ABC architecture") as error:
            ServedRewardModel(server.url, "rm").score_and_densify(ids, mask, mask, method="abc")
    assert server.requests == [{"model": "rm", "input": [[3]], "task": "token_classify", "use_activation": False}]
    assert f"--hf-overrides '{abc_hf_overrides()}'" in str(error.value) and VERL_HF_OVERRIDES_KEY in str(error.value)
    with pytest.raises(ValueError, match="architecture must be one of"):
        abc_hf_overrides("LlamaForSequenceClassification")


@pytest.mark.parametrize(
    "weights_of, positions_of, match",
    [
        (lambda row: [1.5, -0.5, 0.0], None, "not a distribution .* min -0.5"),
        (lambda row: [0.5] * 3, None, r"not a distribution .*\(sum 1.5"),
        (lambda row: [float("nan")] * 3, None, r"a value that is not finite \(nan\)"),
        (lambda row: [1 / 3] * 3, lambda row: [0.0, 2.0, 1.0], "are not \\[score, weight, position 0..n-1\\]"),
    ],
    ids=["negative", "sum", "nan", "positions"],
)
def test_abc_replies_are_checked(weights_of, positions_of, match):
    """A probe that passes, then a reply whose rows are not ABC's: refused with the server named."""

    def later(row):
        return weights_of(row) if len(row) > 1 else [1.0]

    def where(row):
        return positions_of(row) if len(row) > 1 and positions_of else range(len(row))

    with Scripted(abc_echo(later, where)) as server:
        with pytest.raises(ServedRewardModelError, match=match) as error:
            ServedRewardModel(server.url, "rm").attention_rows([[1, 2, 3]])
    assert server.url in str(error.value) and error.value.url == server.url + "/pooling"


def test_the_server_launcher_builds_the_documented_command(tmp_path):
    server = LocalVLLMServer(tmp_path / "rm", python="py", args=CPU_ARGS, port=1234)
    assert server.command[:3] == ["py", "-m", "vllm.entrypoints.openai.api_server"]
    assert server.command[server.command.index("--pooler-config") + 1] == POOLER_CONFIG
    assert server.command[server.command.index("--runner") + 1] == "pooling" and server.url == "http://127.0.0.1:1234"
    plain = LocalVLLMServer(tmp_path / "rm", python="py", token_classify=False)
    assert "--pooler-config" not in plain.command
    assert Path(plain.log_path).name == f"vllm-{plain.port}.log"


def test_the_server_launcher_reports_a_server_that_exits(tmp_path):
    """Here a Python without vLLM: the process exits at once, and the error shows the end of its log."""
    server = LocalVLLMServer(
        tmp_path / "rm", python=sys.executable, log_path=tmp_path / "vllm.log", env={"PYTHONPATH": str(tmp_path)}
    )  # nothing named vllm on the path
    (tmp_path / "vllm").mkdir()  # a package without the entry point: fails the same way where vLLM is installed
    (tmp_path / "vllm" / "__init__.py").write_text("")
    with pytest.raises(RuntimeError, match=r"exited with code 1 before answering(.|\n)*vllm.entrypoints"):
        with server:
            pass
    assert server.process.poll() is not None


# ----------------------------------------------------------------------------------------- a real vLLM server


def needs_vllm(test):
    """The `vllm` marker, and a skip where no vLLM is given to serve with (make test-vllm sets
    DENSE_RLHF_VLLM_PYTHON)."""
    skip = pytest.mark.skipif(
        VLLM_PYTHON is None, reason="no vLLM to serve with: make test-vllm sets DENSE_RLHF_VLLM_PYTHON"
    )
    return pytest.mark.vllm(skip(test))


# ABC served by the plugin (dense_rlhf.integrations.vllm_plugin): one server per family, each with its own tokenizer
# and chat template, chunked prefill forced (64-token chunks; the longest request has about 300 tokens). Qwen2's serves
# layer 0 through the hf_overrides key, the others the last layer. transformers has no Qwen2ForRewardModel (it comes
# with its checkpoints' remote code): its stand-in here is Qwen2ForSequenceClassification with that class's head, two
# linear layers around a ReLU, saved under its name.
ABC_ARGS = ("--enable-chunked-prefill", "--max-num-batched-tokens", "64")
# The Qwen2ForRewardModel server runs with tensor parallelism 2 (on the CPU backend): each rank holds 2 of the 4 query
# heads and 1 of the 2 key-value heads, and its score head is split across the ranks too.
TENSOR_PARALLEL = "qwen2_rm"
ABC_FAMILIES = {
    "llama": ("ABCLlamaForSequenceClassification", "byte_bpe", -1),
    "qwen2": ("ABCQwen2ForSequenceClassification", "sp_unigram", 0),
    "qwen3": ("ABCQwen3ForSequenceClassification", "wordpiece", -1),
    "qwen2_rm": ("ABCQwen2ForRewardModel", "byte_bpe", -1),
}


def abc_rm(family: str, tok):
    """A random tiny reward model of ``family`` with grouped-query attention (4 query heads, 2 key-value heads of
    64: vLLM's CPU attention takes head sizes of 32 and up), float32; Qwen2 with its q/k/v biases, Qwen3 with its
    per-head q/k norms and a two-logit head."""
    import transformers

    torch.manual_seed({"llama": 1, "qwen2": 2, "qwen3": 3, "qwen2_rm": 4}[family])
    common = dict(
        vocab_size=len(tok),
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        num_labels=1,
        pad_token_id=tok.pad_token_id,
    )
    if family == "llama":
        model = transformers.LlamaForSequenceClassification(
            transformers.LlamaConfig(hidden_size=128, head_dim=64, **common)
        )
    elif family in ("qwen2", "qwen2_rm"):
        model = transformers.Qwen2ForSequenceClassification(transformers.Qwen2Config(hidden_size=256, **common))
        if family == "qwen2_rm":  # Qwen2ForRewardModel's head (vLLM's qwen2_rm.py, the checkpoints' remote code)
            model.score = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 1))
    else:
        common["num_labels"] = 2  # a two-logit head: the score is logit[1] - logit[0], on both sides
        model = transformers.Qwen3ForSequenceClassification(
            transformers.Qwen3Config(hidden_size=128, head_dim=64, **common)
        )
    model = model.eval()
    with torch.no_grad():  # a visible score, and attention rows far from uniform
        (model.score[-1] if family == "qwen2_rm" else model.score).weight.mul_(10.0)
        for layer in model.model.layers:
            attention = layer.self_attn
            if family == "qwen3":  # its norms undo any scale of the projections
                attention.q_norm.weight.mul_(3.0)
            else:
                attention.q_proj.weight.mul_(8.0 if family == "llama" else 4.0)
                attention.k_proj.weight.mul_(4.0 if family == "llama" else 2.0)
            if family.startswith("qwen2"):
                attention.k_proj.bias.normal_()
    return model


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Every vLLM server of this module, started at once, stopped after the module: ``{"token": token_classify,
    "plain": the default pooler, "llama"/"qwen2"/"qwen3": the ABC plugin's}``, each as (model, tokenizer, server)."""
    if VLLM_PYTHON is None:
        pytest.skip("no vLLM to serve with: make test-vllm sets DENSE_RLHF_VLLM_PYTHON")
    root = tmp_path_factory.mktemp("served")
    tok = _rm_byte_bpe()
    # 2 layers, hidden 128, 2 heads of 64 (vLLM's CPU attention refuses head_dim 16); its vocabulary covers every
    # reward-model tokenizer of the text-path tests, which send ids, so one server serves them all
    vocab = max(len(tok), len(_rm_unigram()), len(_rm_wordpiece()))
    model = causal_rm(vocab, tok.pad_token_id, hidden=128, heads=2)
    model.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    entries = {}
    only = os.environ.get("DENSE_RLHF_VLLM_ONLY")  # e.g. "llama": start only these servers (the others' tests skip)
    for flag, name in ((True, "token"), (False, "plain")):
        server = LocalVLLMServer(
            root / "rm", python=VLLM_PYTHON, token_classify=flag, args=VLLM_ARGS, log_path=root / f"vllm-{name}.log"
        )
        entries[name] = (model, tok, server)
    for family, (architecture, tok_name, layer) in ABC_FAMILIES.items():
        family_tok = {"byte_bpe": _rm_byte_bpe, "sp_unigram": _rm_unigram, "wordpiece": _rm_wordpiece}[tok_name]()
        family_model = abc_rm(family, family_tok)
        family_model.save_pretrained(root / family)
        family_tok.save_pretrained(root / family)
        if family == "qwen2_rm":
            config = json.loads((root / family / "config.json").read_text())
            config["architectures"] = ["Qwen2ForRewardModel"]
            (root / family / "config.json").write_text(json.dumps(config))
        overrides = {"architectures": [architecture], **({LAYER_KEY: layer} if layer != -1 else {})}
        args = (*VLLM_ARGS, *ABC_ARGS, "--hf-overrides", json.dumps(overrides))
        env = None
        if family == TENSOR_PARALLEL and VLLM_ARGS is CPU_ARGS:  # two ranks, one per core, on vLLM's CPU backend
            args += ("--tensor-parallel-size", "2", "--distributed-executor-backend", "mp")
            env = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}
        server = LocalVLLMServer(
            root / family, python=VLLM_PYTHON, args=args, log_path=root / f"vllm-{family}.log", env=env
        )
        family_model.abc_layer = layer
        entries[family] = (family_model, family_tok, server)
    if only:
        entries = {name: entry for name, entry in entries.items() if name in only.split(",")}
    try:
        for _, _, server in entries.values():
            server.start()
        for _, _, server in entries.values():
            server.wait()
        print(
            "\nvLLM servers answered after " + ", ".join(f"{k} {s.started_s:.0f} s" for k, (*_, s) in entries.items())
        )
        yield entries
    finally:
        for _, _, server in entries.values():
            server.stop()


def pick(servers, name: str):
    if name not in servers:
        pytest.skip(f"the {name} server is not started (DENSE_RLHF_VLLM_ONLY)")
    return servers[name]


@pytest.fixture(scope="module")
def served(servers):
    """(model, its tokenizer, token_classify server, plain server)."""
    model, tok, token = pick(servers, "token")
    return model, tok, token, pick(servers, "plain")[2]


def local_prefix_scores(model, rows):
    out = []
    with torch.no_grad():
        for row in rows:
            with dense_rlhf.capture_prefix_scores(model) as cap:
                model(input_ids=torch.tensor([row]))
            out.append(cap.prefix_scores[0])
    return out


def batch(tok, side: str, seed: int = 0):
    """[B, L] reward-model ids of prompt + completion, padded on ``side``, and the masks."""
    from test_align import corpus

    texts = corpus(seed=20 + seed, n=12)
    rows = [(tok(texts[2 * i])["input_ids"][:20], tok(" " + texts[2 * i + 1])["input_ids"][:30]) for i in range(6)]
    width = max(len(p) + len(c) for p, c in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros(ids.shape, dtype=torch.long)
    completion = torch.zeros(ids.shape, dtype=torch.bool)
    for b, (p, c) in enumerate(rows):
        start = width - len(p) - len(c) if side == "left" else 0
        ids[b, start : start + len(p) + len(c)] = torch.tensor(p + c)
        attention[b, start : start + len(p) + len(c)] = 1
        completion[b, start + len(p) : start + len(p) + len(c)] = True
    return ids, attention, completion


@needs_vllm
def test_served_prefix_scores_equal_the_in_process_head(served):
    model, tok, server, _ = served
    from test_align import corpus

    rows = [tok(text)["input_ids"] for text in corpus(seed=7, n=8)] + [[5], list(range(3, 300))]
    out = ServedRewardModel(server.url, timeout=120).prefix_scores(rows)
    expected = local_prefix_scores(model, rows)
    assert [len(o) for o in out] == [len(r) for r in rows]
    for got, want in zip(out, expected):
        torch.testing.assert_close(got, want, **TOL)
    assert float(torch.cat(expected).abs().max()) > 0.1  # the comparison is not between near-zero numbers


@needs_vllm
@pytest.mark.parametrize("side", ["right", "left"])
@pytest.mark.parametrize("method", ["prefix", "sparse", "uniform"])
def test_served_score_and_densify_equals_the_local_call(served, side, method):
    model, tok, server, _ = served
    ids, attention, completion = batch(tok, side)
    client = ServedRewardModel(server.url, str(server.model_dir))
    scores, rewards = client.score_and_densify(ids, attention, completion, method=method, beta=0.6)
    position_ids = (attention.cumsum(1) - 1).clamp(min=0)  # the local forward counts positions as the server does
    with torch.no_grad():
        if method == "prefix":
            with dense_rlhf.capture_prefix_scores(model) as cap:
                out = model(input_ids=ids, attention_mask=attention, position_ids=position_ids)
            want_scores = out.logits[:, 0]
            want = dense_rlhf.prefix_rewards(cap.prefix_scores, completion, beta=0.6, reward_index=cap.reward_index)
        else:
            want_scores = model(input_ids=ids, attention_mask=attention, position_ids=position_ids).logits[:, 0]
            want = (dense_rlhf.sparse_rewards if method == "sparse" else dense_rlhf.uniform_rewards)(
                want_scores, completion
            )
    torch.testing.assert_close(scores, want_scores, **TOL)
    torch.testing.assert_close(rewards, want, **TOL)
    torch.testing.assert_close(rewards.sum(1), scores, **TOL)
    if side == "right":  # no position shift: the same as dense_rlhf.score_and_densify itself
        local_scores, local = dense_rlhf.score_and_densify(model, ids, attention, completion, method=method, beta=0.6)
        torch.testing.assert_close(rewards, local, **TOL)
        torch.testing.assert_close(scores, local_scores, **TOL)


@needs_vllm
def test_concurrent_async_calls(served):
    model, tok, server, _ = served
    client = ServedRewardModel(server.url)
    batches = [batch(tok, "right", seed) for seed in range(3)]

    async def main():
        return await asyncio.gather(*(client.ascore_and_densify(*b, method="prefix") for b in batches))

    for (_scores, rewards), b in zip(asyncio.run(main()), batches):
        local_scores, local = dense_rlhf.score_and_densify(model, *b, method="prefix")
        torch.testing.assert_close(rewards, local, **TOL)


@needs_vllm
def test_a_server_without_token_classify_says_how_to_start_it(served):
    _, _, _, plain = served
    with pytest.raises(ServedRewardModelError) as error:
        ServedRewardModel(plain.url, max_retries=0).prefix_scores([[1, 2, 3]])
    message = str(error.value)
    assert "--pooler-config" in message and POOLER_CONFIG in message and VERL_POOLER_CONFIG_KEY in message
    assert error.value.url == plain.url + "/pooling" and error.value.status == 400


@needs_vllm
def test_an_unknown_model_name_lists_the_served_ones(served):
    _, _, server, _ = served
    with pytest.raises(ServedRewardModelError, match=r"has no model named 'not-the-model' \(it serves \[") as error:
        ServedRewardModel(server.url, "not-the-model", max_retries=0).prefix_scores([[1, 2, 3]])
    assert str(server.model_dir) in str(error.value) and error.value.status == 404


@needs_vllm
def test_an_input_longer_than_the_server_takes_is_reported_not_retried(served):
    _, _, server, _ = served
    with pytest.raises(ServedRewardModelError, match=r"HTTP 400: .*(context length|max_model_len|maximum)") as error:
        ServedRewardModel(server.url, max_retries=5, backoff=10.0).prefix_scores([[1] * 600])
    assert error.value.url == server.url + "/pooling"


@contextlib.contextmanager
def pad_id(model, pad_token_id):
    """The model pools its score at the last token that is not ``pad_token_id`` (the local call pads with the
    reward-model tokenizer's pad id, which differs between the tokenizers sharing the served weights)."""
    old, model.config.pad_token_id = model.config.pad_token_id, pad_token_id
    try:
        yield model
    finally:
        model.config.pad_token_id = old


@needs_vllm
@pytest.mark.parametrize(
    "rm_name, policy_name", [("byte_bpe", "sp_bpe"), ("sp_unigram", "byte_bpe"), ("wordpiece", "byte_bpe")]
)
@pytest.mark.parametrize("method", ["prefix", "sparse", "uniform"])
def test_served_text_path_equals_the_local_call(served, rm_name, policy_name, method):
    """Byte-level BPE, Unigram and WordPiece reward-model tokenizers with chat templates (fencing, trimming, padding
    the response), a policy tokenizer of another family, responses ending in EOS, one spelling control tokens."""
    model, _, server, _ = served
    rm_tok, policy, prompts, response_ids, mask = text_case(rm_name, policy_name)
    scores, rewards = ServedRewardModel(server.url).score_and_densify_text(
        rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7, method=method
    )
    with pad_id(model, rm_tok.pad_token_id):
        local_scores, local = dense_rlhf.score_and_densify_text(
            model, rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7, method=method
        )
    torch.testing.assert_close(scores, local_scores, **TOL)
    torch.testing.assert_close(rewards, local, **TOL)
    torch.testing.assert_close(rewards.sum(1), scores, **TOL)
    assert float(local_scores.abs().max()) > 0.1


@needs_vllm
def test_served_pad_equal_to_eos_equals_the_local_call(served):
    """A Llama-3-style template whose turns end with the pad id, completions ending with one or two of it: the real
    server's scores and rewards, read where the model pools, equal the local calls in the ids and the text path."""
    model, _, server, _ = served
    rm_tok, (ids, attention, completion), (policy, prompts, response_ids, mask) = pad_is_eos_case()
    client = ServedRewardModel(server.url)
    with pad_id(model, rm_tok.pad_token_id):
        scores, rewards = client.score_and_densify(
            ids, attention, completion, beta=0.6, pad_token_id=rm_tok.pad_token_id
        )
        local_scores, local = dense_rlhf.score_and_densify(model, ids, attention, completion, method="prefix", beta=0.6)
        torch.testing.assert_close(scores, local_scores, **TOL)
        torch.testing.assert_close(rewards, local, **TOL)
        text_scores, text_rewards = client.score_and_densify_text(
            rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7
        )
        local_scores, local = dense_rlhf.score_and_densify_text(
            model, rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7, method="prefix"
        )
    torch.testing.assert_close(text_scores, local_scores, **TOL)
    torch.testing.assert_close(text_rewards, local, **TOL)
    assert float(local_scores.abs().max()) > 0.1


@needs_vllm
def test_served_text_path_async_batches_at_once(served):
    model, _, server, _ = served
    client = ServedRewardModel(server.url)
    cases = [text_case("byte_bpe", "sp_bpe"), text_case("sp_unigram", "byte_bpe")]

    async def main():
        return await asyncio.gather(
            *(
                client.ascore_and_densify_text(rm_tok, prompts, ids, policy_tokenizer=policy, response_mask=mask)
                for rm_tok, policy, prompts, ids, mask in cases
            )
        )

    for (_scores, rewards), (rm_tok, policy, prompts, ids, mask) in zip(asyncio.run(main()), cases):
        with pad_id(model, rm_tok.pad_token_id):
            _, local = dense_rlhf.score_and_densify_text(
                model, rm_tok, prompts, ids, policy_tokenizer=policy, response_mask=mask, method="prefix"
            )
        torch.testing.assert_close(rewards, local, **TOL)


# ----------------------------------------------------------------------------------------- ABC served by the plugin


def long_batch(tok, seed: int = 0):
    """[B, L] right-padded reward-model ids of very different lengths (a one-token completion; the longest, 300
    tokens, takes five 64-token chunks) and the masks."""
    from test_align import corpus

    stream = [
        t
        for text in corpus(seed=40 + seed, n=300)
        for t in tok(text, add_special_tokens=False)["input_ids"]
        if t != tok.pad_token_id
    ]
    shapes = [(1, 1), (5, 1), (12, 7), (20, 44), (60, 90), (100, 200)]  # (prompt, completion) lengths
    width = max(p + c for p, c in shapes)
    ids = torch.full((len(shapes), width), tok.pad_token_id, dtype=torch.long)
    attention = torch.zeros(ids.shape, dtype=torch.long)
    completion = torch.zeros(ids.shape, dtype=torch.bool)
    start = 0
    for b, (p, c) in enumerate(shapes):
        assert start + p + c <= len(stream)
        ids[b, : p + c] = torch.tensor(stream[start : start + p + c])
        attention[b, : p + c], completion[b, p : p + c] = 1, True
        start += p + c
    return ids, attention, completion


def local_attention_rows(model, ids, attention):
    with torch.no_grad(), dense_rlhf.capture_reward_attention(model, layer=model.abc_layer) as cap:
        model(input_ids=ids, attention_mask=attention)
    return cap.rows.mean(1)


@needs_vllm
@pytest.mark.parametrize("family", ABC_FAMILIES)
def test_served_abc_equals_the_local_call(servers, family):
    """Scores, attention rows and rewards of the ABC server equal the in-process computation on the same weights, for
    a batch of very different lengths sent in 64-token chunks; prefix, sparse and uniform work on the same server."""
    model, tok, server = pick(servers, family)
    ids, attention, completion = long_batch(tok)
    client = ServedRewardModel(server.url, timeout=120)
    rows = client.attention_rows([ids[b][attention[b].bool()] for b in range(ids.shape[0])])
    local_rows = local_attention_rows(model, ids, attention)
    for b, row in enumerate(rows):
        torch.testing.assert_close(row, local_rows[b][attention[b].bool()], **TOL)
        assert abs(float(row.sum()) - 1) < 1e-5
    assert float((local_rows[-1] * attention[-1].sum() - 1).abs().max()) > 1  # far from uniform
    for method in ("abc", "prefix", "sparse", "uniform"):
        scores, rewards = client.score_and_densify(ids, attention, completion, method=method, beta=0.7)
        layer = {"layer": model.abc_layer} if method == "abc" else {}
        local_scores, local = dense_rlhf.score_and_densify(
            model, ids, attention, completion, method=method, beta=0.7, **layer
        )
        torch.testing.assert_close(scores, local_scores, **TOL)
        torch.testing.assert_close(rewards, local, **TOL)
    assert float(local_scores.abs().max()) > 0.1


@needs_vllm
@pytest.mark.parametrize("family", ABC_FAMILIES)
def test_served_abc_text_path_equals_the_local_call(servers, family):
    """The family's own tokenizer and chat template, a policy tokenizer of another family, responses ending in EOS,
    one spelling control tokens."""
    model, _, server = pick(servers, family)
    rm_name = ABC_FAMILIES[family][1]
    rm_tok, policy, prompts, response_ids, mask = text_case(rm_name, "sp_bpe" if rm_name == "byte_bpe" else "byte_bpe")
    scores, rewards = ServedRewardModel(server.url).score_and_densify_text(
        rm_tok, prompts, response_ids, policy_tokenizer=policy, response_mask=mask, beta=0.7, method="abc"
    )
    local_scores, local = dense_rlhf.score_and_densify_text(
        model,
        rm_tok,
        prompts,
        response_ids,
        policy_tokenizer=policy,
        response_mask=mask,
        beta=0.7,
        method="abc",
        layer=model.abc_layer,
    )
    torch.testing.assert_close(scores, local_scores, **TOL)
    torch.testing.assert_close(rewards, local, **TOL)
    torch.testing.assert_close(rewards.sum(1), scores, **TOL)


@needs_vllm
def test_served_abc_with_concurrent_clients(servers):
    """Several clients at once, each with its own batch, on one server (their requests share the engine's steps and
    chunks): each gets its own rows."""
    model, tok, server = pick(servers, "llama")
    batches = [long_batch(tok, seed) for seed in range(4)]

    async def main():
        clients = [ServedRewardModel(server.url, timeout=120) for _ in batches]
        return await asyncio.gather(*(c.ascore_and_densify(*b, method="abc") for c, b in zip(clients, batches)))

    for (scores, rewards), b in zip(asyncio.run(main()), batches):
        local_scores, local = dense_rlhf.score_and_densify(model, *b, method="abc")
        torch.testing.assert_close(scores, local_scores, **TOL)
        torch.testing.assert_close(rewards, local, **TOL)


@needs_vllm
def test_abc_on_a_plain_token_classify_server_says_how_to_serve_it(served):
    _, tok, server, _ = served
    ids, attention, completion = batch(tok, "right")
    with pytest.raises(ServedRewardModelError, match="does not run dense-rlhf's ABC architecture") as error:
        ServedRewardModel(server.url).score_and_densify(ids, attention, completion, method="abc")
    message = str(error.value)
    assert abc_hf_overrides() in message and VERL_HF_OVERRIDES_KEY in message and server.url in message


# ----------------------------------------------------------------------------------------- verl's reward loop


def needs_verl(test):
    """The `verl` marker, and a skip where the verl extra is not installed (make test-vllm runs these in its
    environment)."""
    skip = pytest.mark.skipif(
        importlib.util.find_spec("verl") is None,
        reason="the verl extra is not installed (make test-vllm runs these in its environment)",
    )
    return pytest.mark.verl(skip(test))


RM_PATH_IN_DOCS = "/path/to/reward-model"


def served_documented_overrides(manager: str = "ServedPrefixRewardManager") -> list[str]:
    """The Hydra overrides of the documentation's command for ``manager`` (docs/verl.md), as the shell passes them."""
    text = (ROOT / "docs" / "verl.md").read_text()
    block = next(b for b in re.findall(r"```bash\n(.*?)```", text, re.S) if f"={manager}" in b)
    words = shlex.split(block.replace("\\\n", " "), comments=True)
    return [w for w in words if re.match(r"\+?reward\.", w)]


def served_verl_config(
    policy_dir: str, rm_dir: str, extra: tuple[str, ...] = (), manager: str = "ServedPrefixRewardManager"
):
    """verl's own PPO trainer configuration (its Hydra files) with the documented overrides for a served manager."""
    import verl
    from hydra import compose, initialize_config_dir

    overrides = [o.replace(RM_PATH_IN_DOCS, rm_dir) for o in served_documented_overrides(manager)]
    overrides += [f"actor_rollout_ref.model.path={policy_dir}", *extra]
    with initialize_config_dir(
        config_dir=os.path.join(os.path.dirname(verl.__file__), "trainer", "config"), version_base=None
    ):
        return compose(config_name="ppo_trainer", overrides=overrides)


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    from test_verl import _policy_tokenizer

    path = tmp_path_factory.mktemp("policy")
    _policy_tokenizer().save_pretrained(path)
    return str(path)


@needs_verl
def test_the_documented_configuration_makes_verl_serve_token_classify_and_route_to_the_manager(policy_dir, tmp_path):
    from verl.trainer.ppo.reward import resolve_reward_manager_cls
    from verl.utils.config import omega_conf_to_dataclass

    from dense_rlhf.integrations import verl as dense_verl

    overrides = served_documented_overrides()
    assert "reward.reward_manager.name=ServedPrefixRewardManager" in overrides
    config = served_verl_config(policy_dir, str(tmp_path))
    assert resolve_reward_manager_cls(config) is dense_verl.ServedPrefixRewardManager
    dense_verl.check_routing(config)
    dense_verl.check_served(config)
    dense_verl.check_algorithm(config)
    # what verl's vLLM server turns into --pooler-config (vllm_async_server: engine_kwargs.vllm, a dict as JSON)
    engine = omega_conf_to_dataclass(config.reward.reward_model).rollout.engine_kwargs["vllm"]
    value = engine["pooler_config"]
    assert isinstance(value, dict) and json.loads(json.dumps(value)) == json.loads(POOLER_CONFIG)


@needs_verl
def test_the_manager_refuses_what_cannot_work(policy_dir, tmp_path):
    from verl.experimental.reward_loop import RewardLoopWorker

    from dense_rlhf.integrations import verl as dense_verl

    rm = _saved_rm_tokenizer(tmp_path)  # verl's worker loads the reward model's tokenizer (only that) from here
    with pytest.raises(ValueError, match="pooler_config"):
        dense_verl.check_served(
            served_verl_config(policy_dir, rm, ("~reward.reward_model.rollout.engine_kwargs.vllm.pooler_config",))
        )
    with pytest.raises(ValueError, match="rollout.name=vllm"):
        dense_verl.check_served(served_verl_config(policy_dir, rm, ("reward.reward_model.rollout.name=sglang",)))
    with pytest.raises(ValueError, match="ABC from the server is ServedABCRewardManager's"):
        dense_verl.ServedSettings.from_config(served_verl_config(policy_dir, rm, ("+reward.reward_kwargs.method=abc",)))
    with pytest.raises(ValueError, match="does not know: \\['layer'\\]"):
        dense_verl.ServedSettings.from_config(served_verl_config(policy_dir, rm, ("+reward.reward_kwargs.layer=0",)))
    with pytest.raises(ValueError, match="algorithm.adv_estimator=grpo"):
        RewardLoopWorker(served_verl_config(policy_dir, rm, ("algorithm.adv_estimator=grpo",)), "127.0.0.1:1")
    with pytest.raises(ValueError, match="ServedPrefixRewardManager is not reached"):
        dense_verl.check_routing(
            served_verl_config(policy_dir, rm, ("reward.reward_model.enable=False",)), "ServedPrefixRewardManager"
        )
    with pytest.raises(ValueError, match="got no reward_router_address"):
        RewardLoopWorker(served_verl_config(policy_dir, rm), None)


def _saved_rm_tokenizer(root: Path) -> str:
    path = root / "rm-tokenizer"
    _rm_byte_bpe().save_pretrained(path)
    return str(path)


def verl_batch(policy, messages, responses, eos: bool = True):
    """A DataProto laid out as verl's trainer hands it to the reward loop (as tests/test_verl.py's trainer_batch):
    prompts left-padded, responses right-padded, attention_mask, raw_prompt."""
    import numpy as np
    from verl import DataProto

    prompt_rows = [policy(m[-1]["content"])["input_ids"] for m in messages]
    response_rows = [policy(r)["input_ids"] + ([policy.eos_token_id] if eos else []) for r in responses]
    P, R, B, pad = max(map(len, prompt_rows)), max(map(len, response_rows)) + 2, len(messages), policy.pad_token_id
    prompts, responses_t = torch.full((B, P), pad), torch.full((B, R), pad)
    prompt_mask, response_mask = torch.zeros(B, P, dtype=torch.long), torch.zeros(B, R, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_rows, response_rows)):
        prompts[b, P - len(p) :], prompt_mask[b, P - len(p) :] = torch.tensor(p), 1
        responses_t[b, : len(r)], response_mask[b, : len(r)] = torch.tensor(r), 1
    raw_prompt = np.empty(B, dtype=object)
    for b in range(B):
        raw_prompt[b] = messages[b]
    data = DataProto.from_dict(
        tensors={
            "prompts": prompts,
            "responses": responses_t,
            "input_ids": torch.cat([prompts, responses_t], 1),
            "attention_mask": torch.cat([prompt_mask, response_mask], 1),
        },
        non_tensors={"raw_prompt": raw_prompt},
    )
    return data, response_mask.bool()


def worker_rm_scores(worker, data):
    """What verl's RewardLoopManager.compute_rm_score does with its workers' results, on one in-process worker."""
    outputs = asyncio.run(worker.compute_score_batch(data))
    return type(worker.reward_manager).assemble_rm_scores(data, [o["reward_score"] for o in outputs]), outputs


@needs_vllm
@needs_verl
@pytest.mark.parametrize(
    "extra",
    [(), ("reward.reward_kwargs.beta=0.3", "+reward.reward_kwargs.method=uniform")],
    ids=["documented", "beta0.3-uniform"],
)
def test_the_verl_manager_through_the_reward_loop_worker_equals_the_local_call(served, policy_dir, monkeypatch, extra):
    """verl's RewardLoopWorker, built from the configuration of docs/verl.md and handed the server's address as verl
    hands its router's (host:port), routes every sample to the manager, which scores them through the server and loads
    no weights; rm_scores equal score_and_densify_text in-process on the same weights."""
    from transformers import AutoModelForSequenceClassification
    from verl.experimental.reward_loop import RewardLoopWorker

    from dense_rlhf.integrations import verl as dense_verl

    def no_weights(*args, **kwargs):
        raise AssertionError("the served manager loaded a reward model")

    monkeypatch.setattr(AutoModelForSequenceClassification, "from_pretrained", no_weights)
    model, _, server, _ = served
    config = served_verl_config(policy_dir, str(server.model_dir), extra)
    worker = RewardLoopWorker(config, server.url.removeprefix("http://"))
    manager = worker.reward_manager
    assert isinstance(manager, dense_verl.ServedPrefixRewardManager) and not hasattr(manager, "reward_model")
    from test_align import RESPONSES

    messages = [[{"role": "user", "content": p}] for p in ["Review:", "Say something.", "Rate it", "Go"]]
    data, response_mask = verl_batch(worker.input_tokenizer, messages, [" " + r for r in RESPONSES] + [" fine"])

    rm_scores, outputs = worker_rm_scores(worker, data)

    settings = manager.settings
    rm_tok = worker.reward_model_tokenizer
    with pad_id(model, rm_tok.pad_token_id):
        scores, expected = dense_rlhf.score_and_densify_text(
            model,
            rm_tok,
            messages,
            data.batch["responses"],
            policy_tokenizer=worker.input_tokenizer,
            response_mask=response_mask,
            beta=settings.beta,
            method=settings.method,
        )
    assert rm_scores.shape == data.batch["responses"].shape and rm_scores.dtype == torch.float32
    assert torch.all(rm_scores[~response_mask] == 0)
    torch.testing.assert_close(rm_scores, expected, **TOL)
    torch.testing.assert_close(torch.tensor([o["reward_extra_info"]["prefix_score"] for o in outputs]), scores, **TOL)
    assert [o["reward_extra_info"]["prefix_fallback"] for o in outputs] == [0] * len(outputs)
    if extra:
        assert settings.beta == 0.3 and settings.method == "uniform"


@needs_vllm
@needs_verl
def test_the_verl_manager_isolates_a_sample_the_server_cannot_take(served, policy_dir):
    """A sample longer than the server's max_model_len fails alone: the batch's other samples are scored, and
    assemble_rm_scores names it."""
    from verl.experimental.reward_loop import RewardLoopWorker

    _, _, server, _ = served
    worker = RewardLoopWorker(served_verl_config(policy_dir, str(server.model_dir)), server.url)
    messages = [[{"role": "user", "content": p}] for p in ["Review:", "Rate it", "Go"]]
    data, _ = verl_batch(worker.input_tokenizer, messages, [" fine", " good " * 400, " bad"])
    outputs = asyncio.run(worker.compute_score_batch(data))
    assert [isinstance(o["reward_score"], list) for o in outputs] == [True, False, True]
    assert "max_model_len" in outputs[1]["reward_score"]["error"]
    with pytest.raises(ValueError, match="sample 1 of the batch could not be scored: .*max_model_len"):
        type(worker.reward_manager).assemble_rm_scores(data, [o["reward_score"] for o in outputs])


@needs_vllm
@needs_verl
def test_the_verl_manager_pointed_at_a_server_without_token_classify_says_how_to_start_it(served, policy_dir):
    from verl.experimental.reward_loop import RewardLoopWorker

    _, _, _, plain = served
    worker = RewardLoopWorker(served_verl_config(policy_dir, str(plain.model_dir)), plain.url.removeprefix("http://"))
    messages = [[{"role": "user", "content": "Review:"}]]
    data, _ = verl_batch(worker.input_tokenizer, messages, [" fine"])
    with pytest.raises(
        ServedRewardModelError,
        match=f"--pooler-config '{re.escape(POOLER_CONFIG)}'.*{re.escape(VERL_POOLER_CONFIG_KEY)}",
    ):
        asyncio.run(worker.compute_score_batch(data))


@needs_verl
def test_the_documented_abc_configuration_selects_the_plugin_architecture(policy_dir, tmp_path):
    from verl.trainer.ppo.reward import resolve_reward_manager_cls
    from verl.utils.config import omega_conf_to_dataclass

    from dense_rlhf.integrations import verl as dense_verl

    config = served_verl_config(policy_dir, str(tmp_path), manager="ServedABCRewardManager")
    assert resolve_reward_manager_cls(config) is dense_verl.ServedABCRewardManager
    dense_verl.check_routing(config)
    dense_verl.check_served(config, "abc")
    assert dense_verl.ServedSettings.from_config(config, "ServedABCRewardManager", "abc").method == "abc"
    # what verl's vLLM server turns into --hf-overrides (engine_kwargs.vllm replaces verl's own hf_overrides)
    engine = omega_conf_to_dataclass(config.reward.reward_model).rollout.engine_kwargs["vllm"]
    assert json.loads(json.dumps(engine["hf_overrides"])) == json.loads(abc_hf_overrides())
    without = served_verl_config(
        policy_dir,
        str(tmp_path),
        ("~reward.reward_model.rollout.engine_kwargs.vllm.hf_overrides",),
        manager="ServedABCRewardManager",
    )
    with pytest.raises(ValueError, match=f"ServedABCRewardManager needs .*{re.escape(VERL_HF_OVERRIDES_KEY)}"):
        dense_verl.check_served(without, "abc", "ServedABCRewardManager")
    dense_verl.check_served(without, "prefix")  # prefix differences need no plugin


@needs_vllm
@needs_verl
def test_the_served_abc_manager_through_the_reward_loop_worker_equals_the_local_call(servers, policy_dir):
    """verl's RewardLoopWorker with the documented ABC configuration, against the ABC server: rm_scores equal
    score_and_densify_text(method="abc") in-process on the same weights."""
    from verl.experimental.reward_loop import RewardLoopWorker

    from dense_rlhf.integrations import verl as dense_verl

    model, _, server = pick(servers, "llama")
    config = served_verl_config(policy_dir, str(server.model_dir), manager="ServedABCRewardManager")
    worker = RewardLoopWorker(config, server.url.removeprefix("http://"))
    assert isinstance(worker.reward_manager, dense_verl.ServedABCRewardManager)
    from test_align import RESPONSES

    messages = [[{"role": "user", "content": p}] for p in ["Review:", "Say something.", "Rate it", "Go"]]
    data, response_mask = verl_batch(worker.input_tokenizer, messages, [" " + r for r in RESPONSES] + [" fine"])
    rm_scores, outputs = worker_rm_scores(worker, data)
    scores, expected = dense_rlhf.score_and_densify_text(
        model,
        worker.reward_model_tokenizer,
        messages,
        data.batch["responses"],
        policy_tokenizer=worker.input_tokenizer,
        response_mask=response_mask,
        beta=worker.reward_manager.settings.beta,
        method="abc",
    )
    torch.testing.assert_close(rm_scores, expected, **TOL)
    torch.testing.assert_close(torch.tensor([o["reward_extra_info"]["abc_score"] for o in outputs]), scores, **TOL)
    assert [o["reward_extra_info"]["abc_fallback"] for o in outputs] == [0] * len(outputs)


@needs_vllm
def test_a_server_that_went_down_is_reported_with_its_url(served):
    """Last in the module: it stops the plain server (used only by the pooler test above)."""
    _, _, _, plain = served
    plain.stop()
    with pytest.raises(ServedRewardModelError, match=f"POST {plain.url}/pooling failed after 2 attempts") as error:
        ServedRewardModel(plain.url, "rm", max_retries=1, backoff=0.01).prefix_scores([[1]])
    assert "Is the reward-model server running" in str(error.value) and error.value.status is None
