"""The study that demonstrates ABC: a synthetic sentiment task with known per-token credit, its SFT policy and
reward model, the reward methods compared, multi-seed PPO runs and their statistics, and the ``demo`` and
``experiment`` subcommands. Not part of the library API; it needs the ``demo`` extra (transformers, trl,
datasets, matplotlib, rich)."""
