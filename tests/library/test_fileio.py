"""Reading torch checkpoints never runs code from the file; genuine Lightning-era files still load."""

import importlib.util
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from library.errors import CheckpointError
from library.fileio import PickledStandIn, read_state_dict, torch_load_weights

WEIGHTS = {"model.diffusion_model.out.weight": torch.arange(6.0).reshape(2, 3), "first.bias": torch.ones(3)}


def _write_with_python(script: str, *paths: Path) -> None:
    """Run ``script`` in a fresh interpreter (its sys.path holds ``paths``), as another machine would."""
    code = "import sys\n" + "".join(f"sys.path.insert(0, {str(p)!r})\n" for p in paths) + textwrap.dedent(script)
    subprocess.run([sys.executable, "-c", code], check=True)


def _payload_module(tmp_path: Path, marker: Path) -> Path:
    """A module whose import and whose functions create ``marker``: loading must touch neither."""
    folder = tmp_path / "payload_mods"
    folder.mkdir()
    (folder / "payload_mod.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n"
        "def run(path):\n    Path(path).write_text('called')\n"
    )
    return folder


MALICIOUS_CALLS = {
    "builtins.exec": "(builtins.exec, (f'open({marker!r}, \"w\").close()',))",
    "os.system": "(os.system, (f'touch {marker}',))",
    "subprocess.Popen": "(subprocess.Popen, (['touch', marker],))",
}
CASES = [(call, proto, container) for call in MALICIOUS_CALLS for proto in (2, 4) for container in ("zip", "raw")]


@pytest.fixture(scope="module")
def malicious_ckpts(tmp_path_factory):
    """Every case's ``.ckpt`` (written in one interpreter) and the marker file its payload would create."""
    root = tmp_path_factory.mktemp("malicious")
    lines = ["import builtins, os, pickle, subprocess, torch"]
    for index, (call, protocol, container) in enumerate(CASES):
        marker, ckpt = root / f"marker{index}", root / f"model{index}.ckpt"
        lines += [
            f"marker = {str(marker)!r}",
            f"class Payload{index}:",
            f"    def __reduce__(self):\n        return {MALICIOUS_CALLS[call]}",
            f"content = {{'state_dict': {{'w': torch.ones(2)}}, 'payload': Payload{index}()}}",
            f"torch.save(content, {str(ckpt)!r}, pickle_protocol={protocol})"
            if container == "zip"
            else f"pickle.dump(Payload{index}(), open({str(ckpt)!r}, 'wb'), protocol={protocol})",
        ]
    _write_with_python("\n".join(lines))
    return root


@pytest.mark.parametrize(("index", "case"), enumerate(CASES), ids=["-".join(map(str, c)) for c in CASES])
def test_malicious_ckpt_runs_no_code_and_fails_with_one_line(malicious_ckpts, index, case):
    ckpt = malicious_ckpts / f"model{index}.ckpt"
    with pytest.raises(CheckpointError) as caught:
        read_state_dict(ckpt)
    assert not (malicious_ckpts / f"marker{index}").exists()
    message = str(caught.value)
    assert "\n" not in message and str(ckpt) in message


def test_unknown_globals_become_inert_stand_ins_even_when_importable(tmp_path, monkeypatch):
    """A module the loading process could import is neither imported nor called; the weights load."""
    marker, ckpt = tmp_path / "marker", tmp_path / "model.ckpt"
    modules = _payload_module(tmp_path, marker)
    _write_with_python(
        f"""
        import torch
        import payload_mod
        from pathlib import Path
        Path({str(marker)!r}).unlink()
        class Payload:
            def __reduce__(self):
                return (payload_mod.run, ({str(marker)!r},))
        torch.save({{"state_dict": {{"w": torch.ones(2)}}, "payload": Payload()}}, {str(ckpt)!r})
        """,
        modules,
    )
    monkeypatch.syspath_prepend(str(modules))
    loaded = torch_load_weights(ckpt)
    assert not marker.exists()
    assert "payload_mod" not in sys.modules
    assert isinstance(loaded["payload"], PickledStandIn) and loaded["payload"].pickled_name == "payload_mod.run"
    assert torch.equal(read_state_dict(ckpt)["w"], torch.ones(2))


def _write_lightning_ckpt(tmp_path: Path, ckpt: Path, legacy: bool) -> None:
    """An SD1-style .ckpt as PyTorch Lightning wrote them: callbacks keyed by class, numpy counters, hparams."""
    fake = tmp_path / "fake_lightning"
    package = fake / "pytorch_lightning" / "callbacks"
    package.mkdir(parents=True)
    (fake / "pytorch_lightning" / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    (package / "model_checkpoint.py").write_text(
        "class ModelCheckpoint:\n    def __init__(self):\n        self.monitor = 'val/loss'\n"
    )
    torch.save(WEIGHTS, tmp_path / "weights.pt")
    _write_with_python(
        f"""
        import argparse, pathlib, numpy as np, torch
        from pytorch_lightning.callbacks.model_checkpoint import ModelCheckpoint
        callback_state = {{"monitor": "val/loss", "best_model_score": torch.tensor(0.12),
                           "dirpath": pathlib.PurePosixPath("/logs/checkpoints")}}
        torch.save(
            {{"epoch": np.int64(6), "global_step": np.int64(470000), "pytorch-lightning_version": "1.4.2",
              "state_dict": torch.load({str(tmp_path / "weights.pt")!r}),
              "callbacks": {{ModelCheckpoint: callback_state}}, "hparams": argparse.Namespace(lr=1e-4),
              "trainer": ModelCheckpoint(), "optimizer_states": [], "lr_schedulers": []}},
            {str(ckpt)!r}, _use_new_zipfile_serialization={not legacy},
        )
        """,
        fake,
    )


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-format"])
def test_sd1_ckpt_with_lightning_objects_loads_without_lightning(tmp_path, legacy):
    assert importlib.util.find_spec("pytorch_lightning") is None  # the classes cannot be imported here
    ckpt = tmp_path / "sd-v1.ckpt"
    _write_lightning_ckpt(tmp_path, ckpt, legacy)
    loaded = read_state_dict(ckpt)
    assert set(loaded) == set(WEIGHTS) and all(torch.equal(loaded[k], WEIGHTS[k]) for k in WEIGHTS)
    whole = torch_load_weights(ckpt)
    (callback_class,) = whole["callbacks"]
    assert callback_class.pickled_name == "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"
    assert isinstance(whole["trainer"], callback_class) and whole["trainer"].pickled_state == {"monitor": "val/loss"}


def test_truncated_ckpt_is_one_line(tmp_path):
    ckpt = tmp_path / "cut.ckpt"
    torch.save(WEIGHTS, ckpt)
    ckpt.write_bytes(ckpt.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="cut.ckpt"):
        read_state_dict(ckpt)


def test_plain_pickle_is_refused_as_one_line(tmp_path):
    path = tmp_path / "w.pt"
    with open(path, "wb") as f:
        pickle.dump({"w": 1}, f)  # not a torch file: refused by torch's magic-number check, as one line
    with pytest.raises(CheckpointError, match="w.pt"):
        read_state_dict(path)


def test_atomic_directory_flushes_every_file_and_folder_before_the_rename(tmp_path, monkeypatch):
    import networks.lora_file as lora_file
    from library.fileio import atomic_directory

    flushed, real_fsync = [], os.fsync

    def fsync(fd):
        flushed.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    monkeypatch.setattr(lora_file.os, "fsync", fsync)
    with atomic_directory(tmp_path / "model") as tmp:
        (tmp / "unet").mkdir()
        (tmp / "unet" / "weights.bin").write_bytes(b"w")
        (tmp / "model_index.json").write_text("{}")
        temporary_name = tmp.name
    assert {"weights.bin", "model_index.json", "unet", temporary_name} <= set(flushed)
    assert flushed[-1] == tmp_path.name  # the parent, after the rename
    assert (tmp_path / "model" / "unet" / "weights.bin").read_bytes() == b"w"


def test_a_zip_format_ckpt_is_mapped_not_read_and_a_legacy_one_still_loads(tmp_path, monkeypatch):
    """Telling a .ckpt's family (is_sdxl_model_path) or loading it must not read the whole file first."""
    calls, real_load = [], torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("mmap", False))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    for legacy in (False, True):
        ckpt = tmp_path / f"w{int(legacy)}.ckpt"
        torch.save({"state_dict": WEIGHTS}, ckpt, _use_new_zipfile_serialization=not legacy)
        for mmap in (True, False):
            calls.clear()
            loaded = read_state_dict(ckpt, mmap=mmap)
            assert all(torch.equal(loaded[k], WEIGHTS[k]) for k in WEIGHTS)
            assert calls == [mmap and not legacy]  # torch maps only zip-format files


def _mapped_from(path) -> list[tuple[int, int]]:
    """Address ranges of ``path``'s memory mappings in this process."""
    ranges = []
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split()
        if len(fields) >= 6 and fields[5] == str(path):
            start, end = (int(part, 16) for part in fields[0].split("-"))
            ranges.append((start, end))
    return ranges


def test_tensors_read_as_stored_stay_mapped_when_others_are_cast(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "mixed_use.safetensors"
    stored = {f"unet.{i}": torch.randn(256, 256).half() for i in range(4)}
    stored |= {f"vae.{i}": torch.randn(256, 256).half() for i in range(2)}
    save_file(stored, path)
    loaded = read_state_dict(path, dtype=lambda key: torch.float32 if key.startswith("vae.") else None)
    assert set(loaded) == set(stored)
    ranges = _mapped_from(path.resolve())
    for key, tensor in loaded.items():
        assert torch.equal(tensor, stored[key].to(tensor.dtype))
        inside = any(start <= tensor.data_ptr() < end for start, end in ranges)
        assert inside == key.startswith("unet."), key  # as stored: the file's pages; cast: a copy
        assert tensor.dtype == (torch.float32 if key.startswith("vae.") else torch.float16)
