"""One run per output name: live locks refuse, stale ones are taken over; killed runs' leftovers go."""

import json
import os
import socket
import subprocess
import sys

import pytest

from library.errors import ConfigError
from library.training.output_lock import acquire, hold_output, lock_path, release, remove_leftovers


def _write_lock(tmp_path, pid: int, host: str | None = None) -> None:
    holder = {"pid": pid, "host": host or socket.gethostname(), "started": "2026-01-01 00:00:00"}
    lock_path(tmp_path, "tiny").write_text(json.dumps(holder))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_a_live_run_on_the_same_output_is_refused_another_name_is_not(tmp_path):
    _write_lock(tmp_path, os.getppid())  # a process that is certainly alive
    with pytest.raises(ConfigError, match=f"in use by process {os.getppid()}") as caught:
        acquire(tmp_path, "tiny")
    assert "\n" not in str(caught.value)
    release(acquire(tmp_path, "tiny2"))


def test_a_lock_from_another_host_is_refused_naming_the_file(tmp_path):
    _write_lock(tmp_path, 1, host="elsewhere")
    with pytest.raises(ConfigError, match="on elsewhere.*delete .*tiny.lock"):
        acquire(tmp_path, "tiny")


@pytest.mark.parametrize("content", ["dead", "empty"])
def test_stale_locks_are_taken_over_and_released(tmp_path, content):
    if content == "dead":
        _write_lock(tmp_path, _dead_pid())
    else:
        lock_path(tmp_path, "tiny").write_text("")  # killed between creating and writing it
    path = acquire(tmp_path, "tiny")
    assert json.loads(path.read_text())["pid"] == os.getpid()
    release(path)
    assert not path.exists()


def test_leftovers_of_this_name_are_removed_and_a_moved_aside_state_restored(tmp_path):
    leftovers = [".tiny.safetensors.k2j3.tmp", ".tiny-step00000004.safetensors.a1.tmp", ".tiny-000002-state.tmp"]
    kept = ["tiny.safetensors", ".tiny2.safetensors.ab.tmp", ".other-state.tmp", "tiny-state", ".write-probe-1.tmp"]
    for name in leftovers + kept:
        (tmp_path / name).mkdir() if name.endswith("state") or "state.tmp" in name else (tmp_path / name).touch()
    (tmp_path / ".tiny-step00000002-state.old.tmp").mkdir()  # a save killed between its two renames
    (tmp_path / ".tiny-step00000002-state.old.tmp" / "optimizer.bin").write_bytes(b"x")
    removed = remove_leftovers(tmp_path, "tiny")
    assert sorted(p.name for p in removed) == sorted(leftovers)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["tiny-step00000002-state"])
    assert (tmp_path / "tiny-step00000002-state" / "optimizer.bin").read_bytes() == b"x"


def test_hold_output_releases_on_errors(tmp_path):
    with pytest.raises(RuntimeError), hold_output(tmp_path, "tiny"):
        assert lock_path(tmp_path, "tiny").is_file()
        raise RuntimeError
    assert not lock_path(tmp_path, "tiny").exists()
