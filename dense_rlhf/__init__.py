"""dense-rlhf: Attention-Based Credit (dense per-token RLHF rewards from the reward model's attention)."""

from dense_rlhf.ops import dense_rewards, sparse_rewards, uniform_rewards
from dense_rlhf.capture import capture_reward_attention, score_and_densify

__all__ = ["dense_rewards", "sparse_rewards", "uniform_rewards"]
__all__ += ["capture_reward_attention", "score_and_densify"]
__version__ = "0.1.0"
