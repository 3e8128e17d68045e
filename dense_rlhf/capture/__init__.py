"""What a reward model's ordinary forward gives for free: its attention rows from the reward position (for ABC),
without ``output_attentions``, and its score at every position (for prefix-difference rewards).

- :func:`capture_reward_attention` (:mod:`~dense_rlhf.capture.attention`): each head's attention row from the
  reward position, computed in float32 (:mod:`~dense_rlhf.capture.rows`) inside the model's own attention
  implementation, which transformers' interfaces route through a capturing function
  (:mod:`~dense_rlhf.capture.interface`).
- :func:`capture_prefix_scores` (:mod:`~dense_rlhf.capture.prefix`): the score head's output at every position.
- :func:`score_and_densify` and :func:`score_with_credit` (:mod:`~dense_rlhf.capture.scoring`): one forward, the
  score and the per-token rewards or ABC's credit.
"""

from dense_rlhf.capture.attention import RewardAttentionCapture, capture_reward_attention
from dense_rlhf.capture.prefix import PrefixScoreCapture, capture_prefix_scores
from dense_rlhf.capture.scoring import score_and_densify, score_with_credit

__all__ = [
    "RewardAttentionCapture",
    "PrefixScoreCapture",
    "capture_reward_attention",
    "capture_prefix_scores",
    "score_and_densify",
    "score_with_credit",
]
