#!/usr/bin/env bash
# The image workflows' GPU check (issue 12) as one command:
#
#   bash bench/gpu_check.sh --prepare   # here, once: copy the mirror's CIFAR-10 JPEG tarball and
#                                       # MNIST files into .device-data/ (git-ignored, ~31 MB), so
#                                       # they travel with the working tree to a GPU box
#   bash bench/gpu_check.sh             # on the GPU box: CIFAR-10 fast and quality, MNIST fast,
#                                       # 4 seeds each on cuda, a DAG task's wall time per row
#
# Data: .device-data/ if it holds the files, else DATA_MIRROR, else ../shared/data.
# Python: .venv/bin/python where it exists (here), else python3 (a GPU box's holds PyTorch).
# Settings (environment): GPU_CHECK_DEVICES (default cuda), GPU_CHECK_SEEDS (default 4),
# GPU_CHECK_ROWS (default "cifar10:fast cifar10:quality mnist:fast"), GPU_CHECK_EPOCHS (unset:
# each profile's), GPU_CHECK_EXTRA (more bench arguments, e.g. "--batch-size 512" for a tuning
# run), GPU_CHECK_OUT (a folder for the rows as JSON; default $OUT where set).
# A CPU dry run of the whole path, in a minute or so:
#   GPU_CHECK_DEVICES=cpu GPU_CHECK_SEEDS=2 GPU_CHECK_ROWS="mnist:smoke cifar10:smoke" bash bench/gpu_check.sh
set -euo pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
device_data="$root/.device-data"

if [[ "${1:-}" == "--prepare" ]]; then
    mirror="${DATA_MIRROR:-$root/../shared/data}"
    mkdir -p "$device_data/cifar10" "$device_data/mnist"
    cp "$mirror/cifar10/cifar10-jpeg.tar.gz" "$device_data/cifar10/"
    cp "$mirror"/mnist/*-ubyte.gz "$device_data/mnist/"
    du -sh "$device_data"
    exit 0
fi

if [[ -f "$device_data/cifar10/cifar10-jpeg.tar.gz" ]]; then
    data="$device_data"
else
    data="${DATA_MIRROR:-$root/../shared/data}"
fi
if [[ ! -d "$data/cifar10" || ! -d "$data/mnist" ]]; then
    echo "no data under $data: run 'bash bench/gpu_check.sh --prepare' here first, and carry .device-data" >&2
    exit 2
fi

python=python3
[[ -x "$root/.venv/bin/python" ]] && python="$root/.venv/bin/python"

out="${GPU_CHECK_OUT:-${OUT:-}}"
args=(--data "$data" --frameworks pytorch --devices ${GPU_CHECK_DEVICES:-cuda}
      --rows ${GPU_CHECK_ROWS:-cifar10:fast cifar10:quality mnist:fast}
      --seeds "${GPU_CHECK_SEEDS:-4}" --task-wall)
[[ -n "${GPU_CHECK_EPOCHS:-}" ]] && args+=(--epochs "$GPU_CHECK_EPOCHS")
[[ -n "${GPU_CHECK_EXTRA:-}" ]] && args+=(${GPU_CHECK_EXTRA})
[[ -n "$out" ]] && args+=(--json "$out/gpu_check.json")

cd "$root"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
export PYTHONUNBUFFERED=1 VTM_HOME="${VTM_HOME:-$root/.local}"
exec "$python" bench/image_bench.py "${args[@]}"
