"""How factmem's processes keep the libraries quiet: their loggers at ERROR, and the bars
transformers draws when it loads or saves weights (with --no-progress). The CLI and the
--jobs worker processes (factmem.jobs) both ask this."""

from __future__ import annotations

import logging

QUIET_LOGGERS = ("transformers", "accelerate", "datasets", "urllib3", "filelock", "httpx",
                 "huggingface_hub")


def quiet_library_loggers() -> None:
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)


def quiet_library_bars() -> None:
    """--no-progress also quiets the bars transformers draws when it loads or saves weights."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
