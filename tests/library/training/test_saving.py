"""kohya's output names, rotation and metadata keys."""

import base64
import hashlib

from library.training.args import train_network_parser as setup_parser
from library.training.saving import (
    MINIMUM_KEYS,
    legacy_model_hash,
    model_file_name,
    modelspec_metadata,
    rotate,
    state_dir_name,
    training_metadata,
)

# Keys kohya's train_network.py always writes (research/kohya.md §4.2), less the validation ones.
KOHYA_ALWAYS = [
    "ss_session_id",
    "ss_training_started_at",
    "ss_output_name",
    "ss_learning_rate",
    "ss_text_encoder_lr",
    "ss_unet_lr",
    "ss_num_batches_per_epoch",
    "ss_num_epochs",
    "ss_gradient_checkpointing",
    "ss_gradient_accumulation_steps",
    "ss_max_train_steps",
    "ss_lr_warmup_steps",
    "ss_lr_scheduler",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_dropout",
    "ss_mixed_precision",
    "ss_full_fp16",
    "ss_v2",
    "ss_base_model_version",
    "ss_clip_skip",
    "ss_max_token_length",
    "ss_cache_latents",
    "ss_seed",
    "ss_lowram",
    "ss_noise_offset",
    "ss_multires_noise_iterations",
    "ss_multires_noise_discount",
    "ss_adaptive_noise_scale",
    "ss_zero_terminal_snr",
    "ss_training_comment",
    "ss_sd_scripts_commit_hash",
    "ss_optimizer",
    "ss_max_grad_norm",
    "ss_caption_dropout_rate",
    "ss_caption_dropout_every_n_epochs",
    "ss_caption_tag_dropout_rate",
    "ss_face_crop_aug_range",
    "ss_prior_loss_weight",
    "ss_min_snr_gamma",
    "ss_scale_weight_norms",
    "ss_ip_noise_gamma",
    "ss_debiased_estimation",
    "ss_noise_offset_random_strength",
    "ss_ip_noise_gamma_random_strength",
    "ss_loss_type",
    "ss_huber_schedule",
    "ss_huber_scale",
    "ss_huber_c",
    "ss_fp8_base",
    "ss_fp8_base_unet",
]


def test_names():
    assert model_file_name("mylora", "safetensors") == "mylora.safetensors"
    assert model_file_name("mylora", "safetensors", epoch=1) == "mylora-000001.safetensors"
    assert model_file_name("mylora", "ckpt", step=500) == "mylora-step00000500.ckpt"
    assert state_dir_name("mylora", epoch=3) == "mylora-000003-state"
    assert state_dir_name("mylora", step=20) == "mylora-step00000020-state"
    assert state_dir_name("mylora") == "mylora-state"
    assert model_file_name("student", "", epoch=2) == "student-000002"
    assert model_file_name("student", "") == "student"


def test_rotation_keeps_the_newest(tmp_path):
    for epoch in (1, 2, 3, 4):
        (tmp_path / model_file_name("x", "safetensors", epoch=epoch)).write_text("")
        (tmp_path / state_dir_name("x", epoch=epoch)).mkdir()
    (tmp_path / "x.safetensors").write_text("")
    rotate(tmp_path, "x", 2, by_step=False, state=False, extension="safetensors")
    rotate(tmp_path, "x", 1, by_step=False, state=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "x-000003.safetensors",
        "x-000004-state",
        "x-000004.safetensors",
        "x.safetensors",
    ]


def test_rotation_removes_folder_and_file_of_a_checkpoint_together(tmp_path):
    for step in (10, 20, 30):
        (tmp_path / model_file_name("s", "", step=step)).mkdir()  # a diffusers folder ...
        (tmp_path / model_file_name("s", "ckpt", step=step)).write_text("")  # ... beside its single file
    (tmp_path / model_file_name("s", "", step=40)).mkdir()  # a folder-only save
    (tmp_path / model_file_name("s-step00000010", "txt")).write_text("")  # another file sharing the prefix
    removed = rotate(tmp_path, "s", 2, by_step=True, state=False, extension="ckpt")
    assert sorted(p.name for p in removed) == [
        "s-step00000010",
        "s-step00000010.ckpt",
        "s-step00000020",
        "s-step00000020.ckpt",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "s-step00000010.txt",
        "s-step00000030",
        "s-step00000030.ckpt",
        "s-step00000040",
    ]
    rotate(tmp_path, "s", 1, by_step=True, state=False, extension="")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "s-step00000010.txt",
        "s-step00000030.ckpt",
        "s-step00000040",
    ]


def _metadata(argv, **kw):
    args = setup_parser().parse_args(["--pretrained_model_name_or_path", "missing.safetensors", *argv])
    args.resolution = (512, 512)
    return training_metadata(
        args,
        network_metadata={"ss_network_module": "networks.lora", "ss_network_dim": "4", "ss_network_alpha": "1.0"},
        dataset_metadata={"ss_num_train_images": "60"},
        optimizer_name="torch.optim.adamw.AdamW",
        base_model_version="sd_v1",
        v2=False,
        num_epochs=2,
        num_batches_per_epoch=30,
        started_at=1700000000.0,
        **kw,
    )


def test_training_metadata_has_kohyas_keys_as_strings():
    metadata = _metadata(["--seed", "42", "--clip_skip", "2"])
    assert set(KOHYA_ALWAYS) <= set(metadata)
    assert all(isinstance(v, str) for v in metadata.values())
    assert metadata["ss_seed"] == "42" and metadata["ss_clip_skip"] == "2" and metadata["ss_noise_offset"] == "None"
    assert metadata["ss_sd_model_name"] == "missing.safetensors"
    assert metadata["ss_num_train_images"] == "60"


def test_no_metadata_keeps_the_minimum():
    metadata = _metadata(["--no_metadata"])
    assert set(metadata) <= set(MINIMUM_KEYS) and "ss_network_dim" in metadata


def test_modelspec_architectures():
    args = setup_parser().parse_args(["--output_name", "mylora", "--clip_skip", "2"])
    spec = modelspec_metadata(args, v2=False, v_parameterization=False, started_at=1700000000.0)
    assert spec["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert spec["modelspec.title"] == "mylora" and spec["modelspec.encoder_layer"] == "2"
    assert spec["modelspec.resolution"] == "512x512" and spec["modelspec.prediction_type"] == "epsilon"
    v = modelspec_metadata(setup_parser().parse_args([]), v2=True, v_parameterization=True, started_at=1.0)
    assert v["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert v["modelspec.resolution"] == "768x768" and v["modelspec.prediction_type"] == "v"


def test_every_kohya_metadata_flag_lands_in_modelspec(tmp_path):
    png = tmp_path / "thumb.png"
    png.write_bytes(b"\x89PNG fake")
    argv = ["--metadata_usage_hint", "say sks", "--metadata_trigger_phrase", "sks", "--metadata_merged_from", "a, b"]
    argv += ["--metadata_preprocessor", "canny", "--metadata_is_negative_embedding", "false"]
    argv += ["--metadata_thumbnail", str(png), "--metadata_author", "me"]
    spec = modelspec_metadata(setup_parser().parse_args(argv), v2=False, v_parameterization=False, started_at=1.0)
    assert spec["modelspec.usage_hint"] == "say sks" and spec["modelspec.trigger_phrase"] == "sks"
    assert spec["modelspec.merged_from"] == "a, b" and spec["modelspec.preprocessor"] == "canny"
    assert spec["modelspec.is_negative_embedding"] == "false" and spec["modelspec.author"] == "me"
    assert spec["modelspec.thumbnail"] == "data:image/png;base64," + base64.b64encode(b"\x89PNG fake").decode()


def test_legacy_model_hash(tmp_path):
    data = bytes(range(256)) * 8192
    path = tmp_path / "m.bin"
    path.write_bytes(data)
    assert legacy_model_hash(path) == hashlib.sha256(data[0x100000:0x110000]).hexdigest()[:8]


def test_rotation_counts_follow_kohya():
    from pathlib import Path

    from library.training.loop import Cadence

    cadence = Cadence(Path("."), "x", "safetensors", save_every_n_steps=10, save_last_n_steps=30,
                      save_last_n_epochs=2, save_last_n_epochs_state=1)  # fmt: skip
    # kohya at step 50 with every=10, last_n_steps=30 deletes step 10 and keeps 20, 30, 40, 50
    assert cadence.checkpoints_to_keep(by_step=True) == (4, 4)
    assert cadence.checkpoints_to_keep(by_step=False) == (2, 1)
    assert Cadence(Path("."), "x", "pt", save_last_n_epochs=3).checkpoints_to_keep(by_step=False) == (3, 3)
