"""The helpers of bench/compare_kohya_lora_tools.py on tiny tensors (no kohya checkout needed)."""

import fcntl
import math
import re

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.compare_kohya_lora_tools import (
    compare_baked,
    compare_extracted,
    float32_ulps,
    held,
    perturbation,
    relative_errors,
    run,
    top_reference,
    update,
    warm_page_cache,
    write_tuned,
)
from library.lora_tools.truncated_svd import subspace_error
from library.synthetic_lora import LoRATarget, random_lora
from networks import extract_lora_from_models
from tests.cli_runs import exit_status

LINEAR = LoRATarget("lora_unet", "down_blocks.0.attentions.0.proj_in", 12, 10)
CONV = LoRATarget("lora_unet", "down_blocks.0.resnets.0.conv1", 6, 4, (3, 3), is_conv=True)
NAMES = [LINEAR.name, CONV.name]


def test_float32_ulps_counts_numpys_spacing():
    reference = torch.tensor([1.0, -3.5, 1e-3, 123.25, 0.0], dtype=torch.float32)
    steps = torch.tensor([0.0, 1.0, 3.0, -2.0, 1.0], dtype=torch.float64)
    spacing = torch.from_numpy(np.spacing(np.abs(reference.numpy()))).double()
    other = (reference.double() + steps * spacing).float()
    assert torch.equal(float32_ulps(reference, other), steps.abs())


def test_float32_ulps_in_units_of_the_operand_scale():
    # W + update cancelling to ~0: one ulp of W is one ulp, not ~500000 of the result's.
    weight = torch.tensor([0.5, 0.5], dtype=torch.float32)
    result = torch.tensor([1e-6, 1.5], dtype=torch.float32)  # the larger magnitude sets the unit
    other = result.double() + float(np.spacing(np.float32(0.5))) * torch.tensor([1.0, 2.0], dtype=torch.float64)
    assert torch.equal(float32_ulps(result, other.float(), weight), torch.tensor([1.0, 1.0], dtype=torch.float64))
    assert float32_ulps(result, other.float())[0] > 1e5


def test_update_is_the_dense_scaled_product_also_for_3x3_convs():
    tensors = random_lora([LINEAR, CONV], 4, 2.0, 3, 6.0, seed=0, dtype=torch.float32)
    down = tensors[f"{CONV.name}.lora_down.weight"].double()
    up = tensors[f"{CONV.name}.lora_up.weight"].double()
    # The kernel applied as kohya bakes it: a conv of down's kernels by up's 1x1 kernels.
    kernel = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3) * 6.0 / 3
    torch.testing.assert_close(update(tensors, CONV.name), kernel.reshape(6, -1), rtol=1e-12, atol=0)
    assert update(tensors, LINEAR.name).shape == (12, 10)


def test_relative_errors_against_known_scalings():
    first = random_lora([LINEAR, CONV], 4, 2.0, 3, 6.0, seed=1, dtype=torch.float32)
    second = random_lora([LINEAR, CONV], 2, 2.0, 2, 1.0, seed=2, dtype=torch.float32)
    assert max(relative_errors(first, [first], [1.0], NAMES)) < 1e-15
    # The input as the merge of itself at ratio 0.5: the error is as large as the exact sum.
    assert relative_errors(first, [first], [0.5], NAMES) == pytest.approx([1.0, 1.0], rel=1e-12)
    # A concatenation of the factors with ratio-scaled up factors is the exact sum of two inputs.
    merged = {}
    for name in NAMES:
        parts = [(first, 0.7), (second, -0.4)]
        ups = [t[f"{name}.lora_up.weight"].double() * r * float(t[f"{name}.alpha"]) for t, r in parts]
        downs = [t[f"{name}.lora_down.weight"].double() / t[f"{name}.lora_down.weight"].shape[0] for t, _ in parts]
        merged[f"{name}.lora_up.weight"] = torch.cat(ups, dim=1)
        merged[f"{name}.lora_down.weight"] = torch.cat(downs, dim=0)
        merged[f"{name}.alpha"] = torch.tensor(float(merged[f"{name}.lora_down.weight"].shape[0]))
    assert max(relative_errors(merged, [first, second], [0.7, -0.4], NAMES)) < 1e-14


def test_compare_baked_separates_baked_untouched_and_one_sided_tensors(tmp_path):
    generator = torch.Generator().manual_seed(0)
    base = {k: torch.randn(5, 7, generator=generator).half() for k in ("kept", "baked", "kohya_only_change")}
    base["step"] = torch.tensor([3], dtype=torch.int64)
    delta = torch.randn(5, 7, generator=generator, dtype=torch.float64) * 0.1
    ours = {k: v.float() for k, v in base.items() if k != "step"}
    ours["step"] = base["step"]
    ours["baked"] = (base["baked"].double() + delta).float()
    kohya = dict(ours)
    spacing = torch.from_numpy(np.spacing(np.abs(ours["baked"].numpy())))
    kohya["baked"] = ours["baked"].clone()
    kohya["baked"][0, :3] += 2 * spacing[0, :3]  # two float32 ulps off in three elements
    kohya["kohya_only_change"] = ours["kohya_only_change"] + 1e-3
    kohya["extra"] = torch.zeros(2)
    paths = [tmp_path / f"{n}.safetensors" for n in ("base", "kohya", "ours")]
    for path, tensors in zip(paths, (base, kohya, ours)):
        save_file(tensors, path)

    result = compare_baked(*paths)

    assert (result.tensors, result.changed, result.untouched) == (4, 2, 2)
    assert result.changed_by_one_only == ["kohya_only_change"]
    assert (result.only_in_kohya, result.only_in_ours) == (["extra"], [])
    assert result.differing_elements == 3 + 35 and result.changed_elements == 70
    assert result.max_ulps > 2  # the 1e-3 shift is many ulps
    assert result.dtypes == {"kohya torch.float32", "ours torch.float32", "kohya torch.int64", "ours torch.int64"}


def test_run_reports_time_and_peak_memory_and_the_failure_line(tmp_path):
    script = tmp_path / "script.py"
    # A 256 MiB block written through, so its pages are resident; the script ends in sys.exit like ours.
    script.write_text(
        "import sys\nblock = bytearray(b'x' * (256 * 2**20))\nsys.exit(0 if sys.argv[1] == 'ok' else 'bad input')\n"
    )
    timing = run(tmp_path, "script.py", ["ok"], "")
    assert timing.wall > 0 and timing.cpu > 0 and 0.25 <= timing.peak_gib < 2
    with pytest.raises(RuntimeError, match="bad input"):
        run(tmp_path, "script.py", ["no"], "")


def _bytes_read_by_this_process() -> int:
    return int(re.search(r"^rchar: (\d+)$", open("/proc/self/io").read(), re.M).group(1))


def test_warm_page_cache_reads_every_byte_of_every_input(tmp_path):
    sizes = [0, 1, 16 * 2**20 + 7, 3 * 2**20]  # empty, tiny, more than one buffer, less than one
    paths = []
    for index, size in enumerate(sizes):
        paths.append(tmp_path / f"input{index}.bin")
        paths[-1].write_bytes(b"\x01" * size)
    before = _bytes_read_by_this_process()
    warm_page_cache(paths)
    read = _bytes_read_by_this_process() - before
    assert sum(sizes) <= read < sum(sizes) + 2**20  # every byte once (plus /proc/self/io itself)


def test_run_reads_its_inputs_before_the_script_starts(tmp_path, monkeypatch):
    import bench.compare_kohya_lora_tools as compare

    marker, warmed = tmp_path / "warmed", []

    def record(paths):
        warmed.append(list(paths))
        marker.write_text("done")

    monkeypatch.setattr(compare, "warm_page_cache", record)
    script = "import pathlib, sys\nsys.exit(0 if pathlib.Path('warmed').exists() else 'cold')\n"
    (tmp_path / "script.py").write_text(script)
    compare.run(tmp_path, "script.py", [], "", [tmp_path / "a", tmp_path / "b"])
    assert warmed == [[tmp_path / "a", tmp_path / "b"]]


def test_held_takes_the_lock_for_the_block(tmp_path):
    lock = tmp_path / "big.lock"
    with held(lock), open(lock) as other, pytest.raises(BlockingIOError):
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
    with open(lock) as other:  # released after the block
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_perturbation_has_the_asked_spectrum_and_size():
    weight = torch.randn(40, 6, 3, 3, generator=torch.Generator().manual_seed(3)).half()
    change = perturbation(weight, seed=1, rank=8, decay=0.6, relative=0.2, noise=0.01)
    assert change.shape == weight.shape and change.dtype == torch.float32
    assert float(change.norm()) == pytest.approx(0.2 * float(weight.float().norm()), rel=1e-5)
    s = torch.linalg.svdvals(change.double().reshape(40, -1))
    decay = torch.arange(1, 9, dtype=torch.float64) ** -0.6
    torch.testing.assert_close(s[:8] / s[0], decay, rtol=0.05, atol=0)  # the low-rank part, noise barely moves it
    assert float(s[8]) < 0.1 * float(s[7])  # then only the small noise tail
    assert torch.equal(change, perturbation(weight, seed=1, rank=8, decay=0.6, relative=0.2, noise=0.01))


@pytest.mark.parametrize("shape", [(30, 50), (50, 30)])
def test_top_reference_matches_a_dense_float64_svd(shape):
    matrix = torch.randn(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    top = top_reference(matrix, 5)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    torch.testing.assert_close(top.S, s[:5], rtol=1e-12, atol=0)
    assert subspace_error(top.U, u[:, :5]) < 1e-12 and subspace_error(top.V, vh[:5].T) < 1e-12
    torch.testing.assert_close((top.U * top.S) @ top.V.T, (u[:, :5] * s[:5]) @ vh[:5], rtol=0, atol=1e-12)


def test_compare_extracted_scores_exact_and_rotated_factors(tiny_sd, tmp_path):
    """An extraction of the tuned tiny model against itself scores ~0; turning one module's up
    factor by a known angle gives that angle's sine, and halving the update a Frobenius error of 1/2."""
    tuned = tmp_path / "tuned.safetensors"
    write_tuned(tiny_sd.sd1_file, tuned)
    ours = tmp_path / "ours.safetensors"
    assert exit_status(extract_lora_from_models.main, "--model_org", tiny_sd.sd1_file, "--model_tuned", tuned,
                       "--dim", 2, "--clamp_quantile", 1, "--save_to", ours) == 0  # fmt: skip
    exact = compare_extracted(tiny_sd.sd1_file, tuned, ours, ours)
    assert exact.same_keys and exact.same_ranks and exact.ranks == {2} and exact.modules > 0
    assert max(exact.ours_left + exact.ours_right + exact.kohya_left) < 1e-5  # float32 storage of the factors
    assert max(exact.ours_fro) < 1e-5 and not any(exact.kohya_clamped)
    tensors = load_file(ours)
    name = next(k for k in tensors if k.endswith(".lora_up.weight") and tensors[k].dim() == 2)[
        : -len(".lora_up.weight")
    ]
    up = tensors[f"{name}.lora_up.weight"].double()
    q = torch.linalg.qr(up, mode="complete").Q
    outside = q[:, 2]  # orthogonal to both columns: turn the second column towards it by 0.2 rad
    column = up[:, 1]
    up[:, 1] = column.norm() * (math.cos(0.2) * column / column.norm() + math.sin(0.2) * outside)
    tensors[f"{name}.lora_up.weight"] = up.float()
    halved = {
        k: v * 0.5 if k.endswith(".lora_up.weight") and k != f"{name}.lora_up.weight" else v
        for k, v in tensors.items()
    }
    kohya = tmp_path / "kohya.safetensors"
    save_file(halved, kohya)
    result = compare_extracted(tiny_sd.sd1_file, tuned, kohya, ours)
    assert max(result.kohya_left) == pytest.approx(math.sin(0.2), rel=1e-4)
    assert max(result.kohya_right) < 1e-5
    assert sorted(result.kohya_fro)[len(result.kohya_fro) // 2] == pytest.approx(0.5, rel=1e-4)
    assert "modules its clamp left alone" in str(result)
