"""LyCORIS (``lycoris.kohya``, lycoris-lora as the kohya_ss GUI pins it) trains from the GUI's configs.

The config is what bmaltais/kohya_ss ``kohya_gui/lora_gui.py`` writes for its "LyCORIS/LoCon",
"LyCORIS/LoHa" and "LyCORIS/LoKr" types on an SD1.5 model: every key of the GUI form (the falsy
ones dropped, keys sorted, ``network_args`` split from the GUI's string, ``text_encoder_lr`` as a
two-value list) and the GUI's launch command (``accelerate launch --dynamo_backend no
--mixed_precision bf16 --num_processes 1 ... train_network.py --config_file``).

One AdamW step moves each weight that starts at zero by about its group's learning rate (the first
Adam update is lr * g / (|g| + eps)), so the largest text-encoder and UNet values of LyCORIS'
zero-initialised factors show which learning rate each part was given.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import toml

from networks.lora_file import load_lora_file

REPO = Path(__file__).resolve().parents[1]
TEXT_ENCODER_LR = 5e-5
UNET_LR = 1e-4

# lora_gui.py's network_args strings for each LyCORIS type (the GUI's defaults in its form).
GUI_NETWORK_ARGS = {
    "locon": "preset=full conv_dim=4 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
    "module_dropout=0 use_tucker=False use_scalar=False rank_dropout_scale=False algo=locon train_norm=False",
    "loha": "preset=full conv_dim=4 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
    "module_dropout=0 use_tucker=False use_scalar=False rank_dropout_scale=False algo=loha train_norm=False",
    "lokr": "preset=full conv_dim=4 conv_alpha=1 use_tucker=False rank_dropout=0 bypass_mode=False dora_wd=False "
    "module_dropout=0 factor=-1 use_cp=False use_scalar=False decompose_both=False rank_dropout_scale=False "
    "algo=lokr train_norm=False",
}
# The factor LyCORIS initialises to zero (so the network starts as the identity), per algorithm.
ZERO_INIT_SUFFIXES = {"locon": (".lora_up.weight",), "loha": (".hada_w2_a",), "lokr": (".lokr_w2", ".lokr_w2_b")}


def gui_config(tiny_sd, data: Path, algo: str) -> dict:
    """The config_lora-*.toml lora_gui.py writes (values it drops as falsy are left out)."""
    config = {
        "bucket_no_upscale": True,
        "bucket_reso_steps": 64,
        "cache_latents": True,
        "caption_extension": ".txt",
        "clip_skip": 1,
        "dynamo_backend": "no",
        "enable_bucket": True,
        "epoch": 1,
        "gradient_accumulation_steps": 1,
        "huber_c": 0.1,
        "huber_scale": 1,
        "huber_schedule": "snr",
        "learning_rate": 0.0001,
        "loss_type": "l2",
        "lr_scheduler": "cosine",
        "lr_scheduler_args": [],
        "lr_scheduler_num_cycles": 1,
        "lr_scheduler_power": 1,
        "max_bucket_reso": 256,
        "max_data_loader_n_workers": 0,
        "max_grad_norm": 1,
        "max_timestep": 1000,
        "max_token_length": 75,
        "max_train_steps": 1,
        "min_bucket_reso": 64,
        "mixed_precision": "bf16",
        "network_alpha": 1,
        "network_args": GUI_NETWORK_ARGS[algo].split(),
        "network_dim": 8,
        "network_module": "lycoris.kohya",
        "noise_offset_type": "Original",
        "optimizer_args": [],
        "optimizer_type": "AdamW",
        "output_dir": str(data / "out"),
        "output_name": f"tiny_{algo}",
        "pretrained_model_name_or_path": str(tiny_sd.sd1_dir),
        "prior_loss_weight": 1,
        "resolution": "128,128",
        "sample_prompts": str(data / "out" / "prompt.txt"),
        "sample_every_n_steps": 1,
        "sample_sampler": "euler_a",
        "save_every_n_epochs": 1,
        "save_model_as": "safetensors",
        "save_precision": "fp16",
        "sdpa": True,
        "seed": 1234,
        "text_encoder_lr": [TEXT_ENCODER_LR, TEXT_ENCODER_LR],
        "train_batch_size": 1,
        "train_data_dir": str(data / "img"),
        "unet_lr": UNET_LR,
        "wandb_run_name": f"tiny_{algo}",
    }
    return dict(sorted(config.items()))


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(GUI_NETWORK_ARGS))
def test_gui_lycoris_config_trains_in_bf16(tiny_sd, data, algo):
    config = gui_config(tiny_sd, data, algo)
    (data / "out").mkdir()
    # samples run under autocast too: the LyCORIS weights stay float32 beside the bf16 UNet
    (data / "out" / "prompt.txt").write_text("a (sks:1.2) [toy] --w 64 --h 64 --s 2 --d 1\n")
    config_file = data / "out" / f"config_lora-{algo}.toml"
    config_file.write_text(toml.dumps(config))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--dynamo_backend", "no", "--dynamo_mode", "default",
              "--mixed_precision", "bf16", "--num_processes", "1", "--num_machines", "1",
              "--num_cpu_threads_per_process", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launch, "train_network.py", "--config_file", str(config_file)],
        cwd=REPO, capture_output=True, text=True, timeout=600, env=env,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    tensors, metadata = load_lora_file(data / "out" / f"tiny_{algo}.safetensors")
    assert metadata["ss_network_module"] == "lycoris.kohya"
    expected_args = dict(arg.split("=", 1) for arg in config["network_args"])
    assert json.loads(metadata["ss_network_args"]) == expected_args
    assert metadata["ss_mixed_precision"] == "bf16"
    assert len(list((data / "out" / "sample").glob(f"tiny_{algo}_000001_00_*_1.png"))) == 1
    zero_init = {key: t for key, t in tensors.items() if key.endswith(ZERO_INIT_SUFFIXES[algo])}
    text_encoder = [t.float().abs().max().item() for key, t in zero_init.items() if key.startswith("lora_te_")]
    unet = [t.float().abs().max().item() for key, t in zero_init.items() if key.startswith("lora_unet_")]
    assert len(text_encoder) > 10 and len(unet) > 50
    assert min(text_encoder + unet) > 0  # every module trained
    assert max(text_encoder) == pytest.approx(TEXT_ENCODER_LR, rel=0.02)
    assert max(unet) == pytest.approx(UNET_LR, rel=0.02)
