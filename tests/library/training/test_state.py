"""State folders: saved atomically, restored exactly, refused with one line when incomplete or unsafe."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from accelerate import Accelerator

from library.errors import CheckpointError
from library.training import state as state_module
from library.training.state import (
    MANIFEST_FILE,
    OPTIMIZER_FILE,
    load_training_state,
    save_training_state,
    temporary_state_path,
)

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")
COUNTERS = {"current_epoch": 1, "current_step": 3, "batches_in_epoch": 2}


def _training_objects(seed: int):
    """A small module, AdamW and a LambdaLR through accelerate, with one optimizer step taken."""
    torch.manual_seed(seed)
    accelerator = Accelerator(cpu=True)
    module = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(module.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
    accelerator.register_for_checkpointing(module)
    module(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    return accelerator, module, optimizer, scheduler


def _save(tmp_path, name="run-state"):
    accelerator, module, optimizer, scheduler = _training_objects(seed=0)
    path = tmp_path / name
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    save_training_state(accelerator, path, COUNTERS)
    return path, module, optimizer


def test_resume_restores_weights_optimizer_rng_and_counters(tmp_path):
    path, module, optimizer = _save(tmp_path)
    draws = (random.random(), np.random.rand(), torch.rand(1))
    assert not temporary_state_path(path).exists()
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator, other, other_optimizer, other_scheduler = _training_objects(seed=1)
    counters = load_training_state(accelerator, path, other_optimizer, other_scheduler, [other])
    assert counters["current_step"] == 3 and counters["batches_in_epoch"] == 2
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), other.state_dict().values()))
    moments = [o.state_dict()["state"][0]["exp_avg"] for o in (optimizer, other_optimizer)]
    assert torch.equal(*moments)
    assert (random.random(), np.random.rand(), torch.rand(1)) == draws


def _refused(tmp_path, path, match: str) -> str:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator, module, optimizer, scheduler = _training_objects(seed=1)
    with pytest.raises(CheckpointError, match=match) as caught:
        load_training_state(accelerator, path, optimizer, scheduler, [module])
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_missing_manifest_or_part_or_short_file_is_refused(tmp_path):
    path, *_ = _save(tmp_path)
    manifest = json.loads((path / MANIFEST_FILE).read_text())
    (path / "random_states_0.pkl").write_bytes(b"")  # what a killed in-place save left (issue 11)
    _refused(tmp_path, path, "random_states_0.pkl is 0 bytes")
    (path / "random_states_0.pkl").unlink()
    _refused(tmp_path, path, "random_states_0.pkl is missing")
    del manifest["files"]["random_states_0.pkl"]
    (path / MANIFEST_FILE).write_text(json.dumps(manifest))
    _refused(tmp_path, path, "lacks random_states_0.pkl")
    (path / MANIFEST_FILE).unlink()
    _refused(tmp_path, path, "incomplete")


def test_truncated_optimizer_with_matching_manifest_is_one_line(tmp_path):
    path, *_ = _save(tmp_path)
    data = (path / OPTIMIZER_FILE).read_bytes()
    (path / OPTIMIZER_FILE).write_bytes(data[: len(data) // 2])
    state_module.write_manifest(path)  # sizes agree: only the content is cut
    _refused(tmp_path, path, "optimizer.bin': truncated or corrupt")


@pytest.mark.parametrize("target", ["custom_checkpoint_0.pkl", OPTIMIZER_FILE, "random_states_0.pkl"])
def test_malicious_state_folder_runs_no_code(tmp_path, code_payload, target):
    path, *_ = _save(tmp_path)
    file, marker = code_payload
    shutil.copyfile(file, path / target)
    state_module.write_manifest(path)
    message = _refused(tmp_path, path, "refusing")
    assert target in message
    assert not marker.exists()


def test_a_save_killed_midway_keeps_the_previous_state(tmp_path, monkeypatch):
    path, module, _ = _save(tmp_path)
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def killed(folder):
        raise KeyboardInterrupt

    monkeypatch.setattr(state_module, "write_manifest", killed)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator, *_ = _training_objects(seed=2)
    with pytest.raises(KeyboardInterrupt):
        save_training_state(accelerator, path, {**COUNTERS, "current_step": 6})
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    monkeypatch.undo()
    _refused(tmp_path, temporary_state_path(path), "incomplete")
    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator, other, optimizer, scheduler = _training_objects(seed=1)
    assert load_training_state(accelerator, path, optimizer, scheduler, [other])["current_step"] == 3
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), other.state_dict().values()))


def test_a_second_save_replaces_the_first_whole(tmp_path):
    path, *_ = _save(tmp_path)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    accelerator, *_ = _training_objects(seed=3)
    save_training_state(accelerator, path, {**COUNTERS, "current_step": 9})
    assert json.loads((path / "train_state.json").read_text())["current_step"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run-state"]


def test_every_file_of_a_state_is_on_disk_before_the_rename(tmp_path, monkeypatch):
    flushed, renames = [], []
    real_replace = state_module.replace_folder

    def fsync_tree(folder):
        flushed.append(sorted(p.name for p in folder.iterdir()))

    def replace_folder(new, path):
        renames.append(len(flushed))
        real_replace(new, path)

    monkeypatch.setattr(state_module, "fsync_tree", fsync_tree)
    monkeypatch.setattr(state_module, "replace_folder", replace_folder)
    path, *_ = _save(tmp_path)
    assert renames == [1]  # flushed once, before the rename
    assert flushed[0] == sorted(p.name for p in path.iterdir())  # the complete folder, manifest included
    assert MANIFEST_FILE in flushed[0]
