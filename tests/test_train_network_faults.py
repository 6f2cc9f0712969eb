"""train_network.py under faults (docs/reliability.md): divergence, unusable outputs, killed saves,
concurrent runs and files that try to run code, end to end on the tiny fixtures."""

import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

import train_network
from library.cli import run_cli
from library.errors import CheckpointError, ConfigError
from library.training import loop as loop_module
from library.training import state as state_module
from library.training.divergence import TrainingDivergedError
from library.training.output_lock import lock_path
from tests.test_train_network import _assert_same_tensors, base_argv

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


def _all_tensors_finite(folder) -> list[str]:
    """Every weight file and state file below ``folder``, checked; returns the names of bad ones."""
    bad = []
    for path in folder.rglob("*"):
        if path.suffix == ".safetensors":
            tensors = load_file(path).values()
        elif path.suffix in (".pkl", ".bin") and "random_states" not in path.name:
            loaded = torch.load(path, weights_only=True)
            tensors = [t for t in _leaves(loaded) if isinstance(t, torch.Tensor) and t.is_floating_point()]
        else:
            continue
        if not all(torch.isfinite(t).all() for t in tensors):
            bad.append(str(path.relative_to(folder)))
    return bad


def _leaves(value):
    if isinstance(value, dict):
        for item in value.values():
            yield from _leaves(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _leaves(item)
    else:
        yield value


def test_a_diverging_run_stops_at_the_step_and_saves_nothing_non_finite(tiny_sd, data):
    argv = base_argv(tiny_sd, data, "--learning_rate", "1e12", "--max_train_steps", "8", "--save_every_n_steps", "1",
                     "--save_state", "--max_grad_norm", "0")  # fmt: skip
    with pytest.raises(TrainingDivergedError, match=r"at step \d+; .*(the last good checkpoint is|was not written)"):
        train_network.main(argv)
    out = data / "out"
    assert not (out / "tiny.safetensors").exists()  # the final save never happens
    assert _all_tensors_finite(out) == []
    assert not lock_path(out, "tiny").exists()


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        (("--output_dir", "FILE"), "is a file, not a folder"),
        (("--learning_rate", "-1"), "--learning_rate -1.0"),
        (("--max_train_steps", "0"), "--max_train_steps 0 trains nothing"),
    ],
    ids=["output-dir-is-a-file", "negative-lr", "zero-steps"],
)
def test_bad_outputs_and_numbers_fail_before_the_model_loads(tiny_sd, data, monkeypatch, extra, match):
    (data / "FILE").write_text("not a folder")
    extra = tuple(str(data / "FILE") if e == "FILE" else e for e in extra)

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr(loop_module.TrainingRun, "run", no_model)
    with pytest.raises(ConfigError, match=match):
        train_network.main(base_argv(tiny_sd, data, *extra))


def test_a_second_run_on_the_same_output_is_refused(tiny_sd, data):
    out = data / "out"
    out.mkdir()
    lock_path(out, "tiny").write_text(f'{{"pid": {os.getppid()}, "host": "{os.uname().nodename}"}}')
    with pytest.raises(ConfigError, match=f"in use by process {os.getppid()}"):
        train_network.main(base_argv(tiny_sd, data))
    assert sorted(p.name for p in out.iterdir()) == [".tiny.lock"]


def test_a_state_save_killed_midway_keeps_the_previous_state_resumable(tiny_sd, data, monkeypatch, code_payload):
    common = ("--max_train_steps", "4", "--save_every_n_steps", "2", "--save_state")
    train_network.main(base_argv(tiny_sd, data, *common))
    out = data / "out"
    finished = out / "tiny.safetensors"
    shutil.copy(finished, data / "uninterrupted.safetensors")

    def killed(folder):
        raise KeyboardInterrupt  # the process dies after the files, before the manifest

    monkeypatch.setattr(state_module, "write_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        train_network.main(base_argv(tiny_sd, data, *common))  # a rerun overwriting the same names
    monkeypatch.undo()
    partial = out / ".tiny-step00000002-state.tmp"
    assert (partial / "optimizer.bin").is_file()
    with pytest.raises(CheckpointError, match="incomplete"):
        train_network.main(base_argv(tiny_sd, data, *common, "--resume", str(partial), "--output_name", "x"))

    # A folder someone else sent: its pickles would run code.
    malicious = out / "shared-state"
    shutil.copytree(out / "tiny-step00000002-state", malicious)
    shutil.copyfile(code_payload[0], malicious / "custom_checkpoint_0.pkl")
    state_module.write_manifest(malicious)
    with pytest.raises(CheckpointError, match="refusing .*custom_checkpoint_0.pkl"):
        train_network.main(base_argv(tiny_sd, data, *common, "--resume", str(malicious), "--output_name", "x"))
    assert not code_payload[1].exists()

    resumed = base_argv(tiny_sd, data, "--max_train_steps", "4", "--resume", str(out / "tiny-step00000002-state"))
    train_network.main(resumed)  # the same output name: the killed run's leftovers are cleared first
    assert not partial.exists()
    _assert_same_tensors(data / "uninterrupted.safetensors", finished)


def test_a_malicious_ckpt_runs_no_code_and_exits_2(tiny_sd, data, code_payload, capsys):
    ckpt = data / "model.ckpt"
    shutil.copyfile(code_payload[0], ckpt)
    argv = base_argv(tiny_sd, data, "--pretrained_model_name_or_path", str(ckpt))
    with pytest.raises(SystemExit) as exited:
        run_cli(lambda: train_network.main(argv))
    assert exited.value.code == 2
    assert capsys.readouterr().err.startswith(f"error: refusing to load '{ckpt}': its pickle names subprocess.Popen")
    assert not code_payload[1].exists()


def test_distillation_stops_on_divergence_too(tiny_sd, data):
    import distill_unet
    from tests.test_distill_unet import distill_argv

    argv = distill_argv(tiny_sd.sd1_dir, data, data / "out", "--student", "bk_tiny", "--learning_rate", "1e12",
                        "--max_train_steps", "6", "--save_every_n_steps", "1", "--max_grad_norm", "0")  # fmt: skip
    with pytest.raises(TrainingDivergedError, match=r"at step \d+"):
        distill_unet.main(argv)
    assert not (data / "out" / "student").exists() and _all_tensors_finite(data / "out") == []
