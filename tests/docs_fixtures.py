"""Fixtures for the Python code blocks of README.md and of the pages under docs/, which `make test-docs` runs with
pytest-markdown-docs and this module as a plugin (``-p docs_fixtures``, tests/ on the path; some environments hold
another top-level ``tests`` package). Not a root conftest.py: that would put the source tree first on sys.path in
every pytest run, shadowing the installed package that the CUDA build check tests.

A block names what it uses in its info string (```` ```python fixture:reward_model fixture:input_ids ````); each
name is a fixture below, injected as a global of that name; ``torch`` and ``dense_rlhf`` are imported for every
block. The blocks run in a temporary folder. Models are the sentiment task's tiny GPT-2s (dense_rlhf.study.models)
with random weights, built from their configs the way a user's model loads (transformers' default attention,
SDPA); tokenizers are built with the ``tokenizers`` library from generated text. Nothing is downloaded.
"""

from __future__ import annotations

import pytest


@pytest.hookimpl(optionalhook=True)  # pytest-markdown-docs' hook; other environments run the tests without it
def pytest_markdown_docs_globals():
    import torch

    import dense_rlhf

    return {"torch": torch, "dense_rlhf": dense_rlhf}


@pytest.fixture(autouse=True)
def _code_blocks_run_in_a_temporary_folder(request, tmp_path, monkeypatch):
    """Whatever a block writes (a trainer's output_dir) lands in a temporary folder."""
    if request.node.get_closest_marker("markdown-docs"):
        monkeypatch.chdir(tmp_path)


@pytest.fixture(scope="session")
def _codec():
    from dense_rlhf.study.sentiment_task import Codec

    return Codec()


@pytest.fixture(scope="session")
def _setup():
    from dense_rlhf.study.models import SetupConfig

    return SetupConfig()


@pytest.fixture
def tokenizer(_codec):
    """The policy's tokenizer: the sentiment task's word-level tokenizer (a fast tokenizer)."""
    return _codec.tokenizer


@pytest.fixture
def policy_tokenizer(tokenizer):
    return tokenizer


@pytest.fixture
def policy(_codec, _setup):
    """A GPT-2 causal LM over the policy's tokenizer, random weights."""
    from dense_rlhf.study.models import new_policy

    return new_policy(_codec, _setup)


@pytest.fixture
def reward_model(_codec, _setup):
    """A one-logit GPT-2 sequence classifier over the policy's tokenizer, random weights, SDPA attention, eval
    mode; it reads its score at the last token that is not padding."""
    from dense_rlhf.study.models import new_reward_model

    return new_reward_model(_codec, _setup).eval()


REVIEWS = [("the plot was", "very good and the music was great"), ("i think the", "acting felt slightly dull")]


@pytest.fixture(scope="session")
def _reward_batch(_codec):
    """Two rows of [BOS] prompt completion [EOS], right-padded; the completion mask covers the completion and its
    [EOS], the token the reward model scores."""
    import torch

    rows, spans = [], []
    for prompt, completion in REVIEWS:
        head = [_codec.bos_id] + _codec.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        tail = _codec.tokenizer(completion, add_special_tokens=False)["input_ids"] + [_codec.eos_id]
        rows.append(head + tail)
        spans.append((len(head), len(head) + len(tail)))
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), _codec.pad_id, dtype=torch.long)
    attention_mask = torch.zeros(len(rows), width, dtype=torch.long)
    completion_mask = torch.zeros(len(rows), width, dtype=torch.bool)
    for b, (row, (start, end)) in enumerate(zip(rows, spans)):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
        completion_mask[b, start:end] = True
    return input_ids, attention_mask, completion_mask


@pytest.fixture
def input_ids(_reward_batch):
    return _reward_batch[0].clone()


@pytest.fixture
def attention_mask(_reward_batch):
    return _reward_batch[1].clone()


@pytest.fixture
def completion_mask(_reward_batch):
    return _reward_batch[2].clone()


@pytest.fixture(scope="session")
def _rm_tokenizer():
    from dense_rlhf.study.models import build_rm_tokenizer

    return build_rm_tokenizer(seed=0)


@pytest.fixture
def rm_tokenizer(_rm_tokenizer):
    """A reward model's own tokenizer: byte-level BPE with a chat template that trims the message content."""
    return _rm_tokenizer


@pytest.fixture
def rm(rm_tokenizer, _setup):
    """A one-logit GPT-2 reward model over ``rm_tokenizer``, random weights, eval mode."""
    from dense_rlhf.study.models import new_chat_reward_model

    return new_chat_reward_model(rm_tokenizer, _setup).eval()


@pytest.fixture
def response_ids(policy_tokenizer):
    """The policy's responses to two prompts, [2, R] token ids right-padded with its pad id."""
    import torch

    rows = [policy_tokenizer(text, add_special_tokens=False)["input_ids"] for _, text in REVIEWS]
    out = torch.full((len(rows), max(map(len, rows))), policy_tokenizer.pad_token_id, dtype=torch.long)
    for b, row in enumerate(rows):
        out[b, : len(row)] = torch.tensor(row)
    return out


@pytest.fixture
def prompts():
    """A prompt dataset as trl's trainers take it: a "prompt" column of plain text."""
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [prompt for prompt, _ in REVIEWS] * 4})


@pytest.fixture
def served_url(rm):
    """The address of a stand-in for a vLLM server started with the token_classify pooler: an aiohttp app in this
    process that answers ``POST /pooling`` from ``rm`` (tests/test_vllm.py runs the same code against real vLLM)."""
    from test_vllm import Scripted, head_of

    with Scripted(head_of(rm), models=["/path/to/reward-model"]) as server:
        yield server.url


@pytest.fixture
def abc_served_url(rm):
    """The address of a stand-in for a vLLM server running dense-rlhf's ABC architecture: an aiohttp app in this
    process that answers ``POST /pooling`` from ``rm`` as the plugin does (tests/test_vllm.py runs real vLLM)."""
    from test_vllm import Scripted, abc_head_of

    with Scripted(abc_head_of(rm), models=["/path/to/reward-model"]) as server:
        yield server.url
