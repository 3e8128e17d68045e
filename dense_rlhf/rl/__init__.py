"""Small, readable RL trainers that take token-level credit, written to be read top to bottom: ``ppo`` (per-token
rewards through a critic and GAE), ``grpo`` (critic-free, per-token advantages); ``common`` holds what they share."""
