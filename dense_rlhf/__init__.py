"""dense-rlhf: dense per-token RLHF rewards for free, from the reward model's own forward: Attention-Based Credit
(its attention) and prefix-difference rewards (its score at every position).

The library is what this module exports. ``dense_rlhf.rl`` holds the small trainers, ``dense_rlhf.study`` the
synthetic task and study behind ``dense-rlhf demo`` / ``experiment``, ``dense_rlhf.bench`` the microbenchmarks;
none of them is imported here, and neither is transformers (``capture`` and ``align`` import it when first
used).
"""

from dense_rlhf._version import __version__
from dense_rlhf.align import score_and_densify_text
from dense_rlhf.capture import capture_prefix_scores, capture_reward_attention, score_and_densify, score_with_credit
from dense_rlhf.ops import dense_rewards, prefix_rewards, sparse_rewards, uniform_rewards

__all__ = ["dense_rewards", "prefix_rewards", "sparse_rewards", "uniform_rewards"]
__all__ += [
    "capture_reward_attention",
    "capture_prefix_scores",
    "score_and_densify",
    "score_with_credit",
    "score_and_densify_text",
    "__version__",
]
