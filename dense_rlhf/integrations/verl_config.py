"""What dense-rlhf's verl reward managers read from verl's configuration, and the configurations they refuse.

verl 0.9.x reaches a per-token reward manager only with some settings, and some of its advantage estimators discard
per-token rewards: :func:`check_routing`, :func:`check_algorithm` and :func:`check_served` say which, and why. The
settings dataclasses read ``reward.reward_kwargs``. Nothing here imports verl, so a configuration can be checked
without it.
"""

from __future__ import annotations

import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import TYPE_CHECKING

import torch

from dense_rlhf.integrations.vllm_abc import VERL_HF_OVERRIDES_KEY, abc_hf_overrides
from dense_rlhf.integrations.vllm_messages import POOLER_CONFIG, VERL_POOLER_CONFIG_KEY
from dense_rlhf.integrations.vllm_plugin import ARCHITECTURES
from dense_rlhf.ops import check_beta

if TYPE_CHECKING:
    from omegaconf import DictConfig  # verl's configuration

__all__ = [
    "ABCSettings",
    "ServedSettings",
    "check_algorithm",
    "check_routing",
    "check_served",
    "MODULE_PATH",
    "SEQUENCE_SUM_ESTIMATORS",
    "TOKEN_LEVEL_ESTIMATORS",
]

MODULE_PATH = "pkg://dense_rlhf.integrations.verl"
"""Where verl loads the managers and :func:`dense_rlhf.integrations.verl.compute_score` from."""

# verl 0.9.1's advantage estimators (verl/trainer/ppo/core_algos.py, ADV_ESTIMATOR_REGISTRY), read from its code.
# These start from each row's sum, ``token_level_rewards.sum(dim=-1)`` (gdpo through
# compute_grpo_outcome_advantage, or per-key scalars on the last token), so per-token rewards reach them only as
# that sum:
SEQUENCE_SUM_ESTIMATORS = frozenset(
    {
        "grpo",
        "grpo_vectorized",
        "gdpo",
        "grpo_passk",
        "reinforce_plus_plus_baseline",
        "rloo",
        "rloo_vectorized",
        "opo",
        "gpg",
    }
)
# These use per-token rewards: GAE (with a critic), and returns-to-go (reverse cumulative sums) with a baseline:
TOKEN_LEVEL_ESTIMATORS = frozenset(
    {"gae", "reinforce_plus_plus", "remax", "optimal_token_baseline", "tir_optimal_token_baseline"}
)
KWARGS = "reward.reward_kwargs."
"""The prefix of the settings' keys in verl's configuration, for messages."""


def _integer(value, key: str, minimum: int | None = None, optional: bool = False) -> int | None:
    """``value`` of the setting ``key`` as an int, checked: an integer (not a bool) of at least ``minimum``, or None
    where ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        kind = "an integer or null" if optional else "an integer"
        raise TypeError(f"{key} must be {kind}, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{key} must be at least {minimum}, got {value}")
    return int(value)


def _number(value, key: str, minimum: float = 0.0, strict: bool = False) -> float:
    """``value`` of the setting ``key`` as a float, checked: a finite real number (not a bool) of at least (or, where
    ``strict``, above) ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{key} must be a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(float(value)) or value < minimum or (strict and value == minimum):
        raise ValueError(f"{key} must be a finite number {'above' if strict else 'at least'} {minimum}, got {value}")
    return float(value)


_ESTIMATOR_FIX = (
    "set algorithm.adv_estimator=gae (PPO with a critic), or a critic-free estimator that keeps "
    "per-token returns: reinforce_plus_plus, remax, or optimal_token_baseline (with "
    "actor_rollout_ref.actor.calculate_sum_pi_squared=True); for GRPO with ABC's credit per token, see "
    "dense_rlhf.integrations.trl.ABCGRPOTrainer"
)


@dataclass(frozen=True)
class ABCSettings:
    """What the manager reads from verl's config: the reward model's path from ``reward.reward_model.model_path``,
    the rest from ``reward.reward_kwargs`` (the place verl's own DAPO manager reads its options from).

    beta, layer, max_length: as in :func:`dense_rlhf.score_and_densify_text`.
    device: where the reward model runs inside the reward-loop worker ("cpu" by default: verl starts those
    workers without a GPU reservation; see docs/verl.md). dtype: the reward model's weights ("float32",
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
    def from_config(cls, config: DictConfig) -> ABCSettings:
        model_path = config.reward.reward_model.get("model_path")
        if not model_path:
            raise ValueError(
                "reward.reward_model.model_path is not set: ABCRewardManager loads the reward model from it"
            )
        kwargs = dict(config.reward.get("reward_kwargs") or {})
        known = {f.name for f in fields(cls)} - {"model_path"}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"reward.reward_kwargs has keys ABCRewardManager does not know: {unknown}; it reads {sorted(known)}"
            )
        settings = cls(model_path=str(model_path), **kwargs)
        if not isinstance(settings.dtype, str) or not isinstance(getattr(torch, settings.dtype, None), torch.dtype):
            raise ValueError(f"{KWARGS}dtype must name a torch dtype, got {settings.dtype!r}")
        if not isinstance(settings.device, str) or not settings.device:
            raise TypeError(f"{KWARGS}device must be a device name such as 'cpu' or 'cuda', got {settings.device!r}")
        return replace(
            settings,
            beta=check_beta(settings.beta, f"{KWARGS}beta"),
            layer=_integer(settings.layer, f"{KWARGS}layer"),
            max_length=_integer(settings.max_length, f"{KWARGS}max_length", 1, optional=True),
            batch_size=_integer(settings.batch_size, f"{KWARGS}batch_size", 1),
            num_threads=_integer(settings.num_threads, f"{KWARGS}num_threads", 1, optional=True),
        )


def check_routing(config: DictConfig, manager: str = "ABCRewardManager") -> None:
    """Raise ValueError unless verl 0.9.x will call the manager's (``manager``: its name, for the message)
    ``run_single`` and ``assemble_rm_scores``.

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
        problems.append(
            "reward.reward_model.enable=True (without it verl's agent loop places one scalar per "
            "sample on the last token and never calls assemble_rm_scores)"
        )
    if reward.reward_model.get("enable_resource_pool"):
        problems.append(
            "reward.reward_model.enable_resource_pool=False (a standalone reward pool makes verl score "
            "in the agent loop, one scalar per sample)"
        )
    if not reward.get("custom_reward_function", {}).get("path"):
        problems.append(
            f"reward.custom_reward_function.path={MODULE_PATH} and reward.custom_reward_function.name="
            "compute_score (without a path verl's worker asks the served reward model for a scalar and "
            "never calls run_single)"
        )
    if problems:
        raise ValueError(f"{manager} is not reached by this verl configuration; set " + "; ".join(problems))


def check_algorithm(config: DictConfig) -> None:
    """Raise ValueError unless verl's advantage estimator keeps per-token rewards and does not discount them.

    ``algorithm.adv_estimator`` must be one of ``TOKEN_LEVEL_ESTIMATORS``: the estimators in
    ``SEQUENCE_SUM_ESTIMATORS`` reduce each row to its sum, which equals the reward model's score for ABC's rows
    and for the sparse reward alike, so the credit would be discarded without a word; an estimator dense-rlhf has
    not read (a newer verl's, or one registered by the user) is refused too. ``algorithm.gamma`` must be 1: a row
    sums to the score only undiscounted.
    """
    algorithm = config.get("algorithm") or {}
    estimator = algorithm.get("adv_estimator", "gae")
    estimator = str(getattr(estimator, "value", estimator))
    if estimator in SEQUENCE_SUM_ESTIMATORS:
        raise ValueError(
            f"algorithm.adv_estimator={estimator} reduces each row of token-level rewards to its sum "
            "(token_level_rewards.sum(dim=-1) in verl's core_algos), so the per-token credit would be "
            f"discarded and training would equal the sparse reward; {_ESTIMATOR_FIX}"
        )
    if estimator not in TOKEN_LEVEL_ESTIMATORS:
        raise ValueError(
            f"algorithm.adv_estimator={estimator} is not one of the estimators dense-rlhf has checked "
            f"keep per-token rewards ({sorted(TOKEN_LEVEL_ESTIMATORS)}, from verl 0.9.1); "
            f"{_ESTIMATOR_FIX}"
        )
    gamma = algorithm.get("gamma", 1.0)
    if isinstance(gamma, bool) or not isinstance(gamma, numbers.Real):
        raise TypeError(f"algorithm.gamma must be a number (1.0 for per-token rewards), got {gamma!r}")
    if float(gamma) != 1.0:
        raise ValueError(
            f"algorithm.gamma={gamma}: the per-token rewards of a row sum to the reward model's score "
            "only undiscounted; set algorithm.gamma=1.0"
        )


@dataclass(frozen=True)
class ServedSettings:
    """What :class:`ServedPrefixRewardManager` and :class:`ServedABCRewardManager` read from ``reward.reward_kwargs``.

    method: "prefix" (prefix-difference rewards; ServedPrefixRewardManager's default), "abc" (ServedABCRewardManager's
    default: the server must run an ABC architecture of dense-rlhf's vLLM plugin), "sparse" or "uniform". beta,
    max_length: as in :func:`dense_rlhf.score_and_densify_text`. batch_size: most samples per request to the server.
    timeout, max_retries, backoff: the HTTP client's (:class:`dense_rlhf.integrations.vllm.ServedRewardModel`);
    verl's own reward loop retries up to 16 times for its scalar. model: the served model's name; None asks the
    server.
    """

    method: str = "prefix"
    beta: float = 0.8
    max_length: int | None = None
    batch_size: int = 64
    timeout: float = 300.0
    max_retries: int = 5
    backoff: float = 1.0
    model: str | None = None

    @classmethod
    def from_config(
        cls, config: DictConfig, manager: str = "ServedPrefixRewardManager", method: str = "prefix"
    ) -> ServedSettings:
        """The settings of ``manager`` (its name, for the messages), whose default method is ``method``."""
        kwargs = {"method": method, **dict(config.reward.get("reward_kwargs") or {})}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise ValueError(
                f"reward.reward_kwargs has keys {manager} does not know: {unknown}; it reads {sorted(known)}"
            )
        settings = cls(**kwargs)
        allowed = ("abc", "prefix", "sparse", "uniform") if method == "abc" else ("prefix", "sparse", "uniform")
        if settings.method not in allowed:
            extra = " (ABC from the server is ServedABCRewardManager's)" if settings.method == "abc" else ""
            raise ValueError(
                f"reward.reward_kwargs.method must be one of {allowed} for {manager}, got {settings.method!r}{extra}"
            )
        if settings.model is not None and (not isinstance(settings.model, str) or not settings.model):
            raise TypeError(f"{KWARGS}model must be the served model's name or null, got {settings.model!r}")
        return replace(
            settings,
            beta=check_beta(settings.beta, f"{KWARGS}beta"),
            max_length=_integer(settings.max_length, f"{KWARGS}max_length", 1, optional=True),
            batch_size=_integer(settings.batch_size, f"{KWARGS}batch_size", 1),
            timeout=_number(settings.timeout, f"{KWARGS}timeout", strict=True),
            max_retries=_integer(settings.max_retries, f"{KWARGS}max_retries", 0),
            backoff=_number(settings.backoff, f"{KWARGS}backoff"),
        )


def check_served(config: DictConfig, method: str = "prefix", manager: str = "ServedPrefixRewardManager") -> None:
    """Raise ValueError unless verl 0.9.x starts its reward-model server with vLLM and the ``token_classify`` pooler
    (``reward.reward_model.rollout.name=vllm`` and ``+reward.reward_model.rollout.engine_kwargs.vllm.pooler_config``,
    which verl passes to vLLM as ``--pooler-config``) and, for ``method="abc"``, with an ABC architecture
    (``+reward.reward_model.rollout.engine_kwargs.vllm.hf_overrides``, passed as ``--hf-overrides``)."""
    rollout = config.reward.reward_model.get("rollout") or {}
    problems = []
    if rollout.get("name") != "vllm":
        problems.append(
            f"reward.reward_model.rollout.name=vllm (got {rollout.get('name')!r}: prefix scores come from "
            "vLLM's token_classify pooling)"
        )
    engine = (rollout.get("engine_kwargs") or {}).get("vllm") or {}
    pooler = _json_value(engine.get("pooler_config"))
    task = pooler.get("task") if isinstance(pooler, Mapping) else None
    if task != "token_classify":
        problems.append(
            f"+{VERL_POOLER_CONFIG_KEY}='{POOLER_CONFIG}' (got {pooler!r}; without it vLLM's server "
            "answers /classify with one score per sample and refuses the per-token scores)"
        )
    if method == "abc":
        overrides = _json_value(engine.get("hf_overrides"))
        architectures = overrides.get("architectures") if isinstance(overrides, Mapping) else None
        if not architectures or not set(architectures) <= set(ARCHITECTURES):
            problems.append(
                f"+{VERL_HF_OVERRIDES_KEY}='{abc_hf_overrides()}', or another ABC architecture of "
                f"{sorted(ARCHITECTURES)} (got {overrides!r}; the attention row comes from dense-rlhf's vLLM plugin)"
            )
    if problems:
        raise ValueError(
            f"{manager} needs verl's reward-model server to give per-token scores; set " + "; ".join(problems)
        )


def _json_value(value):
    """A value verl passes to vLLM as JSON: given as a mapping, or as its JSON text."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return None
    return value
