"""What every script does around its ``main``: logging set-up, one-line user errors, and imports that
skip the cyclic collector's work."""

from __future__ import annotations

import gc
import logging
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

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


_imports_frozen = False


@contextmanager
def collector_paused_for_imports() -> Iterator[None]:
    """Import the heavy libraries (torch, transformers, diffusers) with Python's cyclic collector paused.

    Importing them creates a few hundred thousand objects that live as long as the process, and the
    collector traverses all of them again on every full collection it triggers while they import:
    about 1 s of a 10 s training start-up on a 2-core CPU (docs/training.md). Reference counting still
    frees everything outside a cycle. Afterwards the survivors are frozen (``gc.freeze``: never
    traversed again) once per process, and collection resumes as it was.
    """
    global _imports_frozen
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if not _imports_frozen:
            gc.freeze()
            _imports_frozen = True
        if was_enabled:
            gc.enable()


def run_cli(main: Callable[[], None]) -> None:
    """Run ``main``; a user error (:data:`USER_ERRORS`) becomes ``error: <message>`` on stderr and exit status 2."""
    configure_logging()
    try:
        main()
    except USER_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
