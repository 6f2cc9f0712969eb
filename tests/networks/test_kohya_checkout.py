"""Our network files dropped into a kohya checkout: they import only torch, safetensors and their siblings.

A fake checkout gets copies of ``networks/*.py`` and a ``library`` package that refuses to be imported
(kohya's ``library`` is not ours); diffusers, transformers and accelerate are blocked. Each network module
then builds, saves and reloads a network on a toy model whose classes carry kohya's target names, and
``networks/extract_lora_from_dylora.py`` runs as kohya users run it.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from networks.lora_file import load_lora_file

REPO = Path(__file__).resolve().parents[2]
NETWORK_FILES = (
    "__init__.py", "base.py", "errors.py", "targets.py", "modules.py", "network_args.py", "sgm_names.py",
    "lora_file.py", "lora.py", "lilora.py", "lilora_file.py", "dylora.py", "lora_fa.py", "extract_lora_from_dylora.py",
)  # fmt: skip
MODULES = {
    "networks.lora": {"conv_dim": "2"},
    "networks.lilora": {"conv_dim": "2", "aux_down": "4", "aux_up": "4"},
    "networks.dylora": {"unit": "2", "conv_dim": "4"},
    "networks.lora_fa": {"conv_dim": "2"},
}

SCRIPT = """
import importlib, json, sys
checkout = sys.argv[1]
sys.path.insert(0, checkout)
for blocked in ("diffusers", "transformers", "accelerate"):
    sys.modules[blocked] = None  # importing it raises ImportError
from safetensors.torch import load_file
from torch import nn

class Holder(nn.Module):
    def __init__(self, **children):
        super().__init__()
        for name, child in children.items():
            self.add_module(name, child)

class Transformer2DModel(Holder): pass
class ResnetBlock2D(Holder): pass
class CLIPAttention(Holder): pass

block = Holder(
    attentions=nn.ModuleList([Transformer2DModel(proj_in=nn.Conv2d(8, 8, 1), to_q=nn.Linear(8, 8))]),
    resnets=nn.ModuleList([ResnetBlock2D(conv1=nn.Conv2d(8, 8, 3, padding=1), time_emb_proj=nn.Linear(8, 8))]),
)
unet = Holder(down_blocks=nn.ModuleList([block]))
layers = nn.ModuleList([Holder(self_attn=CLIPAttention(q_proj=nn.Linear(8, 8)))])
text_encoder = Holder(text_model=Holder(encoder=Holder(layers=layers)))
keys = {}
for name, network_args in json.loads(sys.argv[2]).items():
    module = importlib.import_module(name)
    network = module.create_network(1.0, 4, 1, None, text_encoder, unet, **network_args)
    network.apply_to(text_encoder, unet)
    path = f"{checkout}/{name.replace('.', '_')}.safetensors"  # not *.lilora.safetensors: the compact form
    network.save_weights(path, None, {"ss_output_name": name})
    network.restore()
    rebuilt, _ = module.create_network_from_weights(1.0, path, None, text_encoder, unet, **network_args)
    rebuilt.load_weights(path)
    keys[name] = sorted(load_file(path))
importlib.import_module("networks.extract_lora_from_dylora")
print(json.dumps({"keys": keys, "library": "library" in sys.modules}))
"""


def fake_checkout(root: Path) -> Path:
    (root / "networks").mkdir(parents=True)
    for name in NETWORK_FILES:
        shutil.copy(REPO / "networks" / name, root / "networks" / name)
    (root / "library").mkdir()
    (root / "library" / "__init__.py").write_text("raise ImportError('kohya library: networks/ must not import it')\n")
    return root


def test_network_modules_run_inside_a_kohya_checkout(tmp_path):
    checkout = fake_checkout(tmp_path / "sd-scripts")
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    result = subprocess.run(
        [sys.executable, "-I", "-c", SCRIPT, str(checkout), json.dumps(MODULES)],
        cwd=checkout, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert not report["library"]
    names = {
        "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
        "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_down_blocks_0_attentions_0_to_q",
        "lora_unet_down_blocks_0_resnets_0_conv1",
        "lora_unet_down_blocks_0_resnets_0_time_emb_proj",
    }
    expected = sorted(f"{name}.{key}" for name in names for key in ("alpha", "lora_down.weight", "lora_up.weight"))
    assert report["keys"] == dict.fromkeys(MODULES, expected)

    cut = subprocess.run(
        [sys.executable, "networks/extract_lora_from_dylora.py", "--model", "networks_dylora.safetensors",
         "--save_to", "cut.safetensors", "--unit", "2"],
        cwd=checkout, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert cut.returncode == 0, cut.stderr
    tensors, metadata = load_lora_file(checkout / "cut-0002.safetensors")
    assert tensors["lora_unet_down_blocks_0_resnets_0_conv1.lora_down.weight"].shape == (2, 8, 3, 3)
    assert metadata["ss_network_dim"] == "2" and not (checkout / "cut-0004.safetensors").exists()
