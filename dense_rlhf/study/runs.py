"""Running the study's trainings: one PPO or GRPO run from the cached SFT policy and reward model (``run_one``), and
many of them in worker processes (``run_all``). Every study command runs through here."""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch

from dense_rlhf.rl import grpo, ppo
from dense_rlhf.rl.common import Policy
from dense_rlhf.study import methods as M
from dense_rlhf.study import sentiment_task as task
from dense_rlhf.study.library_log import quiet_transformers
from dense_rlhf.study.models import SetupConfig, load_or_train, load_or_train_chat_rm

# The per-step metrics a run keeps as curves, by trainer.
PPO_CURVES = ("gt_score", "rm_score", "kl", "pg_loss", "vf_loss", "kl_coef")
GRPO_CURVES = ("gt_score", "rm_score", "kl", "pg_loss", "kl_loss")
PROMPT_SEED = 10_000  # run seed s samples its prompts from the stream seeded PROMPT_SEED + s


@dataclass(frozen=True)
class Run:
    """One training run of a study."""

    method: str
    """the run's name in the results; for PPO also its reward method (``methods.ALL_METHODS``) unless ``reward``"""
    seed: int
    """seeds torch, the sampling and the prompts"""
    setup: SetupConfig
    """the SFT policy and reward model (trained once, then read from the cache)"""
    config: ppo.PPOConfig | grpo.GRPOConfig
    """the trainer and its settings; a GRPOConfig carries its advantage scheme"""
    cache_dir: str | None = None
    """the model cache (default ``models.cache_root()``)"""
    reward: str | None = None
    """PPO's reward method where ``method`` is only a name (``grpo-study``'s ``ppo-sparse``)"""
    tags: tuple[tuple[str, object], ...] = ()
    """(key, value) pairs copied into the result: how the study groups its runs"""


def run_one(run: Run, on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train a copy of the cached SFT policy as ``run`` says; returns ``{"method", "seed", "seconds",
    "cpu_seconds", "curves"}`` and the run's tags, ``curves`` holding the per-step metrics of ``PPO_CURVES`` or
    ``GRPO_CURVES``. The reference policy is the SFT policy; ABC-D's runs capture the policy's attention."""
    codec, sft, rm, _ = load_or_train(run.setup, run.cache_dir, log=None)
    if isinstance(run.config, grpo.GRPOConfig):
        torch.manual_seed(run.seed)
        policy = Policy(copy.deepcopy(sft), codec.special_ids)
        train, score_fn, keys, options = grpo.train, M.make_grpo_score_fn(rm, codec), GRPO_CURVES, {}
    else:
        reward = run.reward or run.method
        chat_rm = load_or_train_chat_rm(run.setup, run.cache_dir, log=None)[:2] if reward in M.ALIGNED_METHODS else None
        torch.manual_seed(run.seed)
        policy = ppo.PolicyWithValue(copy.deepcopy(sft), codec.special_ids)
        train, score_fn, keys = ppo.train, M.make_score_fn(reward, rm, codec, chat_rm), PPO_CURVES
        options = {"rollout_hook": M.rollout_hook(reward)}
    t0, c0 = time.time(), time.process_time()
    history = train(
        policy,
        sft,
        task.prompt_sampler(codec, PROMPT_SEED + run.seed),
        run.setup.completion_len,
        score_fn,
        run.config,
        run.seed,
        on_step,
        **options,
    )
    return {
        "method": run.method,
        "seed": run.seed,
        "seconds": time.time() - t0,
        "cpu_seconds": time.process_time() - c0,
        "curves": {key: [h[key] for h in history] for key in keys},
        **dict(run.tags),
    }


def run_in_worker(run: Run) -> dict:
    """``run_one`` with one torch thread (the models are tiny) and no progress bars."""
    torch.set_num_threads(1)
    quiet_transformers()
    return run_one(run)


A = TypeVar("A")
R = TypeVar("R")


def _indexed(item: tuple[int, Callable, object]) -> tuple[int, object]:
    index, job, arg = item
    return index, job(arg)


def map_jobs(
    job: Callable[[A], R], args: list[A], workers: int = 1, progress: Callable[[R], None] | None = None
) -> list[R]:
    """``[job(a) for a in args]``, in this process when ``workers <= 1``, else in ``workers`` spawned processes;
    ``progress(result)`` after each as it finishes. ``job`` must be a module-level function."""
    if workers <= 1:
        results = []
        for a in args:
            results.append(job(a))
            if progress:
                progress(results[-1])
        return results
    import multiprocessing as mp

    done: dict[int, R] = {}
    with mp.get_context("spawn").Pool(workers) as pool:
        for index, res in pool.imap_unordered(_indexed, [(i, job, a) for i, a in enumerate(args)]):
            done[index] = res
            if progress:
                progress(res)
    return [done[i] for i in range(len(args))]


def run_all(runs: list[Run], workers: int = 1, progress: Callable[[dict], None] | None = None) -> list[dict]:
    """Every run's result, in the order of ``runs``, from ``workers`` processes with one torch thread each."""
    return map_jobs(run_in_worker, runs, workers, progress)


def default_workers() -> int:
    """Parallel runs: one per CPU, at most two."""
    return max(1, min(2, os.cpu_count() or 1))


def progress_printer(total: int, t0: float, describe: Callable[[dict], str]) -> Callable[[dict], None]:
    """A ``progress`` callback that prints ``n/total``, ``describe(result)``, the run's final true score (mean of
    its last 10 steps), its time and the time since ``t0``."""
    done = [0]

    def progress(res: dict) -> None:
        done[0] += 1
        tail = res["curves"]["gt_score"][-10:]
        print(
            f"  {done[0]:3d}/{total}  {describe(res)}  final true score {sum(tail) / len(tail):+.2f}  "
            f"({res['seconds']:.0f}s, {time.time() - t0:.0f}s elapsed)",
            flush=True,
        )

    return progress
