"""One run per ``--output_dir``/``--output_name``: a lock file naming the run, and the leftovers of killed runs.

Two runs writing the same names would overwrite each other's checkpoints and state folders without a
word. The lock is a file created exclusively (``O_EXCL``: atomic on local and NFSv3+ file systems)
that names host and process; a lock whose process is gone on this host is stale and taken over. A
lock from another host cannot be checked and is reported with its path, to be removed by hand.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

from library.errors import ConfigError
from library.training.state import previous_state_path

logger = logging.getLogger(__name__)


def lock_path(output_dir: Path, output_name: str) -> Path:
    return output_dir / f".{output_name}.lock"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def _holder(path: Path) -> dict | None:
    """Who holds the lock, or None when the file is gone or unreadable (a run killed while writing it)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def acquire(output_dir: Path, output_name: str) -> Path:
    """Create the lock file; one line naming the other run if it is alive."""
    path = lock_path(output_dir, output_name)
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = _holder(path)
            if holder and holder.get("host") != me["host"]:
                raise ConfigError(
                    f"--output_dir '{output_dir}' --output_name '{output_name}' is in use by process "
                    f"{holder.get('pid')} on {holder.get('host')} since {holder.get('started')}; choose another "
                    f"--output_name, or delete {path} if that run is gone"
                ) from None
            if holder and holder.get("pid") != me["pid"] and _process_alive(int(holder.get("pid", -1))):
                raise ConfigError(
                    f"--output_dir '{output_dir}' --output_name '{output_name}' is in use by process "
                    f"{holder['pid']} (started {holder.get('started')}); wait for it or choose another --output_name"
                ) from None
            logger.info("taking over the stale lock %s (%s)", path, holder)
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise ConfigError(f"cannot lock {path}: another run keeps creating it")


def release(path: Path) -> None:
    """Remove the lock if it is still ours."""
    holder = _holder(path)
    if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)


def _leftover_pattern(output_name: str) -> re.Pattern:
    """Temporary names of our atomic writes for this output name: ``.tiny.safetensors.x1y2.tmp``,
    ``.tiny-step00000002-state.tmp``, ``.tiny-000001-state.old.tmp`` (kohya's numbering only, so that
    another output name sharing the prefix keeps its files)."""
    name = re.escape(output_name)
    return re.compile(rf"^\.{name}(?:-(?:\d{{6}}|step\d{{8}}))?(?:-state|\.[A-Za-z0-9]+)?(?:\.[^/]*)?\.tmp$")


def remove_leftovers(output_dir: Path, output_name: str) -> list[Path]:
    """Delete the temporary files and folders a killed run of this output name left; returns them.

    A previous state folder that a killed save had moved aside (its new one not yet in place) is
    moved back instead. Only call this while holding the lock.
    """
    if not output_dir.is_dir():
        return []
    pattern = _leftover_pattern(output_name)
    removed = []
    for entry in sorted(output_dir.iterdir()):
        if not pattern.match(entry.name):
            continue
        if entry.name.endswith("-state.old.tmp"):
            final = entry.parent / entry.name[1 : -len(".old.tmp")]
            if not final.exists() and previous_state_path(final) == entry:
                os.replace(entry, final)
                logger.warning("restored %s, which a killed save had moved aside", final)
                continue
        shutil.rmtree(entry) if entry.is_dir() else entry.unlink()
        removed.append(entry)
    if removed:
        logger.warning("removed %d leftovers of a killed run: %s", len(removed), [p.name for p in removed])
    return removed


@contextlib.contextmanager
def hold_output(output_dir: str | os.PathLike, output_name: str, is_main_process: bool = True) -> Iterator[None]:
    """Hold the output lock for the block (main process only) and clear leftovers of killed runs."""
    if not is_main_process:
        yield
        return
    directory = Path(output_dir)
    path = acquire(directory, output_name)
    try:
        remove_leftovers(directory, output_name)
        yield
    finally:
        release(path)
