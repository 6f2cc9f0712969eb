"""kohya's TensorBoard scalars: names, values and x-axes, read back from the event file of a real run."""

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import train_network
from library.training.trackers import LossRecorder, lr_logs
from tests.test_train_network import base_argv


def test_loss_recorder_is_the_mean_of_the_last_epoch_of_batches():
    recorder = LossRecorder()
    for index, loss in enumerate([1.0, 2.0, 3.0]):
        recorder.add(0, index, loss)
    assert recorder.moving_average == pytest.approx(2.0)
    recorder.add(1, 0, 7.0)  # epoch 2 replaces batch 0's loss: (7 + 2 + 3) / 3
    assert recorder.moving_average == pytest.approx(4.0)


def test_lr_names_include_kohyas_for_else_duplicates():
    groups = [{"lr": 1e-4}, {"lr": 2e-4}]
    assert lr_logs([1e-4, 2e-4], ["textencoder", "unet"], groups, "AdamW", False) == {
        "lr/textencoder": 1e-4,
        "lr/unet": 2e-4,
        "lr/group1": 2e-4,
    }
    assert lr_logs([2e-4], ["unet"], groups[1:], "AdamW8bit", True) == {"lr/unet": 2e-4, "lr/group0": 2e-4}


def test_d_adaptive_optimizers_log_d_times_lr():
    from prodigyopt import Prodigy

    params = [torch.nn.Parameter(torch.ones(4)), torch.nn.Parameter(torch.ones(4))]
    optimizer = Prodigy([{"params": params[:1], "lr": 1.0}, {"params": params[1:], "lr": 0.5}])
    for group in optimizer.param_groups:
        assert group["d"] > 0
    logs = lr_logs([1.0, 0.5], ["textencoder", "unet"], optimizer.param_groups, "Prodigy", False)
    d = optimizer.param_groups[0]["d"]
    assert logs["lr/d*lr/textencoder"] == pytest.approx(d * 1.0)
    assert logs["lr/d*lr/unet"] == pytest.approx(d * 0.5) == logs["lr/d*lr/group1"]


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_event_file_has_kohyas_names_at_kohyas_steps(tiny_sd, data):
    data = data.root  # tests/library's fixture: a namespace of the copied folders
    dataset = data / "dataset.toml"
    dataset.write_text(
        f"""[[datasets]]
resolution = 64
batch_size = 2
validation_split = 0.34
validation_seed = 3
  [[datasets.subsets]]
  image_dir = "{data / "img" / "10_sks toy"}"
  class_tokens = "sks toy"
"""
    )
    argv = base_argv(tiny_sd, data, "--dataset_config", str(dataset), "--logging_dir", str(data / "logs"),
                     "--max_train_steps", "4", "--validate_every_n_steps", "3", "--unet_lr", "2e-3")  # fmt: skip
    train_network.main([a for a in argv if a not in ("--train_data_dir", str(data / "img"))])
    (run,) = list((data / "logs").iterdir())
    events = EventAccumulator(str(next(run.rglob("events.out.tfevents.*")).parent))
    events.Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    # 4 train images, batch 2: 2 steps per epoch, 2 epochs.
    assert steps == {
        "loss/current": [1, 2, 3, 4],
        "loss/average": [1, 2, 3, 4],
        "lr/textencoder": [1, 2, 3, 4],
        "lr/unet": [1, 2, 3, 4],
        "lr/group1": [1, 2, 3, 4],
        "loss/epoch_average": [1, 2],
        "loss/validation/step_average": [3],
        "loss/validation/step_divergence": [3],
        "loss/validation/epoch_average": [1, 2],
        "loss/validation/epoch_divergence": [1, 2],
    }
    value = {tag: [e.value for e in events.Scalars(tag)] for tag in steps}
    current = value["loss/current"]
    assert value["loss/average"][:2] == pytest.approx([current[0], (current[0] + current[1]) / 2], rel=1e-5)
    assert value["loss/average"][3] == pytest.approx((current[2] + current[3]) / 2, rel=1e-5)  # the last epoch's
    assert value["loss/epoch_average"] == pytest.approx([value["loss/average"][1], value["loss/average"][3]])
    assert value["lr/unet"] == pytest.approx([2e-3] * 4) and value["lr/textencoder"] == pytest.approx([1e-3] * 4)
    divergence = value["loss/validation/epoch_divergence"][1]
    assert divergence == pytest.approx(value["loss/validation/epoch_average"][1] - value["loss/epoch_average"][1])


def _parsed(*argv):
    from library.training.args import parse_args, train_network_parser

    return parse_args(train_network_parser(), ["--pretrained_model_name_or_path", "m", "--output_dir", "o", *argv])


@pytest.mark.usefixtures("fresh_accelerate_state")
def test_torch_compile_uses_accelerates_dynamo_backend(monkeypatch):
    from accelerate.utils import DynamoBackend

    from library.training.trackers import compile_for_training, make_accelerator

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    # The GUI's `accelerate launch --dynamo_backend eager` alone compiles nothing: only --torch_compile does (kohya).
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    accelerator = make_accelerator(_parsed(), "t")
    assert accelerator.state.dynamo_plugin.backend == DynamoBackend.NO
    assert compile_for_training(accelerator, module) is module


@pytest.mark.usefixtures("fresh_accelerate_state")
@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_torch_compile_backends_compile_and_keep_results_and_gradients(backend):
    from library.training.trackers import compile_for_training, make_accelerator

    module = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.GELU())
    accelerator = make_accelerator(_parsed("--torch_compile", "--dynamo_backend", backend), "t")
    compiled = compile_for_training(accelerator, module)
    assert compiled is not module and compiled._orig_mod is module
    x = torch.randn(3, 4)
    compiled(x).sum().backward()
    grad = module[0].weight.grad.clone()
    module.zero_grad()
    module(x).sum().backward()
    torch.testing.assert_close(grad, module[0].weight.grad)


def test_bad_dynamo_backend_and_missing_wandb_fail_before_anything_loads(monkeypatch, tmp_path):
    import importlib.util

    from library.errors import ConfigError
    from library.training.args import verify_training_args

    with pytest.raises(ConfigError, match="^--dynamo_backend 'turbo' is not one of accelerate's: .*inductor"):
        verify_training_args(_parsed("--torch_compile", "--dynamo_backend", "turbo"))
    verify_training_args(_parsed("--dynamo_backend", "no"))  # the GUI's value, without --torch_compile
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real_find_spec(n, *a))
    for log_with in ("wandb", "all"):
        with pytest.raises(
            ConfigError, match=rf"^--log_with {log_with} needs the wandb package \(pip install wandb\)$"
        ):
            verify_training_args(_parsed("--log_with", log_with, "--logging_dir", str(tmp_path)))
    with pytest.raises(ConfigError, match="--log_tracker_config 'nope.toml' does not exist"):
        verify_training_args(_parsed("--log_tracker_config", "nope.toml"))
