from dense_rlhf.capture.attention import *  # noqa: F401,F403
from dense_rlhf.capture.attention import __all__, _pooled_scores, _score_of  # noqa: F401
