"""bench/kohya_stubs and bench/kohya_torchvision: what kohya imports gets a stand-in, and nothing more works.

Each check runs in a child process with only the stand-in folders on PYTHONPATH, as kohya's children
get them; the suite's own path never holds them.
"""

import argparse
import json
import os
import subprocess
import sys

import pytest

from bench.compare_kohya_lora_tools import REPO

STUBS = REPO / "bench" / "kohya_stubs"
TORCHVISION = REPO / "bench" / "kohya_torchvision"


def run_child(code: str, *folders) -> dict:
    done = subprocess.run(
        [sys.executable, "-c", code], env={"PYTHONPATH": os.pathsep.join(map(str, folders))},
        capture_output=True, text=True, cwd="/",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def refusals(calls: dict[str, str]) -> str:
    """Child code that records, per name, the exception type its call raised (or 'ran')."""
    lines = ["out = {}"]
    for name, call in calls.items():
        lines += [
            "try:",
            f"    {call}",
            f"    out[{name!r}] = 'ran'",
            "except Exception as error:",
            f"    out[{name!r}] = type(error).__name__",
        ]
    return "\n".join(lines) + "\n"


def test_lora_tool_comparison_defaults_to_both_folders(monkeypatch):
    """compare_kohya_lora_tools runs kohya's tools in our env, which lacks cv2 and imagesize as well."""
    from bench import compare_kohya_lora_tools

    parsed = {}
    original = argparse.ArgumentParser.parse_args

    def capture(self, argv=None, namespace=None):
        parsed["args"] = original(self, argv, namespace)
        raise SystemExit  # before anything is written

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(SystemExit):
        compare_kohya_lora_tools.main(["--kohya_dir", "/nowhere"])
    assert parsed["args"].extra_path.split(os.pathsep) == [str(STUBS), str(TORCHVISION)]


def test_import_stubs_import_and_refuse_to_be_used():
    """kohya's library imports cv2 and imagesize at module level (and names cv2's constants); any call raises."""
    code = (
        "import json, cv2, imagesize\n"
        "assert cv2.INTER_LANCZOS4 == 4 and cv2.COLOR_BGR2RGB == 4\n"
        + refusals({"cv2.resize": "cv2.resize(None, (1, 1))", "imagesize.get": "imagesize.get('x.png')"})
        + "print(json.dumps(out))\n"
    )
    assert run_child(code, STUBS) == {"cv2.resize": "AttributeError", "imagesize.get": "RuntimeError"}


def test_torchvision_stand_in_computes_kohyas_image_transforms_with_torchvisions_arithmetic():
    """kohya's IMAGE_TRANSFORMS, Compose([ToTensor(), Normalize([0.5], [0.5])]), on uint8 images: float32
    CHW (x / 255 - 0.5) / 0.5, operation for operation, from arrays and PIL images alike."""
    code = (
        "import json, numpy as np, torch\n"
        "from PIL import Image\n"
        "from torchvision import transforms\n"
        "pipeline = transforms.Compose([transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])\n"
        "rgb = np.random.RandomState(0).randint(0, 256, (5, 7, 3), dtype=np.uint8)\n"
        "rgb[0, 0] = [0, 255, 128]\n"
        "gray = rgb[:, :, 0].copy()\n"
        "def expected(array):\n"
        "    x = array.astype(np.float32) / np.float32(255)\n"
        "    return torch.from_numpy(np.moveaxis((x - np.float32(0.5)) / np.float32(0.5), -1, 0).copy())\n"
        "out = {}\n"
        "for name, image, want in [('array', rgb, expected(rgb)), ('pil', Image.fromarray(rgb), expected(rgb)),\n"
        "                          ('gray', gray, expected(gray[:, :, None]))]:\n"
        "    got = pipeline(image)\n"
        "    out[name] = [list(got.shape), str(got.dtype), bool(torch.equal(got, want))]\n"
        "per_channel = transforms.Normalize([0.1, 0.2, 0.3], [0.5, 0.25, 2.0])(torch.ones(3, 1, 1))\n"
        "out['per_channel'] = per_channel.flatten().tolist()\n"
        "source = torch.zeros(1, 2, 2)\n"
        "transforms.Normalize([1.0], [1.0])(source)\n"
        "out['copies'] = bool((source == 0).all())\n"
        "print(json.dumps(out))\n"
    )
    out = run_child(code, TORCHVISION)
    assert out["array"] == [[3, 5, 7], "torch.float32", True]
    assert out["pil"] == [[3, 5, 7], "torch.float32", True]
    assert out["gray"] == [[1, 5, 7], "torch.float32", True]
    assert out["per_channel"] == pytest.approx([(1 - 0.1) / 0.5, (1 - 0.2) / 0.25, (1 - 0.3) / 2.0], rel=1e-6)
    assert out["copies"]


def test_torchvision_stand_in_refuses_everything_else():
    """Inputs torchvision treats otherwise, and every other transform, raise rather than compute something else."""
    code = (
        "import json, numpy as np, torch\n"
        "from torchvision import transforms\n"
        + refusals(
            {
                "uint16": "transforms.ToTensor()(np.zeros((2, 2, 3), np.uint16))",
                "float": "transforms.ToTensor()(np.zeros((2, 2, 3), np.float32))",
                "int tensor": "transforms.Normalize([0.5], [0.5])(torch.zeros(3, 2, 2, dtype=torch.uint8))",
                "zero std": "transforms.Normalize([0.5], [0.0])(torch.zeros(3, 2, 2))",
                "Resize": "transforms.Resize(8)",
                "functional": "transforms.functional.pil_to_tensor(None)",
            }
        )
        + "print(json.dumps(out))\n"
    )
    assert run_child(code, TORCHVISION) == {
        "uint16": "RuntimeError",
        "float": "RuntimeError",
        "int tensor": "TypeError",
        "zero std": "ValueError",
        "Resize": "AttributeError",
        "functional": "AttributeError",
    }
