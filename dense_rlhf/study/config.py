"""The study's settings and ``dense-rlhf experiment``'s options, in one module that the command (``experiment``)
and each of its studies (``length``, ``oracle``, ``frontier``, ``free_rows``) import: the SFT/reward-model setup
(``SETUP``), our PPO (``PPO``) and the paper's (``PAPER_PPO``), the parsed options (``ExperimentOptions``) and the
PPO settings they select (``ppo_settings``)."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field, replace
from typing import Literal

from dense_rlhf.cli import default_out
from dense_rlhf.rl.ppo import PPOConfig
from dense_rlhf.study import options, runs
from dense_rlhf.study.models import SetupConfig

# The study's settings (see experiments/README.md for why these values).
SETUP = SetupConfig()
PPO = PPOConfig()
# The paper's PPO: trl 0.7.4's PPOTrainer defaults with the paper's batch of 16 and 150 steps, as far as ppo.py
# expresses them: adaptive KL controller (initial coefficient 0.2, target 6, horizon 10000), minibatches of 1
# completion (trl's mini_batch_size default) for 4 epochs, no gradient clipping, Adam eps 1e-8; GAE lambda 0.95,
# gamma 1, clip 0.2 / 0.2, vf_coef 0.1, shared-trunk value head and whitened advantages are ours already.
# Not matched (experiments/README.md): the learning rate (below), dropout, the value head's initialisation, trl's
# ratio_threshold batch skipping, the unbiased variance in advantage whitening, variable response lengths.
# The learning rate stays ours: trl's 1.41e-5 was for a pretrained 124M GPT-2, and with it our tiny model gained less
# than half of what it gains in our settings within 150 steps (a pilot on other seeds, experiments/README.md).
PAPER_PPO = replace(
    PPO,
    steps=150,
    batch_size=16,
    minibatch_size=1,
    kl_coef=0.2,
    kl_target=6.0,
    kl_horizon=10000.0,
    max_grad_norm=None,
    adam_eps=1e-8,
    lam=0.95,
    lr=3e-4,
)
PPO_SETTINGS = {"ours": PPO, "paper": PAPER_PPO}


# The PPOConfig fields that the command line can set, over the --ppo setting's values.
PPO_OPTIONS = ["steps", "kl_coef", "lr", "batch_size", "whiten_rewards"]
MULTI = ("oracle", "frontier")  # the studies that run several --ppo settings


@dataclass
class ExperimentOptions:
    """``dense-rlhf experiment``'s options (besides ``PPO_OPTIONS`` and ``--rm-layers``)."""

    study: Literal["methods", "length", "oracle", "frontier", "rows"] = "methods"
    """methods: every reward method at one completion length; length: the completion-length sweep (sparse, ABC
    0.8, prefix 0.8, uniform by default); oracle: the true credit as a reward method beside sparse, ABC 0.8, prefix
    0.8 and uniform, in each --ppo setting; frontier: final score against final KL over --kl-coefs (sparse, ABC
    0.8, prefix 0.8 and the oracle in ABC's shape by default), in each --ppo setting; rows: label-free
    alternatives to ABC's attention row from the same forward, screened with the credit diagnostics (1-layer and
    2-layer reward models)"""
    seeds: int = 5
    """PPO seeds per method"""
    ppo: str | None = None
    """PPO settings: ours (the study's, default) or paper (trl 0.7.4's PPOTrainer defaults with the paper's batch
    16 and 150 steps: adaptive KL from 0.2 to a target of 6 ...); --study oracle and frontier take a
    comma-separated list (default ours,paper). --steps, --kl-coef, --lr, --batch-size and --whiten-rewards
    override the setting's values"""
    kl_coefs: str | None = None
    """KL strengths of --study frontier, comma-separated: the fixed coefficient in ours, the adaptive controller's
    initial one in the paper's (default: ours 0.025,0.05,0.1; paper 0.05,0.1,0.2)"""
    lengths: str = "10,20,40,80"
    """completion lengths of --study length"""
    methods: str | None = None
    """comma-separated reward methods (default: all but bpe-*; --study length: sparse,abc-0.8,prefix-0.8,uniform;
    --study oracle: those and the oracles)"""
    seed: int = 0
    """master seed: SFT/RM training and the PPO seeds"""
    lam: str | None = None
    """GAE lambda; a comma-separated list runs one study per value (default 0.95,0.8; --study length: one value,
    default 0.95; --study oracle: 0.95,0.8 in ours, 0.95 in the paper's)"""
    workers: int = field(default_factory=runs.default_workers)
    """parallel runs (1 torch thread each)"""
    out: str = default_out("experiment")
    """output folder (`make experiment` writes the repository's committed results, experiments/results)"""
    name: str | None = None
    """output file stem (default experiment, length_study, oracle_study, frontier or free_rows)"""
    threads: int = 1
    """torch threads of the main process (SFT/RM training); runs always use 1 each"""
    quick: bool = False
    """the demo's small SFT/RM setup (smoke test only)"""
    cache_dir: str | None = None
    """model cache (default $DENSE_RLHF_CACHE or ~/.cache/dense-rlhf)"""
    ppo_overrides: dict = field(default_factory=dict, metadata={"cli": False})
    """the PPO_OPTIONS given on the command line"""
    setup_overrides: dict = field(default_factory=dict, metadata={"cli": False})
    """the SetupConfig fields given on the command line (--rm-layers)"""


def parse_args(argv: list[str]) -> ExperimentOptions:
    p = argparse.ArgumentParser(
        prog="dense-rlhf experiment",
        description="the full multi-seed comparison of reward methods on the sentiment task",
    )
    options.add_fields(p, ExperimentOptions)
    defaults = {
        name: "(default: " + ", ".join(f"{key} {getattr(cfg, name)}" for key, cfg in PPO_SETTINGS.items()) + ")"
        for name in PPO_OPTIONS
    }
    options.add_fields(p, PPOConfig, PPO_OPTIONS, notes=defaults, override=True)
    options.add_fields(
        p, SetupConfig, ["rm_n_layer"], defaults=SETUP, flags={"rm_n_layer": "--rm-layers"}, override=True
    )
    opts, given = options.parse(p, ExperimentOptions, argv, overrides=(PPOConfig, SetupConfig))
    return replace(opts, ppo_overrides=given[PPOConfig], setup_overrides=given[SetupConfig])


def ppo_settings(args: ExperimentOptions) -> dict[str, PPOConfig]:
    """The --ppo settings by name, each with the command line's overrides applied."""
    names = [x.strip() for x in (args.ppo or ("ours,paper" if args.study in MULTI else "ours")).split(",") if x.strip()]
    for name in names:
        if name not in PPO_SETTINGS:
            raise SystemExit(f"unknown --ppo setting {name!r}; choose from {sorted(PPO_SETTINGS)}")
    if len(names) != 1 and args.study not in MULTI:
        raise SystemExit(f"--study {args.study} runs one --ppo setting")
    return {name: replace(PPO_SETTINGS[name], **args.ppo_overrides) for name in names}
