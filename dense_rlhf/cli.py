"""The ``dense-rlhf`` command: ``demo`` (the main job), ``experiment`` (the full study), ``grpo-study`` (GRPO with
ABC's token-level credit) and ``bench``."""

from __future__ import annotations

import importlib
import sys

_COMMANDS = {
    "demo": ("dense_rlhf.study.demo", "train a small RLHF setup and compare sparse rewards with ABC"),
    "experiment": ("dense_rlhf.study.experiment", "the full multi-seed comparison of reward methods"),
    "grpo-study": ("dense_rlhf.study.grpo_study", "GRPO with ABC's token-level advantages beside PPO"),
    "bench": ("dense_rlhf.bench.run", "microbenchmarks of dense_rewards against the alternatives"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in _COMMANDS:
        print("usage: dense-rlhf {" + ",".join(_COMMANDS) + "} [options]\n")
        for name, (_, text) in _COMMANDS.items():
            print(f"  {name:<11} {text}")
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    module = importlib.import_module(_COMMANDS[argv[0]][0])
    return int(module.main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
