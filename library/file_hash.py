"""Whole-file SHA-256 of the base model, hashed on another core while the run starts.

kohya's metadata carries the base model's full-file SHA-256 (``ss_new_sd_model_hash``): 2 GB of
SD1.5 or 7 GB of SDXL read and hashed before the first step (about 1.5 s for SD1.5 here), in
kohya as a step of its own. hashlib releases the GIL while it hashes, so a thread started as soon
as the arguments are parsed hashes the file while Python imports the libraries and loads the
model; the metadata waits for it only if it is not done. Standard library only: it is imported
before anything heavy.
"""

from __future__ import annotations

import hashlib
import os
import threading
from concurrent.futures import Future

_started: dict[tuple, Future] = {}
_lock = threading.Lock()


def sha256_file(path: str | os.PathLike) -> str:
    """The file's SHA-256, computed now."""
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _identity(path: str | os.PathLike) -> tuple:
    """The file as it is now: a rewritten file (new size or mtime) is hashed again."""
    stat = os.stat(path)
    return os.path.realpath(path), stat.st_size, stat.st_mtime_ns


def prefetch_sha256(path: str | os.PathLike | None) -> None:
    """Start hashing ``path`` in a daemon thread (nothing for a folder, a missing file or one already started)."""
    if not path or not os.path.isfile(path):
        return
    key = _identity(path)
    with _lock:
        if key in _started:
            return
        future: Future = Future()
        _started[key] = future

    def run() -> None:
        try:
            future.set_result(sha256_file(path))
        except BaseException as err:  # reported by file_sha256, which hashes again and raises there
            future.set_exception(err)

    threading.Thread(target=run, name="sha256-prefetch", daemon=True).start()


def file_sha256(path: str | os.PathLike) -> str:
    """The file's SHA-256: the prefetched one if a prefetch of this very file succeeded, else computed now."""
    with _lock:
        future = _started.get(_identity(path))
    if future is not None and future.exception() is None:
        return future.result()
    return sha256_file(path)


def prefetch_model_hashes(args) -> None:
    """Start hashing the files whose hashes the metadata records: ``--pretrained_model_name_or_path``, ``--vae``."""
    for path in (getattr(args, "pretrained_model_name_or_path", None), getattr(args, "vae", None)):
        prefetch_sha256(path)
