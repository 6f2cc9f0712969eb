"""LyCORIS (``lycoris.kohya``, lycoris-lora as the kohya_ss GUI pins it) trains from the GUI's configs.

The config is what bmaltais/kohya_ss ``kohya_gui/lora_gui.py`` writes for its "LyCORIS/LoCon",
"LyCORIS/LoHa" and "LyCORIS/LoKr" types on an SD1.5 model: the GUI preset config of
tests/fixtures/kohya_gui (bookkeeping keys ``epoch`` and ``noise_offset_type`` included) with the
LyCORIS type's ``network_module`` and ``network_args`` (split from the GUI's string),
``text_encoder_lr`` as the GUI's two-value list, launched as the GUI launches
(``accelerate launch --dynamo_backend no --mixed_precision bf16 --num_processes 1 ...``).

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
GUI_CONFIG = REPO / "tests" / "fixtures" / "kohya_gui" / "config_lora-EDG_LoraOptiSettings.toml"
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
    """The GUI's SD1.5 preset config (tests/fixtures/kohya_gui) with the form switched to a LyCORIS type.

    lora_gui.py writes the same keys for every LoRA type; a LyCORIS type changes network_module and
    network_args. Also changed in the form: dims, learning rates, AdamW, fp16 saving, one step at
    128 px (so the mid block attends over several tokens) and a sample prompt every step.
    """
    text = GUI_CONFIG.read_text()
    for placeholder, value in {"{MODEL}": tiny_sd.sd1_dir, "{TRAIN_DATA_DIR}": data / "img",
                               "{OUTPUT_DIR}": data / "out"}.items():  # fmt: skip
        text = text.replace(placeholder, str(value))
    config = toml.loads(text)
    config.update(
        network_module="lycoris.kohya",
        network_args=GUI_NETWORK_ARGS[algo].split(),
        network_dim=8,
        network_alpha=1,
        text_encoder_lr=[TEXT_ENCODER_LR, TEXT_ENCODER_LR],
        unet_lr=UNET_LR,
        optimizer_type="AdamW",
        save_precision="fp16",
        max_train_steps=1,
        resolution="128,128",
        min_bucket_reso=64,
        max_bucket_reso=256,
        output_name=f"tiny_{algo}",
        wandb_run_name=f"tiny_{algo}",
        sample_prompts=str(data / "out" / "prompt.txt"),
        sample_every_n_steps=1,
    )
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
    assert config["clip_skip"] == 2
    text_encoder = [t.float().abs().max().item() for key, t in zero_init.items() if key.startswith("lora_te_")]
    unet = [t.float().abs().max().item() for key, t in zero_init.items() if key.startswith("lora_unet_")]
    assert len(text_encoder) > 10 and len(unet) > 50
    # every module trained but those of the text encoder's last layer, which --clip_skip 2 (the
    # preset's) leaves out of the conditioning, as in kohya (the tiny text encoder has 3 layers)
    untrained = {key.split(".")[0] for key, tensor in zero_init.items() if tensor.abs().max() == 0}
    assert untrained and all(key.startswith("lora_te_text_model_encoder_layers_2_") for key in untrained)
    assert max(text_encoder) == pytest.approx(TEXT_ENCODER_LR, rel=0.02)
    assert max(unet) == pytest.approx(UNET_LR, rel=0.02)
