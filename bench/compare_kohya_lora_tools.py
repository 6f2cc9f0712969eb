"""Our merge_lora.py / svd_merge_lora.py / extract_lora_from_models.py against kohya's own scripts, same run.

Needs a kohya sd-scripts checkout (``--kohya_dir``; its ``library`` must import). kohya's
``library/utils.py`` and ``train_util.py`` import torchvision, cv2 and imagesize for image code the
LoRA tools never call; ``--extra_path`` (default: ``bench/kohya_stubs``, cv2 and imagesize import
stubs that raise if used, and ``bench/kohya_torchvision``, a torchvision stand-in) stands in for them,
so kohya's tools run in this suite's environment; in an environment with kohya's requirements give
``--extra_path bench/kohya_torchvision`` (PyPI's torchvision does not load beside torch 2.13 CPU).
Writes everything under ``--work_dir``.

    python -m bench.compare_kohya_lora_tools --kohya_dir ~/sd-scripts [--conv] \
        [--lock /work/bigmem.lock] [--threads 1] [--extract_dim 8 [--extract_conv_dim 8]]

Checks: ``merge_lora.py --kohya_arithmetic`` (and ``--concat``) write kohya's tensors bit for bit;
the exact merge's update is the exact sum (kohya's is not); ``svd_merge_lora.py`` gives kohya's
ranks and an update closer to the exact sum than kohya's; ``merge_lora.py --sd_model`` bakes an
SD1.5-shaped random fp16 checkpoint into kohya's float32 tensors to float32 rounding, every
untouched tensor bit for bit; ``extract_lora_from_models.py`` on that checkpoint and a copy with
every LoCon target moved (low rank plus noise) gives kohya's keys and ranks, and both files' factors
are scored against float64 top-rank SVDs of the stored difference (principal angles, Frobenius
error). Each script runs in its own process, timed (wall, CPU, peak RSS), after its input files
have been read into the page cache, so neither tool pays for the other's disk reads.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from bench.bench_resize import sd15_targets
from library.synthetic_lora import random_lora

REPO = Path(__file__).resolve().parents[1]

# Runs a script as ``python script args`` would (its folder first on sys.path) and prints the
# child's peak RSS (VmHWM of its own address space; ru_maxrss would include the forking parent's)
# on its last stderr line, also when the script ends in sys.exit.
_CHILD = (
    "import atexit, os, runpy, sys\n"
    "def peak():\n"
    "    hwm = [line for line in open('/proc/self/status') if line.startswith('VmHWM:')][0]\n"
    "    print(f'peak_rss_kib={hwm.split()[1]}', file=sys.stderr)\n"
    "atexit.register(peak)\n"
    "sys.argv = sys.argv[1:]\n"
    "sys.path.insert(0, os.path.dirname(os.path.abspath(sys.argv[0])))\n"
    "runpy.run_path(sys.argv[0], run_name='__main__')\n"
)


@dataclass(frozen=True)
class Timing:
    """One script run: wall seconds, CPU seconds (user + system) and peak resident memory in GiB."""

    wall: float
    cpu: float
    peak_gib: float

    def __str__(self) -> str:
        return f"{self.wall:.1f} s wall, {self.cpu:.1f} s CPU, {self.peak_gib:.2f} GiB peak"


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def warm_page_cache(paths: list[Path | str]) -> None:
    """Read every input file once, so each timed run starts from the same, cached, state.

    Both tools map their inputs; whichever runs first would otherwise also pay for reading them from
    disk, and on this VM the host shrinks the page cache after a large run (kohya's extraction peaks
    at 10 GiB), so the second run re-reads gigabytes that the first had cached.
    """
    buffer = bytearray(16 * 2**20)
    for path in paths:
        with open(path, "rb", buffering=0) as handle:
            while handle.readinto(buffer):
                pass


def run(cwd: Path, script: str, args: list[str], pythonpath: str, inputs: list[Path | str] = ()) -> Timing:
    """Run ``script`` in its own process (``inputs`` read into the page cache first): time and peak RSS."""
    warm_page_cache(inputs)
    env = dict(os.environ, PYTHONPATH=pythonpath)
    start, cpu = time.perf_counter(), _children_cpu()
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, script, *args], cwd=cwd, env=env, capture_output=True, text=True
    )
    wall, cpu = time.perf_counter() - start, _children_cpu() - cpu
    lines = done.stderr.strip().splitlines()
    if done.returncode != 0:
        message = next((line for line in reversed(lines) if not line.startswith("peak_rss_kib=")), "")
        raise RuntimeError(f"{cwd / script} failed: {message}")
    peak_kib = int(next(line for line in reversed(lines) if line.startswith("peak_rss_kib=")).split("=")[1])
    return Timing(wall, cpu, peak_kib / 2**20)


@contextmanager
def held(lock: Path | None):
    """Hold an advisory lock (the shared machine's big-memory lock) for the block; nothing when None."""
    if lock is None:
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def update(tensors: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    """A module's dense update ``alpha / rank * up @ down`` in float64 (conv kernels flattened)."""
    down = tensors[f"{name}.lora_down.weight"].double()
    up = tensors[f"{name}.lora_up.weight"].double()
    return (
        (up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1))
        * float(tensors[f"{name}.alpha"])
        / down.shape[0]
    )


def exact_sum(inputs: list[dict[str, torch.Tensor]], ratios: list[float], name: str) -> torch.Tensor:
    """``Σ ratio_i * update_i`` in float64: what a merge of the inputs should equal."""
    return sum(ratio * update(tensors, name) for tensors, ratio in zip(inputs, ratios))


def relative_errors(
    merged: dict[str, torch.Tensor], inputs: list[dict[str, torch.Tensor]], ratios: list[float], names: list[str]
) -> list[float]:
    """Per module ``||update(merged) - exact sum||_F / ||exact sum||_F``."""
    errors = []
    for name in names:
        exact = exact_sum(inputs, ratios, name)
        errors.append(float(torch.linalg.matrix_norm(update(merged, name) - exact) / torch.linalg.matrix_norm(exact)))
    return errors


def float32_ulps(reference: torch.Tensor, other: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
    """``|other - reference|`` in float32 units in the last place of ``max(|reference|, |scale|)`` (elementwise).

    A baked weight ``W + update`` near zero has a tiny ulp of its own, while kohya's float32
    ``up @ down`` errs by ulps of its (much larger) terms; ``scale=max|W|`` measures at the tensor's scale.
    """
    magnitude = reference.float().abs()
    if scale is not None:
        magnitude = torch.maximum(magnitude, scale.float().abs())
    ulp = torch.nextafter(magnitude, torch.tensor(float("inf"))) - magnitude
    return (other.double() - reference.double()).abs() / ulp.double()


@dataclass
class BakeComparison:
    """Two baked checkpoints (kohya's, ours) against each other and the checkpoint they were baked from."""

    tensors: int = 0
    changed: int = 0  # tensors that differ from the input in either output
    untouched: int = 0  # tensors equal to the input (cast) in both outputs, so bit-identical to each other
    changed_by_one_only: list[str] = field(default_factory=list)
    only_in_kohya: list[str] = field(default_factory=list)
    only_in_ours: list[str] = field(default_factory=list)
    max_ulps: float = 0.0  # largest |kohya - ours| in float32 ulps of max|W| (the tensor's scale)
    differing_elements: int = 0
    changed_elements: int = 0
    max_relative: float = 0.0  # largest max|kohya - ours| / max|ours| over the changed tensors
    dtypes: set[str] = field(default_factory=set)

    def __str__(self) -> str:
        return (
            f"{self.tensors} tensors; {self.changed} baked, {self.untouched} untouched and bit-identical; "
            f"baked: max |kohya - ours| {self.max_ulps:.2f} float32 ulp of max |W|, "
            f"{self.differing_elements}/{self.changed_elements} elements differ, "
            f"max |diff| / max |W| {self.max_relative:.2e}; dtypes {sorted(self.dtypes)}; "
            f"changed by one tool only: {len(self.changed_by_one_only)}; "
            f"keys only in kohya's: {len(self.only_in_kohya)}, only in ours: {len(self.only_in_ours)}"
        )


def compare_baked(original: Path, kohya: Path, ours: Path) -> BakeComparison:
    """Compare every tensor of the two baked files, one at a time (SD1.5 in float32 is ~4 GiB a file)."""
    result = BakeComparison()
    with (
        safe_open(original, "pt") as base,
        safe_open(kohya, "pt") as theirs,
        safe_open(ours, "pt") as mine,
    ):
        kohya_keys, our_keys, base_keys = set(theirs.keys()), set(mine.keys()), set(base.keys())
        result.only_in_kohya = sorted(kohya_keys - our_keys)
        result.only_in_ours = sorted(our_keys - kohya_keys)
        for key in sorted(kohya_keys & our_keys):
            k, o = theirs.get_tensor(key), mine.get_tensor(key)
            result.tensors += 1
            result.dtypes |= {f"kohya {k.dtype}", f"ours {o.dtype}"}
            b = base.get_tensor(key).to(o.dtype) if key in base_keys else None
            k_same = b is not None and torch.equal(k.to(o.dtype), b)
            o_same = b is not None and torch.equal(o, b)
            if k_same and o_same:
                result.untouched += 1
                continue
            result.changed += 1
            if k_same != o_same:
                result.changed_by_one_only.append(key)
            if not o.is_floating_point():
                continue
            ulps = float32_ulps(o, k, None if b is None else b.abs().max())
            result.max_ulps = max(result.max_ulps, float(ulps.max()))
            result.differing_elements += int((ulps > 0).sum())
            result.changed_elements += o.numel()
            diff = (k.double() - o.double()).abs().max() / o.double().abs().max()
            result.max_relative = max(result.max_relative, float(diff))
    return result


def write_loras(work: Path, targets, specs: list[tuple[int, float, int, float]], prefix: str) -> list[str]:
    """fp16 kohya LoRA/LoCon files, one per ``(dim, alpha, conv_dim, conv_alpha)``."""
    files = []
    for index, (dim, alpha, conv_dim, conv_alpha) in enumerate(specs):
        path = work / f"{prefix}{index}.safetensors"
        tensors = random_lora(targets, dim, alpha, conv_dim, conv_alpha, seed=index, dtype=torch.float16)
        save_file(tensors, path)
        files.append(str(path))
    return files


def compare_merges(args, work: Path, files: list[str], names: list[str], kohya_path: str) -> None:
    inputs = [load_file(f) for f in files]
    for label, extra, chosen in [("sum", [], [0, 1]), ("concat", ["--concat"], [0, 2])]:
        kohya_out, ours_out = work / f"kohya_{label}.safetensors", work / f"ours_{label}.safetensors"
        chosen_files = [files[i] for i in chosen]
        common = ["--models", *chosen_files, "--ratios", "0.7", "-0.4", *extra]
        kohya_args = [*common, "--save_to", str(kohya_out)]
        kohya_t = run(args.kohya_dir, "networks/merge_lora.py", kohya_args, kohya_path, chosen_files)
        ours_args = [*common, "--kohya_arithmetic", "--save_to", str(ours_out)]
        ours_t = run(REPO, "networks/merge_lora.py", ours_args, "", chosen_files)
        kohya, ours = load_file(kohya_out), load_file(ours_out)
        same = set(kohya) == set(ours) and all(torch.equal(kohya[k], ours[k]) for k in kohya)
        dtypes = sorted({str(v.dtype) for v in kohya.values()} | {str(v.dtype) for v in ours.values()})
        print(f"merge_lora {label}: kohya {kohya_t}; ours --kohya_arithmetic {ours_t}; tensors equal: {same} {dtypes}")
        if label == "sum":
            exact_out = work / "ours_exact.safetensors"
            exact_t = run(REPO, "networks/merge_lora.py", [*common, "--save_to", str(exact_out)], "", chosen_files)
            exact = load_file(exact_out)
            ranks = sorted({exact[f"{n}.lora_down.weight"].shape[0] for n in names})
            ours_errors = relative_errors(exact, [inputs[i] for i in chosen], [0.7, -0.4], names)
            kohya_errors = relative_errors(kohya, [inputs[i] for i in chosen], [0.7, -0.4], names)
            print(
                f"merge_lora exact (ours, no flag): {exact_t}; ranks {ranks}; relative error to the exact sum "
                f"max {max(ours_errors):.1e} (float32 storage); kohya's sum of factors: "
                f"{min(kohya_errors):.2f}-{max(kohya_errors):.2f}"
            )


def compare_svd_merge(args, work: Path, files: list[str], names: list[str], kohya_path: str) -> None:
    kohya_out, ours_out = work / "kohya_svd.safetensors", work / "ours_svd.safetensors"
    common = ["--models", *files[:2], "--ratios", "0.7", "-0.4", "--new_rank", "8", "--new_conv_rank", "4"]
    kohya_args = [*common, "--save_to", str(kohya_out)]
    kohya_t = run(args.kohya_dir, "networks/svd_merge_lora.py", kohya_args, kohya_path, files[:2])
    ours_t = run(REPO, "networks/svd_merge_lora.py", [*common, "--save_to", str(ours_out)], "", files[:2])
    kohya, ours = load_file(kohya_out), load_file(ours_out)
    inputs = [load_file(f) for f in files[:2]]
    ranks_kohya = [kohya[f"{n}.lora_down.weight"].shape[0] for n in names]
    ranks_ours = [ours[f"{n}.lora_down.weight"].shape[0] for n in names]
    ours_errors = relative_errors(ours, inputs, [0.7, -0.4], names)
    kohya_errors = relative_errors(kohya, inputs, [0.7, -0.4], names)
    ratios = [a / b for a, b in zip(ours_errors, kohya_errors)]
    closer = sum(a <= b for a, b in zip(ours_errors, kohya_errors))
    print(
        f"svd_merge_lora: kohya {kohya_t}; ours {ours_t}; same ranks: {ranks_kohya == ranks_ours} "
        f"({sorted(set(ranks_ours))}); ours closer to the exact sum in {closer}/{len(names)} modules; "
        f"relative error ours {min(ours_errors):.3f}-{max(ours_errors):.3f}, "
        f"kohya {min(kohya_errors):.3f}-{max(kohya_errors):.3f}; ratio ours/kohya {min(ratios):.3f}-{max(ratios):.3f}"
    )


def compare_bake(args, work: Path, kohya_path: str) -> None:
    from bench.bench_train_step import write_random_sd15

    checkpoint = work / "sd15_random_fp16.safetensors"
    with held(args.lock):
        if not checkpoint.exists():
            write_random_sd15(checkpoint, work / "tokenizers")
        files = write_loras(work, sd15_targets(), [(16, 8.0, 8, 4.0), (8, 8.0, 4, 4.0)], "locon")
        kohya_out, ours_out = work / "kohya_baked.safetensors", work / "ours_baked.safetensors"
        common = ["--sd_model", str(checkpoint), "--models", *files, "--ratios", "0.7", "-0.4"]
        inputs = [checkpoint, *files]
        kohya_args = [*common, "--save_to", str(kohya_out)]
        kohya_t = run(args.kohya_dir, "networks/merge_lora.py", kohya_args, kohya_path, inputs)
        ours_args = [*common, "--save_precision", "float", "--save_to", str(ours_out)]
        ours_t = run(REPO, "networks/merge_lora.py", ours_args, "", inputs)
        result = compare_baked(checkpoint, kohya_out, ours_out)
    print(f"merge_lora --sd_model (LoCon, {len(sd15_targets())} modules each): kohya {kohya_t}; ours {ours_t}")
    print(f"  {result}")


def perturbation(
    weight: torch.Tensor, seed: int, rank: int = 64, decay: float = 0.6, relative: float = 0.2, noise: float = 0.25
) -> torch.Tensor:
    """A fine-tune-like float32 change of ``weight`` (conv kernels flattened): low rank plus noise.

    Singular values ``i ** -decay`` for ``i <= rank`` (so every top-``dim`` subspace up to ``rank`` is
    well separated) plus Gaussian noise of ``noise`` times that part's Frobenius norm (a flat tail
    of full rank), scaled to ``relative * ||weight||_F``.
    """
    generator = torch.Generator().manual_seed(seed)
    flat = weight.float().reshape(weight.shape[0], -1)
    m, n = flat.shape
    rank = min(rank, m, n)
    left = torch.linalg.qr(torch.randn(m, rank, generator=generator)).Q
    right = torch.linalg.qr(torch.randn(n, rank, generator=generator)).Q
    values = torch.arange(1, rank + 1, dtype=torch.float32) ** -decay
    low_rank = (left * values) @ right.T
    tail = torch.randn(m, n, generator=generator)
    change = low_rank + tail * (noise * float(values.norm()) / float(tail.norm()))
    return (change * (relative * float(flat.norm()) / float(change.norm()))).reshape(weight.shape)


def write_tuned(checkpoint: Path, tuned: Path) -> None:
    """``checkpoint`` with every LoCon target weight (text encoder and UNet) moved by :func:`perturbation`, fp16."""
    from library.lora_tools.extract import extraction_targets
    from library.lora_tools.sd_weights import read_sd_weights, write_sd_weights

    weights = read_sd_weights(checkpoint)
    for index, target in enumerate(extraction_targets(weights, conv=True)):
        part, key = ("te", "unet")[target.prefix != "lora_te"], f"{target.path}.weight"
        before = weights.tensor(part, key)
        weights.replace(part, key, (before.float() + perturbation(before, seed=index)).to(before.dtype))
    write_sd_weights(weights, tuned)


@dataclass(frozen=True)
class TopReference:
    """The top-``k`` singular triplets of a float64 matrix: ``U`` (m x k), ``S`` (k), ``V`` (n x k)."""

    U: torch.Tensor
    S: torch.Tensor
    V: torch.Tensor


def top_reference(matrix: torch.Tensor, k: int) -> TopReference:
    """Float64 top-``k`` singular triplets from an eigendecomposition of the smaller Gram matrix.

    Cheaper than a dense SVD of the 1280 x 11520 convs; the Gram matrix squares the condition but
    its eigenvectors' error stays near ``1e-16 * S[0]^2 / (S[k-1]^2 - S[k]^2)``, far below float32's.
    """
    a = matrix.double()
    wide = a.shape[0] <= a.shape[1]
    gram = a @ a.T if wide else a.T @ a
    values, vectors = torch.linalg.eigh(gram)
    order = torch.argsort(values, descending=True)[:k]
    s = values[order].clamp_min(0).sqrt()
    side = vectors[:, order]
    other = (a.T @ side if wide else a @ side) / s
    return TopReference(side, s, other) if wide else TopReference(other, s, side)


@dataclass
class ExtractComparison:
    """Two extracted LoRAs (kohya's, ours) against float64 top-``rank`` SVDs of the stored differences."""

    modules: int = 0
    same_keys: bool = False
    same_ranks: bool = False
    ranks: set[int] = field(default_factory=set)
    # per module: sin of the largest principal angle of up's columns / down's rows to the reference
    kohya_left: list[float] = field(default_factory=list)
    kohya_right: list[float] = field(default_factory=list)
    ours_left: list[float] = field(default_factory=list)
    ours_right: list[float] = field(default_factory=list)
    # per module: ||alpha / rank * up @ down - U_k S_k V_k^T||_F / ||U_k S_k V_k^T||_F
    kohya_fro: list[float] = field(default_factory=list)
    ours_fro: list[float] = field(default_factory=list)
    # per module: kohya's clamp at +-max(entries) cut its most negative entry (it does at --clamp_quantile 1)
    kohya_clamped: list[bool] = field(default_factory=list)

    def __str__(self) -> str:
        def stats(values: list[float]) -> str:
            return f"max {max(values):.1e} median {statistics.median(values):.1e}"

        subspace_ours = [max(a, b) for a, b in zip(self.ours_left, self.ours_right)]
        subspace_kohya = [max(a, b) for a, b in zip(self.kohya_left, self.kohya_right)]
        not_worse = sum(o <= k for o, k in zip(subspace_ours, subspace_kohya))
        kept = [i for i, cut in enumerate(self.kohya_clamped) if not cut]
        unclamped = (
            f"    kohya, the {len(kept)} modules its clamp left alone: up "
            f"{stats([self.kohya_left[i] for i in kept])}, down {stats([self.kohya_right[i] for i in kept])}\n"
            if kept
            else ""
        )
        return (
            f"{self.modules} modules, same keys {self.same_keys}, same ranks {self.same_ranks} "
            f"({sorted(self.ranks)}); subspace error (sin of the largest principal angle, up and down):\n"
            f"    kohya up {stats(self.kohya_left)}, down {stats(self.kohya_right)}\n{unclamped}"
            f"    ours  up {stats(self.ours_left)}, down {stats(self.ours_right)}; "
            f"ours <= kohya's in {not_worse}/{self.modules} modules\n"
            f"  relative Frobenius error of the update to the float64 rank-k truncation: "
            f"kohya {stats(self.kohya_fro)}, ours {stats(self.ours_fro)}; "
            f"kohya's clamp cut {sum(self.kohya_clamped)} modules"
        )


def compare_extracted(original: Path, tuned: Path, kohya: Path, ours: Path) -> ExtractComparison:
    """Every module of both extracted files against the float64 top-``rank`` SVD of ``tuned - original``."""
    from library.lora_tools.extract import extraction_targets
    from library.lora_tools.sd_weights import read_sd_weights
    from library.lora_tools.truncated_svd import span_error

    base, moved = read_sd_weights(original), read_sd_weights(tuned)
    targets = {t.name: t for t in extraction_targets(base, conv=True)}
    theirs, mine = load_file(kohya), load_file(ours)
    result = ExtractComparison(same_keys=set(theirs) == set(mine))
    names = sorted(k.removesuffix(".lora_down.weight") for k in mine if k.endswith(".lora_down.weight"))
    result.same_ranks = result.same_keys
    for name in names:
        target = targets[name]
        part, key = ("te", "unet")[target.prefix != "lora_te"], f"{target.path}.weight"
        difference = (moved.tensor(part, key).double() - base.tensor(part, key).double()).reshape(
            target.out_features, -1
        )
        rank = mine[f"{name}.lora_down.weight"].shape[0]
        result.ranks.add(rank)
        if name + ".lora_down.weight" not in theirs or theirs[f"{name}.lora_down.weight"].shape[0] != rank:
            result.same_ranks = False
            continue
        truth = top_reference(difference, rank)
        best = (truth.U * truth.S) @ truth.V.T
        for tensors, left, right, fro in (
            (theirs, result.kohya_left, result.kohya_right, result.kohya_fro),
            (mine, result.ours_left, result.ours_right, result.ours_fro),
        ):
            up = tensors[f"{name}.lora_up.weight"].double().reshape(target.out_features, rank)
            down = tensors[f"{name}.lora_down.weight"].double().reshape(rank, -1)
            left.append(span_error(up, truth.U))
            right.append(span_error(down.T, truth.V))
            fro.append(float(torch.linalg.matrix_norm(update(tensors, name) - best) / torch.linalg.matrix_norm(best)))
        joined = torch.cat([theirs[f"{name}.lora_up.weight"].flatten(), theirs[f"{name}.lora_down.weight"].flatten()])
        result.kohya_clamped.append(float(joined.min()) == -float(joined.max()))
        result.modules += 1
    return result


def compare_extract(args, work: Path, kohya_path: str) -> None:
    from bench.bench_train_step import write_random_sd15

    checkpoint, tuned = work / "sd15_random_fp16.safetensors", work / "sd15_tuned_fp16.safetensors"
    script = "networks/extract_lora_from_models.py"
    flags = ["--dim", str(args.extract_dim), "--clamp_quantile", "1", "--save_precision", "float", "--device", "cpu"]
    if args.extract_conv_dim is not None:
        flags += ["--conv_dim", str(args.extract_conv_dim)]
    label = "_".join(flag.strip("-") + value for flag, value in zip(flags[::2], flags[1::2]))
    kohya_out, ours_out = work / f"kohya_extract_{label}.safetensors", work / f"ours_extract_{label}.safetensors"
    common = ["--model_org", str(checkpoint), "--model_tuned", str(tuned), *flags]
    with held(args.lock):
        if not checkpoint.exists():
            write_random_sd15(checkpoint, work / "tokenizers")
        if not tuned.exists():
            print(f"writing {tuned} (every LoCon target moved) ...", flush=True)
            write_tuned(checkpoint, tuned)
        kohya_t = run(args.kohya_dir, script, [*common, "--save_to", str(kohya_out)], kohya_path, [checkpoint, tuned])
        ours_t = run(REPO, script, [*common, "--save_to", str(ours_out)], "", [checkpoint, tuned])
        result = compare_extracted(checkpoint, tuned, kohya_out, ours_out)
    print(
        f"extract_lora_from_models {' '.join(flags)}: kohya {kohya_t}; ours {ours_t}; "
        f"ours x{kohya_t.cpu / ours_t.cpu:.1f} less CPU, x{kohya_t.wall / ours_t.wall:.1f} less wall"
    )
    print(f"  {result}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kohya_dir", required=True, type=Path)
    parser.add_argument(
        "--extra_path",
        default=os.pathsep.join(str(REPO / "bench" / name) for name in ("kohya_stubs", "kohya_torchvision")),
        help="folders appended to kohya's PYTHONPATH (default: the stand-ins for cv2, imagesize and torchvision)",
    )
    parser.add_argument("--work_dir", type=Path, default=None)
    parser.add_argument("--conv", action="store_true", help="LoCon inputs (kohya's dense SVDs then take minutes)")
    parser.add_argument("--skip_merge", action="store_true", help="leave out the LoRA-into-LoRA merges")
    parser.add_argument("--skip_svd", action="store_true", help="leave out svd_merge_lora.py")
    parser.add_argument("--skip_bake", action="store_true", help="leave out baking into an SD1.5-shaped checkpoint")
    parser.add_argument("--skip_extract", action="store_true", help="leave out extract_lora_from_models.py")
    parser.add_argument("--extract_dim", type=int, default=8, help="extraction: --dim of both scripts")
    parser.add_argument(
        "--extract_conv_dim",
        type=int,
        default=None,
        help="extraction: --conv_dim of both (kohya: ~20 CPU min)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads of every script (OMP_NUM_THREADS); on a loaded machine idle threads spin and bill CPU",
    )
    parser.add_argument("--lock", type=Path, default=None, help="a file to flock while the bake runs (big memory)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
        torch.set_num_threads(args.threads)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="kohya_compare_"))
    work.mkdir(parents=True, exist_ok=True)
    kohya_path = os.pathsep.join(p for p in (str(args.kohya_dir), args.extra_path) if p)
    targets = [t for t in sd15_targets() if args.conv or not t.is_conv or t.kernel_size == (1, 1)]
    if not args.conv:
        targets = [t for t in targets if "resnets" not in t.path and "samplers" not in t.path]
    files = write_loras(work, targets, [(16, 8.0, 8, 4.0), (16, 4.0, 8, 2.0), (8, 8.0, 4, 4.0)], "lora")
    print(f"{len(targets)} SD1.5 modules per LoRA; torch threads {torch.get_num_threads()}; files in {work}")
    names = sorted({t.name for t in targets})
    if not args.skip_merge:
        compare_merges(args, work, files, names, kohya_path)
    if not args.skip_svd:
        compare_svd_merge(args, work, files, names, kohya_path)
    if not args.skip_bake:
        compare_bake(args, work, kohya_path)
    if not args.skip_extract:
        compare_extract(args, work, kohya_path)


if __name__ == "__main__":
    main()
