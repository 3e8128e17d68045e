"""Library chatter into a log file: the study commands' console says only what they have to say.

transformers' notices and progress bars, trl's training logs (``dense_rlhf.study.models`` sends the metric dicts
that trl would print to the ``dense_rlhf`` logger), datasets' progress bars and Python warnings (FutureWarning,
UserWarning) all go to one file, with their source; errors still reach the console as tracebacks.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from pathlib import Path

# Loggers whose records go to the file instead of the console.
LIBRARY_LOGGERS = ("transformers", "trl", "datasets", "accelerate", "torch", "dense_rlhf", "py.warnings")


@contextlib.contextmanager
def library_output_to(path: str | Path):
    """Inside the block, the libraries' log records and Python warnings are written to ``path`` (appended) and not
    to the console; everything is restored on exit."""
    from transformers.utils import logging as hf_logging

    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s"))
    saved = {}
    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        saved[name] = (logger.handlers[:], logger.propagate, logger.level)
        logger.handlers = [handler]
        logger.propagate = False
        logger.setLevel(logging.INFO if name == "dense_rlhf" else logging.WARNING)
    hf_logging.disable_progress_bar()
    datasets_bars = _datasets_progress_bars(False)
    with warnings.catch_warnings():
        warnings.simplefilter("default")  # each warning once per place, as Python shows them
        logging.captureWarnings(True)
        try:
            yield Path(path)
        finally:
            logging.captureWarnings(False)
            _datasets_progress_bars(datasets_bars)
            for name, (handlers, propagate, level) in saved.items():
                logger = logging.getLogger(name)
                logger.handlers, logger.propagate = handlers, propagate
                logger.setLevel(level)
            handler.close()


def quiet_transformers() -> None:
    """No weight-loading / shard-writing progress bars from transformers (they drown the commands' output)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()


def _datasets_progress_bars(enabled: bool) -> bool:
    """Turns datasets' progress bars on or off; returns whether they were on (False without datasets)."""
    try:
        from datasets.utils import logging as ds_logging
    except ImportError:
        return False
    was = ds_logging.is_progress_bar_enabled()
    (ds_logging.enable_progress_bar if enabled else ds_logging.disable_progress_bar)()
    return was
