"""Small, readable RL trainers that take per-token rewards (``ppo``), written to be read top to bottom."""
