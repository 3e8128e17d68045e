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
import os
import shlex
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

aiohttp = pytest.importorskip("aiohttp", reason="the client needs aiohttp (pip install 'dense-rlhf[served]')")

from aiohttp import web  # noqa: E402

import dense_rlhf  # noqa: E402
from dense_rlhf.integrations.vllm import (  # noqa: E402
    POOLER_CONFIG,
    VERL_POOLER_CONFIG_KEY,
    ServedRewardModel,
    ServedRewardModelError,
)
from dense_rlhf.integrations.vllm_server import CPU_ARGS, LocalVLLMServer, free_port  # noqa: E402

VLLM_PYTHON = os.environ.get("DENSE_RLHF_VLLM_PYTHON")
# the servers' flags: CPU_ARGS unless given (benchmarks/gpu_check.sh gives flags for a GPU)
VLLM_ARGS = shlex.split(os.environ["DENSE_RLHF_VLLM_ARGS"]) if os.environ.get("DENSE_RLHF_VLLM_ARGS") else CPU_ARGS
TOL = dict(atol=1e-4, rtol=0)


# ----------------------------------------------------------------------------------------- a scripted server


class Scripted:
    """An aiohttp app on a free port, in a thread with its own event loop, whose /pooling replies follow a script:
    one handler per request, the last one repeated. /v1/models lists ``models``."""

    def __init__(self, *handlers, models=("rm",)):
        self.handlers, self.models, self.requests = list(handlers), list(models), []

    async def _pooling(self, request):
        body = await request.json()
        self.requests.append(body)
        handler = self.handlers[min(len(self.requests), len(self.handlers)) - 1]
        return await handler(body)

    async def _models(self, request):
        return web.json_response({"object": "list", "data": [{"id": m, "object": "model"} for m in self.models]})

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


def status(code: int, message: str = "boom", param=None):
    async def handler(body):
        return web.json_response({"error": {"message": message, "type": "Error", "param": param, "code": code}},
                                 status=code)
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
    assert server.requests == [{"model": "rm", "input": [[1, 2, 3], [7]], "task": "token_classify",
                                "use_activation": False}]


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


@pytest.mark.parametrize("reply, match", [
    (lambda rows: {"data": [{"index": 0, "data": [[0.0]] * (len(rows[0]) - 1)}]},
     r"returned 2 per-token values for sequence 0, which has 3 tokens"),
    (lambda rows: {"data": []}, r"returned 0 results for 1 sequences"),
    (lambda rows: {"data": [{"index": 3, "data": [[0.0]] * 3}]}, r"bad index \(3\)"),
    (lambda rows: {"data": [{"index": 0, "data": [[0.0, 1.0, 2.0]] * 3}]}, r"one logit \(the score\) or two"),
    (lambda rows: {"data": [{"index": 0, "data": ["x"] * 3}]}, r"not numbers"),
    (lambda rows: {"something": "else"}, r"returned NoneType results"),
], ids=["short", "no-results", "bad-index", "three-logits", "not-numbers", "no-data"])
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
        out = {m: client.score_and_densify(ids, attention, completion, method=m, beta=0.7)
               for m in ("prefix", "sparse", "uniform")}
        async_out = asyncio.run(client.ascore_and_densify(ids, attention, completion, beta=0.7))
    assert server.requests[0]["input"] == [[1, 2, 3, 4], [5, 3, 2, 1, 4]]
    prefix = torch.tensor([[values[t] if a else 0.0 for t, a in zip(r, m)]
                           for r, m in zip(ids.tolist(), attention.tolist())])
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
    with pytest.raises(ValueError, match="does not expose"):
        client.score_and_densify(ids, mask, mask, method="abc")
    with pytest.raises(ValueError, match="method must be one of"):
        client.score_and_densify(ids, mask, mask, method="attention")
    with pytest.raises(ValueError, match=r"beta must be a number in \[0, 1\]"):
        client.score_and_densify(ids, mask, mask, beta=1.5)
    with pytest.raises(ValueError, match="completion_mask marks padding"):
        client.score_and_densify(ids, torch.tensor([[1, 0]]), mask)
    with pytest.raises(ValueError, match="completion_mask must have input_ids' shape"):
        client.score_and_densify(ids, mask, torch.tensor([1, 1]))


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
    server = LocalVLLMServer(tmp_path / "rm", python=sys.executable, log_path=tmp_path / "vllm.log",
                             env={"PYTHONPATH": str(tmp_path)})  # nothing named vllm on the path
    (tmp_path / "vllm").mkdir()  # a package without the entry point: fails the same way where vLLM is installed
    (tmp_path / "vllm" / "__init__.py").write_text("")
    with pytest.raises(RuntimeError, match=r"exited with code 1 before answering(.|\n)*vllm.entrypoints"):
        with server:
            pass
    assert server.process.poll() is not None


# ----------------------------------------------------------------------------------------- a real vLLM server

needs_vllm = pytest.mark.skipif(VLLM_PYTHON is None, reason="no vLLM to serve with: make test-vllm sets "
                                                             "DENSE_RLHF_VLLM_PYTHON")


def rm_tokenizer():
    from test_align import byte_bpe

    return byte_bpe()


def tiny_reward_model(vocab_size: int, pad_token_id: int):
    """2 layers, hidden 128, 2 heads of 64 (vLLM's CPU attention refuses head_dim 16), one logit."""
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512, num_labels=1,
                         pad_token_id=pad_token_id)
    model = LlamaForSequenceClassification(config).eval()
    with torch.no_grad():  # a visible score: random init leaves the head near zero
        model.score.weight.mul_(10.0)
    return model


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(model, tokenizer, token_classify server, plain server): both servers started at once, stopped after the
    module."""
    if VLLM_PYTHON is None:
        pytest.skip("no vLLM to serve with: make test-vllm sets DENSE_RLHF_VLLM_PYTHON")
    root = tmp_path_factory.mktemp("served")
    tok = rm_tokenizer()
    model = tiny_reward_model(len(tok), tok.pad_token_id)
    model.save_pretrained(root / "rm")
    tok.save_pretrained(root / "rm")
    servers = [LocalVLLMServer(root / "rm", python=VLLM_PYTHON, token_classify=flag, args=VLLM_ARGS,
                               log_path=root / f"vllm-{name}.log")
               for flag, name in ((True, "token"), (False, "plain"))]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait()
        print(f"\nvLLM servers answered after {servers[0].started_s:.0f} s and {servers[1].started_s:.0f} s")
        yield model, tok, servers[0], servers[1]
    finally:
        for server in servers:
            server.stop()


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
        ids[b, start:start + len(p) + len(c)] = torch.tensor(p + c)
        attention[b, start:start + len(p) + len(c)] = 1
        completion[b, start + len(p):start + len(p) + len(c)] = True
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
            want = (dense_rlhf.sparse_rewards if method == "sparse" else dense_rlhf.uniform_rewards)(want_scores,
                                                                                                     completion)
    torch.testing.assert_close(scores, want_scores, **TOL)
    torch.testing.assert_close(rewards, want, **TOL)
    torch.testing.assert_close(rewards.sum(1), scores, **TOL)
    if side == "right":  # no position shift: the same as dense_rlhf.score_and_densify itself
        local_scores, local = dense_rlhf.score_and_densify(model, ids, attention, completion, method=method,
                                                           beta=0.6)
        torch.testing.assert_close(rewards, local, **TOL)
        torch.testing.assert_close(scores, local_scores, **TOL)


@needs_vllm
def test_concurrent_async_calls(served):
    model, tok, server, _ = served
    client = ServedRewardModel(server.url)
    batches = [batch(tok, "right", seed) for seed in range(3)]

    async def main():
        return await asyncio.gather(*(client.ascore_and_densify(*b, method="prefix") for b in batches))

    for (scores, rewards), b in zip(asyncio.run(main()), batches):
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


@needs_vllm
def test_a_server_that_went_down_is_reported_with_its_url(served):
    """Last in the module: it stops the plain server (used only by the pooler test above)."""
    _, _, _, plain = served
    plain.stop()
    with pytest.raises(ServedRewardModelError, match=f"POST {plain.url}/pooling failed after 2 attempts") as error:
        ServedRewardModel(plain.url, "rm", max_retries=1, backoff=0.01).prefix_scores([[1]])
    assert "Is the reward-model server running" in str(error.value) and error.value.status is None
