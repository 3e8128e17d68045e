from dense_rlhf.align.scoring import *  # noqa: F401,F403
from dense_rlhf.align.scoring import __all__, _finish_text, _prepare_text, _score_text  # noqa: F401
