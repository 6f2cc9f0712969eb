"""LoRA file I/O: kohya's sshs hashes, dtype casting, atomic writes, clear errors."""

import hashlib
import os
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import save

from networks.lora_file import LoRAFileError, load_lora_file, save_lora_file, sshs_hashes


def _lora_sd(rank=4, width=40000):
    g = torch.Generator().manual_seed(0)
    return {
        "lora_unet_a.lora_down.weight": torch.randn(rank, width, generator=g),
        "lora_unet_a.lora_up.weight": torch.randn(width, rank, generator=g),
        "lora_unet_a.alpha": torch.tensor(2.0),
    }


def test_hashes_follow_kohyas_definition():
    sd = _lora_sd()
    metadata = {"ss_network_dim": "4", "modelspec.title": "x"}
    blob = save(sd, {"ss_network_dim": "4"})  # kohya hashes a serialization with only ss_* metadata
    header = int.from_bytes(blob[:8], "little")
    expected_model = hashlib.sha256(blob[8 + header :]).hexdigest()
    expected_legacy = hashlib.sha256(blob[0x100000 : 0x100000 + 0x10000]).hexdigest()[:8]
    assert sshs_hashes(sd, metadata) == (expected_model, expected_legacy)
    assert len(blob) > 0x110000  # the legacy window is inside the file


def test_saved_file_has_hashes_of_its_own_data(tmp_path):
    path = tmp_path / "x.safetensors"
    written = save_lora_file(path, _lora_sd(), {"ss_network_dim": "4"}, dtype=torch.float16)
    loaded, metadata = load_lora_file(path)
    assert metadata == written
    assert all(v.dtype == torch.float16 for v in loaded.values())  # alpha cast too, like kohya
    data = path.read_bytes()
    header = int.from_bytes(data[:8], "little")
    assert metadata["sshs_model_hash"] == hashlib.sha256(data[8 + header :]).hexdigest()


def test_small_files_get_the_empty_legacy_hash():
    assert sshs_hashes(_lora_sd(width=8))[1] == hashlib.sha256(b"").hexdigest()[:8]


def test_torch_formats_have_no_metadata(tmp_path):
    save_lora_file(tmp_path / "x.pt", _lora_sd(width=8), {"ss_network_dim": "4"})
    loaded, metadata = load_lora_file(tmp_path / "x.pt")
    assert metadata == {} and set(loaded) == set(_lora_sd(width=8))


def test_errors_name_the_file_and_leave_nothing_behind(tmp_path):
    with pytest.raises(LoRAFileError, match="x.txt"):
        save_lora_file(tmp_path / "x.txt", _lora_sd(width=8))
    assert list(tmp_path.iterdir()) == []
    broken = tmp_path / "broken.safetensors"
    save_lora_file(broken, _lora_sd(width=8))
    broken.write_bytes(broken.read_bytes()[:50])
    with pytest.raises(LoRAFileError, match="broken.safetensors") as err:
        load_lora_file(broken)
    assert "\n" not in str(err.value)


def test_saved_file_gets_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        save_lora_file(tmp_path / "x.safetensors", _lora_sd(width=8))
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x.safetensors").stat().st_mode) == 0o644


def _record_flushes(monkeypatch):
    """Log every fsync and rename in order, naming the file or folder each one touched."""
    import networks.lora_file as lora_file

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(lora_file.os, "fsync", fsync)
    monkeypatch.setattr(lora_file.os, "replace", replace)
    return events


def test_saves_reach_the_disk_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    events = _record_flushes(monkeypatch)
    target = tmp_path / "out.safetensors"
    save_lora_file(target, _lora_sd(width=8))
    (kind, flushed), (_, renamed_to), (_, folder) = events
    assert kind == "fsync" and Path(flushed).name.startswith(".out.safetensors.")  # the data, under its temporary name
    assert renamed_to == str(target)
    assert folder == str(tmp_path)


def test_caches_may_skip_the_flush(tmp_path, monkeypatch):
    from networks.lora_file import atomic_path

    events = _record_flushes(monkeypatch)
    with atomic_path(tmp_path / "cache.npz", durable=False) as tmp:
        tmp.write_bytes(b"x")
    assert [kind for kind, _ in events] == ["replace"]
    assert (tmp_path / "cache.npz").read_bytes() == b"x"
