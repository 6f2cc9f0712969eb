#!/usr/bin/env bash
# Builds kohya sd-scripts' own venv for `python -m bench.bench_train_step --kohya_python VENV/bin/python`
# (docs/training.md, "Measured: memory and start-up"): kohya's requirements.txt pins, on the same torch
# 2.13.0 CPU build as ours, every version pinned by bench/kohya_venv_constraints.txt.
#   bench/kohya_venv.sh KOHYA_DIR VENV
# Left out of kohya's requirements: torch/torchvision (PyPI's torchvision does not load beside torch
# 2.13 CPU; bench_train_step puts bench/kohya_torchvision on kohya's PYTHONPATH instead) and `-e .`
# (train_network.py imports kohya's `library` from its own folder).
set -euo pipefail
kohya=${1:?usage: bench/kohya_venv.sh KOHYA_DIR VENV}
venv=${2:?usage: bench/kohya_venv.sh KOHYA_DIR VENV}
constraints="$(cd "$(dirname "$0")" && pwd)/kohya_venv_constraints.txt"
python3 -m venv "$venv"
"$venv/bin/pip" install -c "$constraints" torch==2.13.0 # first: nothing later may pull another build
grep -v -E '^\s*(torch|torchvision)\b|^\s*-e ' "$kohya/requirements.txt" >"$venv/kohya_requirements.txt"
"$venv/bin/pip" install -c "$constraints" -r "$venv/kohya_requirements.txt"
"$venv/bin/pip" check
