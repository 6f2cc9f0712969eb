"""Extraction benchmark: kohya's full float32 SVD against ``top_singular`` on SD1.5-shaped weight differences.

For one layer of each distinct shape among kohya's LoCon targets of SD1.5 (72 text-encoder and 278
UNet modules), a random difference with a decaying spectrum (singular values ~ i ** -decay) is
decomposed both ways in the same process, one thread each: kohya's ``torch.linalg.svd`` (float32,
full ``U``/``Vh``, as ``extract_lora_from_models.py`` calls it) and the truncated SVD. Times are
extrapolated to the whole model by shape counts; accuracy is the subspace error (sin of the largest
principal angle) of the top-``rank`` left and right singular vectors against a float64 SVD.

    python -m bench.bench_extract [--dim 32] [--conv_dim 16] [--decay 0.6] [--threads 1]
"""

from __future__ import annotations

import argparse
import collections
import time

import torch

from bench.bench_resize import sd15_targets
from library.lora_tools.extract import ExtractRequest
from library.lora_tools.truncated_svd import subspace_error, top_singular
from library.synthetic_lora import decaying_matrix


def cpu_seconds(function, *args) -> tuple[float, object]:
    start = time.process_time()
    result = function(*args)
    return time.process_time() - start, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--conv_dim", type=int, default=16)
    parser.add_argument("--decay", type=float, default=0.6)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--start", default="0x0", help="resume: skip shapes before OUTxFAN_IN in the table's order")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    request = ExtractRequest(args.dim, args.conv_dim)
    targets = sd15_targets()
    shapes = collections.Counter(
        (t.out_features, t.in_features * t.kernel_size[0] * t.kernel_size[1], request.rank(t)) for t in targets
    )
    print(
        f"{len(targets)} modules, {len(shapes)} shapes; dim {args.dim}, conv_dim {args.conv_dim}, decay {args.decay}"
    )
    header = ("shape", "rank", "n", "kohya s", "ours s", "x", "iter", "err kohya", "err ours")
    print("{:>14} {:>4} {:>3} {:>8} {:>7} {:>5} {:>4} {:>9} {:>9}".format(*header))
    total_dense = total_ours = 0.0
    worst = []
    for index, ((out_features, fan_in, rank), count) in enumerate(sorted(shapes.items())):
        if (out_features, fan_in) < tuple(int(v) for v in args.start.split("x")):
            continue
        matrix = decaying_matrix(out_features, fan_in, args.decay, index)
        dense_s, (u, _, vh) = cpu_seconds(torch.linalg.svd, matrix)
        ours_s, top = cpu_seconds(top_singular, matrix, rank)
        u64, _, vh64 = torch.linalg.svd(matrix.double(), full_matrices=False)
        err_kohya = max(subspace_error(u[:, :rank], u64[:, :rank]), subspace_error(vh[:rank].T, vh64[:rank].T))
        err_ours = max(subspace_error(top.U, u64[:, :rank]), subspace_error(top.V, vh64[:rank].T))
        worst.append(err_ours / err_kohya)
        total_dense += dense_s * count
        total_ours += ours_s * count
        print(
            f"{out_features:>5}x{fan_in:<8} {rank:>4} {count:>3} {dense_s:>8.3f} {ours_s:>7.3f}"
            f" {dense_s / ours_s:>5.0f} {top.iterations:>4} {err_kohya:>9.1e} {err_ours:>9.1e}"
        )
    print(
        f"whole model (extrapolated by shape counts): kohya {total_dense:.1f} CPU s, ours {total_ours:.1f} CPU s, "
        f"x{total_dense / total_ours:.1f}; largest error ratio ours/kohya {max(worst):.2f}"
    )


if __name__ == "__main__":
    main()
