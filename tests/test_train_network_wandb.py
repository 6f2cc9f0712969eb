"""--log_with wandb (offline): run name, project, scalars with kohya's axis fields, and sample images."""

import pytest

import train_network
from tests.test_train_network import base_argv

pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")


@pytest.mark.slow
def test_wandb_run_gets_name_scalars_and_samples(tiny_sd, data, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    prompts = data / "prompts.txt"
    prompts.write_text("sks toy --w 64 --h 64 --s 2 --d 5\n")
    tracker_config = data / "trackers.toml"
    tracker_config.write_text('[wandb]\nname = "from-tracker-config"\ntags = ["kohya"]\n')
    argv = base_argv(tiny_sd, data, "--max_train_steps", "2", "--log_with", "wandb", "--logging_dir",
                     str(data / "logs"), "--log_tracker_name", "my_project", "--wandb_run_name", "ignored-name",
                     "--log_tracker_config", str(tracker_config), "--sample_prompts", str(prompts),
                     "--sample_every_n_steps", "1")  # fmt: skip
    train_network.main(argv)
    (run_dir,) = list((data / "logs").glob("*/wandb/offline-run-*"))
    record = next(run_dir.glob("run-*.wandb")).read_bytes()
    # The run log is wandb's binary format; the names it stores are plain strings in it.
    for name in (b"my_project", b"from-tracker-config", b"loss/current", b"lr/unet", b"global_step", b"epoch"):
        assert name in record, name
    assert b"ignored-name" not in record  # --log_tracker_config replaces --wandb_run_name (kohya)
    assert sorted(p.name.split("_")[:2] for p in (run_dir / "files" / "media" / "images").glob("*.png")) == [
        ["sample", "0"],
        ["sample", "0"],
    ]
