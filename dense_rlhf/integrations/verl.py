"""ABC token-level rewards in verl's PPO: a reward manager that verl's reward loop loads by configuration.

verl (0.9.x) computes rewards in its reward loop: ``RewardLoopWorker`` Ray actors each build a reward manager,
call its ``run_single`` on one sample at a time and hand the per-sample results to the manager class's
``assemble_rm_scores``, whose ``[B, response_len]`` output becomes ``token_level_scores``. ``ABCRewardManager``
runs the reward model itself inside those workers and returns ABC rewards on the policy's response tokens
through :func:`dense_rlhf.score_and_densify_text` (the reward model may have its own tokenizer and chat
template). ``ServedPrefixRewardManager`` instead scores through the reward-model server verl starts itself (vLLM
with the ``token_classify`` pooler) and returns prefix-difference rewards, with no reward model in the workers;
``ServedABCRewardManager`` does the same with ABC rewards from a server running dense-rlhf's vLLM plugin. They
share :class:`TokenRewardManagerBase` (routing, refusals, micro-batches, per-sample fault isolation). The
configurations that route verl to them, and what they cost, are in docs/verl.md;
:func:`check_routing` and :func:`check_served` say why each part is needed; they and the settings the managers
read live in :mod:`dense_rlhf.integrations.verl_config` (which needs no verl) and are importable from here too.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import torch

from dense_rlhf._padding import pad_rows
from dense_rlhf.align.scoring import _score_text, _TextScores
from dense_rlhf.capture import capture_reward_attention
from dense_rlhf.integrations.verl_config import (  # noqa: F401  (the estimator sets: re-exported)
    MODULE_PATH,
    SEQUENCE_SUM_ESTIMATORS,
    TOKEN_LEVEL_ESTIMATORS,
    ABCSettings,
    ServedSettings,
    check_algorithm,
    check_routing,
    check_served,
)
from dense_rlhf.integrations.vllm import ServedRewardModel, _run

try:
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager import register
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
except ImportError as error:  # pragma: no cover - exercised only where verl is missing
    raise ImportError("dense_rlhf.integrations.verl needs verl: pip install 'dense-rlhf[verl]'") from error

if TYPE_CHECKING:
    from omegaconf import DictConfig
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "ABCRewardManager",
    "ABCSettings",
    "SampleResult",
    "ServedABCRewardManager",
    "ServedPrefixRewardManager",
    "ServedSettings",
    "TokenRewardManagerBase",
    "check_algorithm",
    "check_routing",
    "check_served",
    "compute_score",
    "load_reward_model",
]

logger = logging.getLogger(__name__)


def compute_score(*args: Any, **kwargs: Any) -> NoReturn:
    """The routing target for ``reward.custom_reward_function``: verl's reward-loop worker calls a manager's
    ``run_single`` only when that path is set, and loads this function from it. ``ABCRewardManager`` and
    ``ServedPrefixRewardManager`` score with the reward model and never call it; another manager that does gets this
    error."""
    raise RuntimeError(
        "dense_rlhf.integrations.verl.compute_score only routes verl's reward loop to "
        "ABCRewardManager or ServedPrefixRewardManager (reward.reward_manager.name=...); it computes "
        "no score"
    )


_MODELS: dict[tuple[str, str, str], torch.nn.Module] = {}
_MODELS_LOCK = threading.Lock()
# One reward model per process serves every manager in it; forwards take turns (the capture wraps the model).
_FORWARD_LOCKS: dict[int, threading.Lock] = {}


def load_reward_model(path: str, device: str = "cpu", dtype: str = "float32") -> torch.nn.Module:
    """The sequence-classification reward model at ``path``, loaded once per process and kept for later calls."""
    key = (path, device, dtype)
    with _MODELS_LOCK:
        if key not in _MODELS:
            from transformers import AutoModelForSequenceClassification

            model = AutoModelForSequenceClassification.from_pretrained(path, dtype=getattr(torch, dtype))
            model = model.to(device).eval()
            _MODELS[key] = model
            _FORWARD_LOCKS[id(model)] = threading.Lock()
        return _MODELS[key]


class _MicroBatcher:
    """Collects the samples that verl's worker submits in one ``compute_score_batch`` (it starts one task per
    sample, all before any runs) and scores them together, ``max_batch`` at a time, in a worker thread."""

    def __init__(self, score_batch, max_batch: int):
        self._score_batch = score_batch
        self._max_batch = max_batch
        self._pending: list[tuple[Any, asyncio.Future]] = []
        self._running: set[asyncio.Task] = set()  # the event loop keeps only weak references to tasks

    async def submit(self, item):
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((item, future))
        if len(self._pending) == 1:
            loop.call_soon(self._flush, loop)
        return await future

    def _flush(self, loop) -> None:
        pending, self._pending = self._pending, []
        for start in range(0, len(pending), self._max_batch):
            task = loop.create_task(self._run(pending[start : start + self._max_batch]))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, chunk) -> None:
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                None, self._score_batch, [item for item, _ in chunk]
            )
        except BaseException as error:  # every waiting sample gets the error
            for _, future in chunk:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(chunk, results):
            if not future.done():
                future.set_result(result)


@dataclass
class SampleResult:
    """One sample's outcome in a per-token reward manager.

    rewards: float32 [n] on the n valid response tokens, summing to ``score`` (None when ``error`` is set).
    fallback: why the sample's credit could not be mapped; its rewards are then the sparse reward (the score on
    its last token). error: why the sample could not be scored at all.
    """

    rewards: torch.Tensor | None
    score: float
    fallback: str | None = None
    error: str | None = None


class TokenRewardManagerBase(RewardManagerBase):
    """What dense-rlhf's per-token verl reward managers share, independent of how they score.

    ``__init__`` refuses configurations that never reach the manager (:func:`check_routing`) or that would discard
    or discount the per-token rewards (:func:`check_algorithm`). ``run_single`` reads one sample as verl's trainer
    hands it over, collects the samples of a batch into micro-batches of ``batch_size`` and hands them to
    ``score_batch`` (the subclass's scorer), which returns one :class:`SampleResult` per sample, so that a bad
    sample stays a bad sample: one whose credit cannot be mapped gets the sparse reward, is counted as
    ``<prefix>_fallback`` in ``reward_extra_info`` and logged as a warning with the reason; one that cannot be
    scored at all makes ``assemble_rm_scores`` raise with its index in the batch and the reason.
    ``reward_extra_info`` is ``{"<prefix>_score": score, "<prefix>_fallback": 0 or 1}`` for every sample.
    """

    extra_prefix = "abc"

    def __init__(
        self,
        config: DictConfig,
        tokenizer: PreTrainedTokenizerBase,
        compute_score: Callable | None = None,
        *,
        reward_model_tokenizer: PreTrainedTokenizerBase | None,
        batch_size: int,
    ):
        super().__init__(config, tokenizer, compute_score)
        check_routing(config, type(self).__name__)
        check_algorithm(config)
        self.reward_model_tokenizer = reward_model_tokenizer
        self._batcher = _MicroBatcher(self.score_batch, int(batch_size))

    def score_texts(self, prompts: list, response_ids: torch.Tensor, response_mask: torch.Tensor) -> _TextScores:
        """The subclass's scorer: ``dense_rlhf.align.scoring._score_text``'s result (scores, rewards, and the rows that
        ``failed`` or were ``unmapped``, each with its reason) for B prompts of one kind and their [B, R]
        right-padded response ids; rows that fail must not raise."""
        raise NotImplementedError

    def score_batch(self, samples: list[tuple[Any, torch.Tensor]]) -> list[SampleResult]:
        """One :class:`SampleResult` per (prompt, valid response ids), one :meth:`score_texts` call per kind of
        prompt (chat or text); a sample that fails affects only itself. Runs in a worker thread."""
        results: list = [None] * len(samples)
        kinds: dict[bool, list[int]] = {}
        for i, (prompt, _) in enumerate(samples):
            kinds.setdefault(isinstance(prompt, str), []).append(i)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for rows in kinds.values():
            lengths = [samples[i][1].numel() for i in rows]
            response_ids, response_mask = pad_rows([samples[i][1] for i in rows], pad)
            out = self.score_texts([samples[i][0] for i in rows], response_ids, response_mask)
            for j, i in enumerate(rows):
                if j in out.failed:
                    results[i] = SampleResult(None, math.nan, error=out.failed[j])
                else:
                    results[i] = SampleResult(
                        out.rewards[j, : lengths[j]].float().cpu(), float(out.scores[j]), fallback=out.unmapped.get(j)
                    )
        return results

    def _sample(self, data: DataProto):
        """(prompt, valid response ids) of a one-sample DataProto laid out as verl's trainer hands it over: the chat
        messages (``raw_prompt``) when the reward model's tokenizer has a chat template, else the prompt decoded by
        the policy's tokenizer."""
        if len(data) != 1:
            raise ValueError(f"run_single takes one sample, got {len(data)}")
        item = data[0]
        prompt_length = item.batch["prompts"].shape[-1]
        attention_mask = item.batch["attention_mask"]
        response_ids = item.batch["responses"]
        if attention_mask.shape[-1] != prompt_length + response_ids.shape[-1]:
            raise ValueError(
                f"attention_mask has {attention_mask.shape[-1]} positions, prompts + responses "
                f"{prompt_length + response_ids.shape[-1]}"
            )
        response_mask = attention_mask[prompt_length:].bool()
        n = int(response_mask.sum())
        if n == 0 or not bool(response_mask[:n].all()):
            raise ValueError(
                "the response must be right-padded and non-empty (attention_mask after the prompt: ones, then zeros)"
            )
        raw_prompt = item.non_tensor_batch.get("raw_prompt")
        if raw_prompt is not None and getattr(self.reward_model_tokenizer, "chat_template", None):
            prompt = [dict(message) for message in raw_prompt]
        else:
            prompt_ids = item.batch["prompts"][attention_mask[:prompt_length].bool()]
            prompt = self.tokenizer.decode(prompt_ids.tolist(), skip_special_tokens=True)
        return prompt, response_ids[:n].cpu()

    async def run_single(self, data: DataProto) -> dict:
        prompt, response_ids = self._sample(data)
        result = await self._batcher.submit((prompt, response_ids))
        extra = {
            f"{self.extra_prefix}_score": result.score,
            f"{self.extra_prefix}_fallback": int(result.fallback is not None),
        }
        if result.error is not None:  # raised by assemble_rm_scores, which knows the sample's index
            return {"reward_score": {"error": result.error}, "reward_extra_info": extra}
        if result.fallback is not None:
            logger.warning(
                "%s: sparse reward (score %.4g on the last token) for a sample whose credit cannot be mapped: %s",
                type(self).__name__,
                result.score,
                result.fallback,
            )
        return {"reward_score": result.rewards.tolist(), "reward_extra_info": extra}

    @classmethod
    def assemble_rm_scores(cls, data: DataProto, scores: list) -> torch.Tensor:
        """``rm_scores`` [B, response_len] float32 from the per-token rewards that ``run_single`` returned, each
        placed on its sample's valid (right-padded) response positions; zero elsewhere. Raises ValueError naming
        the first sample that could not be scored."""
        responses = data.batch["responses"]
        prompt_length = data.batch["prompts"].size(1)
        valid = data.batch["attention_mask"][:, prompt_length:].sum(dim=1).tolist()
        if len(scores) != len(valid):
            raise ValueError(f"got {len(scores)} results for {len(valid)} samples")
        rm_scores = torch.zeros(responses.shape, dtype=torch.float32, device=responses.device)
        for i, (row, n) in enumerate(zip(scores, valid)):
            if isinstance(row, Mapping) and "error" in row:
                raise ValueError(f"{cls.__name__}: sample {i} of the batch could not be scored: {row['error']}")
            row = torch.as_tensor(row, dtype=torch.float32)
            if row.dim() != 1:
                raise ValueError(
                    f"sample {i}'s reward_score is a scalar, not per-token rewards: verl did not call "
                    f"{cls.__name__}.run_single for it (set reward.custom_reward_function.path="
                    f"{MODULE_PATH})"
                )
            if row.numel() != n:
                raise ValueError(f"sample {i} has {row.numel()} per-token rewards but {n} valid response tokens")
            rm_scores[i, :n] = row.to(rm_scores.device)
        return rm_scores


@register("abc")
class ABCRewardManager(TokenRewardManagerBase):
    """verl reward manager: ABC rewards on the policy's response tokens, written into ``rm_scores``, from the reward
    model run in this process (:func:`dense_rlhf.score_and_densify_text`).

    ``run_single`` returns ``{"reward_score": [r_1, ..., r_n], "reward_extra_info": {"abc_score": s,
    "abc_fallback": 0}}``: the rewards of the n valid response tokens (summing to the reward model's score s), and
    ``assemble_rm_scores`` writes them into a float32 ``[B, response_len]`` tensor, zero on padding. A sample whose
    credit cannot be mapped gets the sparse reward and ``abc_fallback: 1`` (see :class:`TokenRewardManagerBase`).
    """

    def __init__(
        self,
        config: DictConfig,
        tokenizer: PreTrainedTokenizerBase,
        compute_score: Callable | None = None,
        reward_router_address: str | None = None,
        reward_model_tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        settings = ABCSettings.from_config(config)
        super().__init__(
            config,
            tokenizer,
            compute_score,
            reward_model_tokenizer=reward_model_tokenizer,
            batch_size=settings.batch_size,
        )
        self.settings = settings
        if self.reward_model_tokenizer is None:
            from transformers import AutoTokenizer

            self.reward_model_tokenizer = AutoTokenizer.from_pretrained(settings.model_path)
        if settings.num_threads is not None:
            torch.set_num_threads(settings.num_threads)
        self.reward_model = load_reward_model(settings.model_path, settings.device, settings.dtype)
        try:  # the layer against the model's depth now, not at the first scoring after a rollout
            capture_reward_attention(self.reward_model, layer=settings.layer)
        except (ValueError, IndexError) as error:
            raise ValueError(f"reward.reward_kwargs.layer={settings.layer}: {error}") from None

    def score_texts(self, prompts: list, response_ids: torch.Tensor, response_mask: torch.Tensor) -> _TextScores:
        """One reward-model forward, in this process, with the attention capture."""
        with _FORWARD_LOCKS[id(self.reward_model)]:
            return _score_text(
                self.reward_model,
                self.reward_model_tokenizer,
                prompts,
                response_ids,
                policy_tokenizer=self.tokenizer,
                response_mask=response_mask,
                beta=float(self.settings.beta),
                layer=self.settings.layer,
                max_length=self.settings.max_length,
                strict=False,
            )


@register("served_prefix")
class ServedPrefixRewardManager(TokenRewardManagerBase):
    """verl reward manager: prefix-difference rewards on the policy's response tokens from the reward-model server
    verl already runs (``reward.reward_model.enable=True`` starts vLLM for it), written into ``rm_scores``. It loads
    no weights: each micro-batch of samples is rendered and tokenised for the reward model here, sent as token ids
    to ``POST {reward_router_address}/pooling`` (``token_classify``: the score at every position) and mapped onto
    the policy's tokens (:meth:`dense_rlhf.integrations.vllm.ServedRewardModel.score_and_densify_text`).

    The routing, the refusals of estimators that would discard per-token rewards, and the per-sample fault
    isolation are :class:`TokenRewardManagerBase`'s, as for :class:`ABCRewardManager`; ``reward_extra_info`` is
    ``{"prefix_score": s, "prefix_fallback": 0 or 1}``. A server that cannot be reached after the client's retries,
    or that has no ``token_classify`` pooler, fails the step with the client's error (it is no sample's fault).
    """

    extra_prefix = "prefix"
    default_method = "prefix"

    def __init__(
        self,
        config: DictConfig,
        tokenizer: PreTrainedTokenizerBase,
        compute_score: Callable | None = None,
        reward_router_address: str | None = None,
        reward_model_tokenizer: PreTrainedTokenizerBase | None = None,
    ):
        manager = type(self).__name__
        settings = ServedSettings.from_config(config, manager, self.default_method)
        check_served(config, settings.method, manager)
        super().__init__(
            config,
            tokenizer,
            compute_score,
            reward_model_tokenizer=reward_model_tokenizer,
            batch_size=settings.batch_size,
        )
        if not reward_router_address:
            raise ValueError(
                f"{manager} got no reward_router_address: verl passes its reward-model "
                "router's address to the manager when reward.reward_model.enable=True"
            )
        self.settings = settings
        if self.reward_model_tokenizer is None:
            from transformers import AutoTokenizer

            self.reward_model_tokenizer = AutoTokenizer.from_pretrained(config.reward.reward_model.model_path)
        self.client = ServedRewardModel(
            reward_router_address,
            settings.model,
            timeout=settings.timeout,
            max_retries=settings.max_retries,
            backoff=settings.backoff,
        )

    def score_texts(self, prompts: list, response_ids: torch.Tensor, response_mask: torch.Tensor) -> _TextScores:
        """One request to the server for the batch (this runs in a worker thread: the client's own event loop)."""
        return _run(
            self.client._ascore_text(
                self.reward_model_tokenizer,
                prompts,
                response_ids,
                policy_tokenizer=self.tokenizer,
                response_mask=response_mask,
                beta=float(self.settings.beta),
                method=self.settings.method,
                max_length=self.settings.max_length,
                strict=False,
            )
        )


@register("served_abc")
class ServedABCRewardManager(ServedPrefixRewardManager):
    """verl reward manager: ABC rewards on the policy's response tokens from the reward-model server verl already
    runs, with the ABC architecture of dense-rlhf's vLLM plugin selected (``hf_overrides``; docs/verl.md): the
    attention row and the score come back with each micro-batch's one request and are mapped onto the policy's
    tokens as :class:`ABCRewardManager` maps its in-process rows; no weights in the workers. Everything else is
    :class:`ServedPrefixRewardManager`'s; ``reward.reward_kwargs.method`` may also be "prefix", "sparse" or
    "uniform" (the same server answers them). ``reward_extra_info`` is ``{"abc_score": s, "abc_fallback": 0 or 1}``.
    """

    extra_prefix = "abc"
    default_method = "abc"
