"""ABC token-level rewards in verl's PPO: a reward manager that verl's reward loop loads by configuration.

verl (0.9.x) computes rewards in its reward loop: ``RewardLoopWorker`` Ray actors each build a reward manager,
call its ``run_single`` on one sample at a time and hand the per-sample results to the manager class's
``assemble_rm_scores``, whose ``[B, response_len]`` output becomes ``token_level_scores``. ``ABCRewardManager``
runs the reward model itself inside those workers and returns ABC rewards on the policy's response tokens
through :func:`dense_rlhf.score_and_densify_text` (the reward model may have its own tokenizer and chat
template). The configuration that routes verl to it, and what it costs, are in the README's "verl" section;
:func:`check_routing` says why each part is needed.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, fields
from typing import Any

import torch

from dense_rlhf import score_and_densify_text

try:
    from verl import DataProto
    from verl.experimental.reward_loop.reward_manager import register
    from verl.experimental.reward_loop.reward_manager.base import RewardManagerBase
except ImportError as error:  # pragma: no cover - exercised only where verl is missing
    raise ImportError("dense_rlhf.integrations.verl needs verl: pip install 'dense-rlhf[verl]'") from error

__all__ = ["ABCRewardManager", "ABCSettings", "check_routing", "compute_score", "load_reward_model"]

MODULE_PATH = "pkg://dense_rlhf.integrations.verl"


@dataclass(frozen=True)
class ABCSettings:
    """What the manager reads from verl's config: the reward model's path from ``reward.reward_model.model_path``,
    the rest from ``reward.reward_kwargs`` (the place verl's own DAPO manager reads its options from).

    beta, layer, max_length: as in :func:`dense_rlhf.score_and_densify_text`.
    device: where the reward model runs inside the reward-loop worker ("cpu" by default: verl starts those
    workers without a GPU reservation; see the README). dtype: the reward model's weights ("float32",
    "bfloat16", "float16"). batch_size: most samples per reward-model forward. num_threads: torch threads in the
    worker process (Ray starts it with OMP_NUM_THREADS=1); None leaves them as they are.
    """

    model_path: str
    beta: float = 0.8
    layer: int = -1
    max_length: int | None = None
    device: str = "cpu"
    dtype: str = "float32"
    batch_size: int = 8
    num_threads: int | None = None

    @classmethod
    def from_config(cls, config) -> "ABCSettings":
        model_path = config.reward.reward_model.get("model_path")
        if not model_path:
            raise ValueError("reward.reward_model.model_path is not set: ABCRewardManager loads the reward model "
                             "from it")
        kwargs = dict(config.reward.get("reward_kwargs") or {})
        known = {f.name for f in fields(cls)} - {"model_path"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(f"reward.reward_kwargs has keys ABCRewardManager does not know: {unknown}; "
                             f"it reads {sorted(known)}")
        settings = cls(model_path=str(model_path), **kwargs)
        if not 0.0 <= float(settings.beta) <= 1.0:
            raise ValueError(f"reward.reward_kwargs.beta must be in [0, 1], got {settings.beta}")
        if not isinstance(getattr(torch, settings.dtype, None), torch.dtype):
            raise ValueError(f"reward.reward_kwargs.dtype must name a torch dtype, got {settings.dtype!r}")
        if int(settings.batch_size) < 1:
            raise ValueError(f"reward.reward_kwargs.batch_size must be at least 1, got {settings.batch_size}")
        return settings


def check_routing(config) -> None:
    """Raise ValueError unless verl 0.9.x will call this manager's ``run_single`` and ``assemble_rm_scores``.

    In verl 0.9.1 a reward manager's ``assemble_rm_scores`` is called only by ``RewardLoopManager.compute_rm_score``,
    which the trainers call only with a colocated reward model (``reward.reward_model.enable=True``,
    ``enable_resource_pool=False``). Otherwise the agent loop scores each sample during rollout and puts the
    result on the last response token itself. Inside the worker, ``run_single`` is called only when
    ``reward.custom_reward_function.path`` is set; without it the worker queries the served reward model for a
    scalar instead.
    """
    reward = config.reward
    problems = []
    if not reward.reward_model.get("enable"):
        problems.append("reward.reward_model.enable=True (without it verl's agent loop places one scalar per "
                        "sample on the last token and never calls assemble_rm_scores)")
    if reward.reward_model.get("enable_resource_pool"):
        problems.append("reward.reward_model.enable_resource_pool=False (a standalone reward pool makes verl score "
                        "in the agent loop, one scalar per sample)")
    if not reward.get("custom_reward_function", {}).get("path"):
        problems.append(f"reward.custom_reward_function.path={MODULE_PATH} and reward.custom_reward_function.name="
                        "compute_score (without a path verl's worker asks the served reward model for a scalar and "
                        "never calls run_single)")
    if problems:
        raise ValueError("ABCRewardManager is not reached by this verl configuration; set " + "; ".join(problems))


def compute_score(*args: Any, **kwargs: Any):
    """The routing target for ``reward.custom_reward_function``: verl's reward-loop worker calls a manager's
    ``run_single`` only when that path is set, and loads this function from it. ``ABCRewardManager`` scores with
    the reward model and never calls it; another manager that does gets this error."""
    raise RuntimeError("dense_rlhf.integrations.verl.compute_score only routes verl's reward loop to "
                       "ABCRewardManager (reward.reward_manager.name=ABCRewardManager); it computes no score")


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
            task = loop.create_task(self._run(pending[start:start + self._max_batch]))
            self._running.add(task)
            task.add_done_callback(self._running.discard)

    async def _run(self, chunk) -> None:
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                None, self._score_batch, [item for item, _ in chunk])
        except BaseException as error:  # every waiting sample gets the error
            for _, future in chunk:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(chunk, results):
            if not future.done():
                future.set_result(result)


@register("abc")
class ABCRewardManager(RewardManagerBase):
    """verl reward manager: ABC rewards on the policy's response tokens, written into ``rm_scores``.

    ``run_single`` returns ``{"reward_score": [r_1, ..., r_n], "reward_extra_info": {"abc_score": s}}``: the
    rewards of the n valid response tokens (summing to the reward model's score s), and ``assemble_rm_scores``
    writes them into a float32 ``[B, response_len]`` tensor, zero on padding.
    """

    def __init__(self, config, tokenizer, compute_score=None, reward_router_address=None,
                 reward_model_tokenizer=None):
        super().__init__(config, tokenizer, compute_score)
        check_routing(config)
        self.settings = ABCSettings.from_config(config)
        if reward_model_tokenizer is None:
            from transformers import AutoTokenizer

            reward_model_tokenizer = AutoTokenizer.from_pretrained(self.settings.model_path)
        self.reward_model_tokenizer = reward_model_tokenizer
        if self.settings.num_threads is not None:
            torch.set_num_threads(int(self.settings.num_threads))
        self.reward_model = load_reward_model(self.settings.model_path, self.settings.device, self.settings.dtype)
        self._batcher = _MicroBatcher(self._score_batch, int(self.settings.batch_size))

    def _sample(self, data: DataProto):
        """(prompt, valid response ids) of a one-sample DataProto laid out as verl's trainer hands it over."""
        if len(data) != 1:
            raise ValueError(f"run_single takes one sample, got {len(data)}")
        item = data[0]
        prompt_length = item.batch["prompts"].shape[-1]
        attention_mask = item.batch["attention_mask"]
        response_ids = item.batch["responses"]
        if attention_mask.shape[-1] != prompt_length + response_ids.shape[-1]:
            raise ValueError(f"attention_mask has {attention_mask.shape[-1]} positions, prompts + responses "
                             f"{prompt_length + response_ids.shape[-1]}")
        response_mask = attention_mask[prompt_length:].bool()
        n = int(response_mask.sum())
        if n == 0 or not bool(response_mask[:n].all()):
            raise ValueError("the response must be right-padded and non-empty (attention_mask after the prompt: "
                             "ones, then zeros)")
        raw_prompt = item.non_tensor_batch.get("raw_prompt")
        if raw_prompt is not None and getattr(self.reward_model_tokenizer, "chat_template", None):
            prompt = [dict(message) for message in raw_prompt]
        else:
            prompt_ids = item.batch["prompts"][attention_mask[:prompt_length].bool()]
            prompt = self.tokenizer.decode(prompt_ids.tolist(), skip_special_tokens=True)
        return prompt, response_ids[:n].cpu()

    def _score_batch(self, items):
        """Scores and per-token rewards for a list of (prompt, response ids), one reward-model forward per kind of
        prompt (chat or text)."""
        results: list = [None] * len(items)
        kinds: dict[bool, list[int]] = {}
        for i, (prompt, _) in enumerate(items):
            kinds.setdefault(isinstance(prompt, str), []).append(i)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for rows in kinds.values():
            lengths = [items[i][1].numel() for i in rows]
            response_ids = torch.full((len(rows), max(lengths)), pad, dtype=torch.long)
            response_mask = torch.zeros(response_ids.shape, dtype=torch.bool)
            for j, i in enumerate(rows):
                response_ids[j, :lengths[j]] = items[i][1]
                response_mask[j, :lengths[j]] = True
            with _FORWARD_LOCKS[id(self.reward_model)]:
                scores, rewards = score_and_densify_text(
                    self.reward_model, self.reward_model_tokenizer, [items[i][0] for i in rows], response_ids,
                    policy_tokenizer=self.tokenizer, response_mask=response_mask, beta=float(self.settings.beta),
                    layer=int(self.settings.layer), max_length=self.settings.max_length)
            for j, i in enumerate(rows):
                results[i] = (rewards[j, :lengths[j]].float().cpu(), float(scores[j]))
        return results

    async def run_single(self, data: DataProto) -> dict:
        rewards, score = await self._batcher.submit(self._sample(data))
        return {"reward_score": rewards.tolist(), "reward_extra_info": {"abc_score": score}}

    @classmethod
    def assemble_rm_scores(cls, data: DataProto, scores: list) -> torch.Tensor:
        """``rm_scores`` [B, response_len] float32 from the per-token rewards that ``run_single`` returned, each
        placed on its sample's valid (right-padded) response positions; zero elsewhere."""
        responses = data.batch["responses"]
        prompt_length = data.batch["prompts"].size(1)
        valid = data.batch["attention_mask"][:, prompt_length:].sum(dim=1).tolist()
        if len(scores) != len(valid):
            raise ValueError(f"got {len(scores)} results for {len(valid)} samples")
        rm_scores = torch.zeros(responses.shape, dtype=torch.float32, device=responses.device)
        for i, (row, n) in enumerate(zip(scores, valid)):
            row = torch.as_tensor(row, dtype=torch.float32)
            if row.dim() != 1:
                raise ValueError(f"sample {i}'s reward_score is a scalar, not per-token rewards: verl did not call "
                                 f"ABCRewardManager.run_single for it (set reward.custom_reward_function.path="
                                 f"{MODULE_PATH})")
            if row.numel() != n:
                raise ValueError(f"sample {i} has {row.numel()} per-token rewards but {n} valid response tokens")
            rm_scores[i, :n] = row.to(rm_scores.device)
        return rm_scores
