"""Benchmark of the image trainers: test accuracy, training seconds (training loop only) and
images per second, per data set, framework and profile, on the CPU and, when present, on CUDA.
Prints figures; asserts nothing (targets and measured figures: docs/performance.md).

    .venv/bin/python bench/image_bench.py                       # MNIST fast, both frameworks, CPU
    .venv/bin/python bench/image_bench.py --datasets cifar10 --profiles fast quality --devices cuda

Needs only numpy, PIL and the framework (no Airflow, no MLflow), so it runs on a bare GPU box:
``--frameworks pytorch`` there when TensorFlow is not installed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dags"))

from scripts.image import data as image_data  # noqa: E402
from scripts.image.base import TrainConfig, draw_subset  # noqa: E402


def available_devices() -> list[str]:
    devices = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            devices.append("cuda")
    except ImportError:
        pass
    return devices


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="mirror folder")
    parser.add_argument("--datasets", nargs="+", default=["mnist"], choices=["mnist", "cifar10"])
    parser.add_argument("--frameworks", nargs="+", default=["pytorch", "tensorflow"])
    parser.add_argument("--profiles", nargs="+", default=["fast"])
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if present")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ["DATA_MIRROR"] = str(args.data)
    os.environ.setdefault("VTM_HOME", str(ROOT / ".local"))
    devices = args.devices or available_devices()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, python {platform.python_version()}, "
          f"devices {devices}", flush=True)
    rows = []
    for dataset in args.datasets:
        started = time.perf_counter()
        arrays = image_data.load_snapshot(image_data.prepare(dataset).uri)
        print(f"{dataset}: {len(arrays.y_train)} train / {len(arrays.y_test)} test images, "
              f"prepared in {time.perf_counter() - started:.1f} s", flush=True)
        for framework in args.frameworks:
            if framework == "tensorflow":
                from scripts.image.keras_trainer import train_keras as train
            else:
                from scripts.image.torch_trainer import train_torch as train
            for device in devices:
                for profile in args.profiles:
                    cfg = TrainConfig(dataset=dataset, profile=profile, framework=framework,
                                      device=device, seed=args.seed)
                    result = train(draw_subset(arrays, cfg.recipe, cfg.seed).apply(arrays), cfg)
                    row = {"dataset": dataset, "framework": framework, "profile": profile,
                           "device": result.device, "epochs": cfg.recipe.epochs,
                           "test_accuracy": round(result.test_accuracy, 4),
                           "train_seconds": round(result.train_seconds, 2),
                           "images_per_second": round(result.images_per_second)}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    print("\ndataset  framework   profile  device  epochs  test_acc  train_s  images/s")
    for r in rows:
        print(f"{r['dataset']:8s} {r['framework']:11s} {r['profile']:8s} {r['device']:6s} {r['epochs']:6d}"
              f"  {r['test_accuracy']:.4f}  {r['train_seconds']:7.1f}  {r['images_per_second']:8d}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
