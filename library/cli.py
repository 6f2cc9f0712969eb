"""What every script does around its ``main``: logging set-up and one-line user errors."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable

from library.errors import SuiteError
from networks.errors import NetworkError

# networks/ cannot import library/, so its input errors (--network_args, weight files) have their own bases.
USER_ERRORS = (SuiteError, NetworkError)  # LoRAFileError is a NetworkError


def configure_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes and diffusers log CUDA-only notes on CPU machines (bitsandbytes, imported by every
    # diffusers import, asks for the optional `kernels` package on each run); keep the console readable.
    for noisy in ("bitsandbytes", "diffusers.models.modeling_utils", "torch.distributed"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def apply_console_log_flags(level: str | None, log_file: str | None) -> None:
    """kohya's ``--console_log_level`` and ``--console_log_file`` (the console format is always plain here)."""
    root = logging.getLogger()
    if level:
        root.setLevel(level)
    if log_file:
        handler = logging.FileHandler(log_file, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


def run_cli(main: Callable[[], None]) -> None:
    """Run ``main``; a user error (:data:`USER_ERRORS`) becomes ``error: <message>`` on stderr and exit status 2."""
    configure_logging()
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
