"""The loop's --initial_step/--initial_epoch/--skip_until_initial_step and schedule-free train/eval switching."""

from pathlib import Path

import pytest
import schedulefree
import torch
from accelerate import Accelerator
from torch.utils.data import DataLoader

from library.errors import ConfigError
from library.training.loop import Cadence, Schedule, TrainingRun

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


class RecordingTask:
    """A one-parameter task that records the batches it trains on and the optimizer's mode at each event."""

    def __init__(self, optimizer_box: list):
        self.weight = torch.nn.Parameter(torch.ones(1))
        self.optimizer_box = optimizer_box
        self.batches: list[int] = []
        self.saves: list[tuple[str, bool]] = []
        self.modes: list[tuple[str, bool]] = []

    def _train_mode(self) -> bool | None:
        groups = self.optimizer_box[0].param_groups if self.optimizer_box else [{}]
        return groups[0].get("train_mode")

    def trainable_parameters(self):
        return [self.weight]

    def checkpoint_objects(self):
        return []

    def on_epoch_start(self, epoch):
        pass

    def on_step_start(self, step):
        pass

    def training_step(self, batch):
        self.batches.append(int(batch.item()))
        self.modes.append(("step", self._train_mode()))
        return (self.weight * batch.float()).sum(), {}

    def after_optimizer_step(self):
        return {}

    def save_model(self, path: Path, epoch: int, step: int):
        self.saves.append((path.name, self._train_mode()))

    def sample(self, epoch, step):
        self.modes.append(("sample", self._train_mode()))

    def validate(self):
        self.modes.append(("validate", self._train_mode()))
        return {}


def _run(tmp_path, optimizer_class=torch.optim.SGD, max_steps=9, **cadence):
    """6 batches an epoch, batch i holding the number i."""
    accelerator = Accelerator(cpu=True)
    box: list = []
    task = RecordingTask(box)
    optimizer = optimizer_class([task.weight], lr=0.1)
    if hasattr(optimizer, "train"):
        optimizer.train()
    box.append(optimizer)
    loader = DataLoader(list(range(6)), batch_size=1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    optimizer, loader, scheduler = accelerator.prepare(optimizer, loader, scheduler)
    schedule = Schedule(max_train_steps=max_steps, num_epochs=2, updates_per_epoch=6)
    cadence = Cadence(output_dir=tmp_path, output_name="x", extension="safetensors", **cadence)
    run = TrainingRun(accelerator, task, loader, optimizer, scheduler, schedule, cadence, ["unet"])
    return run, task


def test_skip_until_initial_step_trains_on_the_batches_an_uninterrupted_run_would(tmp_path):
    run, task = _run(tmp_path, save_every_n_steps=4)
    run.start_at(initial_step=4, initial_epoch=None, skip_batches=True)
    run.run()
    assert task.batches == [4, 5, 0, 1, 2]  # steps 5..9: the rest of epoch 1, then epoch 2
    assert [name for name, _ in task.saves] == ["x-step00000008.safetensors", "x.safetensors"]


def test_initial_step_without_skipping_only_moves_the_counters(tmp_path):
    run, task = _run(tmp_path)
    run.start_at(initial_step=4, initial_epoch=None, skip_batches=False)
    assert (run.global_step, run.epoch, run.step_in_epoch) == (4, 0, 0)
    run.run()
    assert task.batches == [0, 1, 2, 3, 4]  # epoch 1 from its start, stopping at step 9


def test_initial_epoch_starts_at_that_epochs_first_step(tmp_path):
    run, task = _run(tmp_path)
    run.start_at(initial_step=None, initial_epoch=2, skip_batches=True)
    assert (run.global_step, run.epoch, run.step_in_epoch) == (6, 1, 0)
    run.run()
    assert task.batches == [0, 1, 2]
    with pytest.raises(ConfigError, match="below --max_train_steps"):
        _run(tmp_path)[0].start_at(initial_step=9, initial_epoch=None, skip_batches=False)


def test_schedule_free_optimizer_trains_in_train_mode_and_saves_samples_validates_in_eval_mode(tmp_path):
    run, task = _run(
        tmp_path, optimizer_class=schedulefree.SGDScheduleFree, max_steps=6, save_every_n_steps=3,
        sample_every_n_steps=3, validate_every_n_steps=3,
    )  # fmt: skip
    run.run()
    assert {mode for event, mode in task.modes if event == "step"} == {True}
    assert {mode for event, mode in task.modes if event != "step"} == {False}
    assert task.saves == [("x-step00000003.safetensors", False), ("x.safetensors", False)]
