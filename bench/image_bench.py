"""Benchmark of the image trainers: test accuracy (mean and spread over seeds), training seconds
(training loop only) of a process's first run and of the warm runs after it, images per second,
and optionally a DAG task's whole wall time, per data set, framework, profile and device.
Prints a table with the machine's and the card's names; asserts nothing (targets and measured
figures: docs/performance.md).

    .venv/bin/python bench/image_bench.py                       # MNIST fast, CPU
    .venv/bin/python bench/image_bench.py --rows cifar10:fast cifar10:quality mnist:fast \\
        --devices cuda --seeds 4 --task-wall                    # the GPU check (bench/gpu_check.sh)

Seeds of a row run one after another in this process: the first pays what a fresh process pays
(CUDA's lazy loading, cuDNN's autotuning); the rest are "warm". ``--task-wall`` also times a
fresh Python process that does what a DAG's train task does (import, load the snapshot, put it on
the device, train with a checkpoint every epoch, evaluate), start to exit: every DAG task is such
a first run. MLflow logging is not in it (a GPU box has no MLflow).

Needs only numpy, PIL and the framework (no Airflow, no MLflow), so it runs on a bare GPU box;
TensorFlow rows are left out when TensorFlow is not installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dags"))

from scripts.image import data as image_data  # noqa: E402
from scripts.image.base import PROFILES, TrainConfig, draw_subset  # noqa: E402


def available_devices() -> list[str]:
    devices = ["cpu"]
    try:
        import torch

        if torch.cuda.is_available():
            devices.append("cuda")
    except ImportError:
        pass
    return devices


def device_name(device: str) -> str:
    """The card's name for cuda; the processor and core count for cpu."""
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def train_once(arrays, dataset: str, framework: str, profile: str, device: str, seed: int,
               overrides: dict, checkpoint_dir: Path | None = None):
    if framework == "tensorflow":
        from scripts.image.keras_trainer import train_keras as train
    else:
        from scripts.image.torch_trainer import train_torch as train
    cfg = TrainConfig(dataset=dataset, profile=profile, framework=framework, device=device, seed=seed,
                      **overrides)
    return cfg, train(draw_subset(arrays, cfg.recipe, cfg.seed).apply(arrays), cfg,
                      checkpoint_dir=checkpoint_dir)


def task_child(args: argparse.Namespace) -> int:
    """One DAG train task's work in a fresh process (the parent times it from start to exit)."""
    arrays = image_data.load_snapshot(args.snapshot)
    with tempfile.TemporaryDirectory() as checkpoints:
        _, result = train_once(arrays, args.dataset, args.framework, args.profile, args.device,
                               args.seed, overrides(args), Path(checkpoints))
    print(json.dumps({"test_accuracy": result.test_accuracy, "train_seconds": result.train_seconds}), flush=True)
    return 0


def overrides(args: argparse.Namespace) -> dict:
    """The profile settings given on the command line (tuning runs), as TrainConfig fields."""
    given = {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate}
    return {k: v for k, v in given.items() if v is not None}


def task_wall(snapshot: str, dataset: str, framework: str, profile: str, device: str, seed: int,
              settings: dict) -> tuple[float, dict]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--task-child", "--snapshot", snapshot,
           "--datasets", dataset, "--frameworks", framework, "--profiles", profile, "--devices", device,
           "--seed", str(seed)]
    for key, value in settings.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"task process failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return wall, json.loads(done.stdout.strip().splitlines()[-1])


def parse_rows(args: argparse.Namespace) -> list[tuple[str, str]]:
    if args.rows:
        rows = []
        for row in args.rows:
            dataset, _, profile = row.partition(":")
            if dataset not in ("mnist", "cifar10") or profile not in PROFILES:
                raise SystemExit(f"--rows takes dataset:profile (mnist|cifar10 : {'|'.join(PROFILES)}), not {row!r}")
            rows.append((dataset, profile))
        return rows
    return [(d, p) for d in args.datasets for p in args.profiles]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DATA_MIRROR", ROOT.parent / "shared" / "data")),
                        help="mirror folder (default: DATA_MIRROR, else ../shared/data)")
    parser.add_argument("--datasets", nargs="+", default=["mnist"], choices=["mnist", "cifar10"])
    parser.add_argument("--frameworks", nargs="+", default=None,
                        help="default: pytorch, and tensorflow where it is installed")
    parser.add_argument("--profiles", nargs="+", default=["fast"], choices=PROFILES)
    parser.add_argument("--rows", nargs="+", metavar="DATASET:PROFILE",
                        help="instead of --datasets x --profiles, e.g. cifar10:fast mnist:fast")
    parser.add_argument("--devices", nargs="+", default=None, help="default: cpu, and cuda if present")
    parser.add_argument("--seed", type=int, default=0, help="first seed")
    parser.add_argument("--seeds", type=int, default=1, help="runs per row, seeds seed..seed+N-1")
    parser.add_argument("--epochs", type=int, help="override the profile's (quick checks, tuning)")
    parser.add_argument("--batch-size", type=int, help="override the profile's (tuning)")
    parser.add_argument("--learning-rate", type=float, help="override the recipe's peak (tuning)")
    parser.add_argument("--task-wall", action="store_true",
                        help="also time one fresh process doing a DAG train task's work per row")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--task-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--snapshot", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ["DATA_MIRROR"] = str(args.data)
    os.environ.setdefault("VTM_HOME", str(ROOT / ".local"))
    frameworks = args.frameworks or ["pytorch"] + (
        ["tensorflow"] if importlib.util.find_spec("tensorflow") else [])
    if args.task_child:
        args.dataset, args.framework, args.profile, args.device = (
            args.datasets[0], frameworks[0], args.profiles[0], args.devices[0])
        return task_child(args)

    devices = args.devices or available_devices()
    load = os.getloadavg() if hasattr(os, "getloadavg") else ()
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load {' '.join(f'{x:.1f}' for x in load)}, "
          f"python {platform.python_version()}, devices {devices}", flush=True)
    try:
        import torch

        print(f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}" if torch.version.cuda else ""), flush=True)
    except ImportError:
        pass
    names = {device: device_name(device) for device in devices}
    snapshots: dict[str, str] = {}
    table = []
    for dataset, profile in parse_rows(args):
        if dataset not in snapshots:
            started = time.perf_counter()
            snapshots[dataset] = image_data.prepare(dataset).uri
            print(f"{dataset}: prepared in {time.perf_counter() - started:.1f} s", flush=True)
        arrays = image_data.load_snapshot(snapshots[dataset])
        for framework in frameworks:
            for device in devices:
                runs = []
                for seed in range(args.seed, args.seed + args.seeds):
                    cfg, result = train_once(arrays, dataset, framework, profile, device, seed, overrides(args))
                    run = {"dataset": dataset, "framework": framework, "profile": profile,
                           "device": result.device, "seed": seed, "epochs": cfg.recipe_on(result.device).epochs,
                           "test_accuracy": round(result.test_accuracy, 4),
                           "train_seconds": round(result.train_seconds, 3),
                           "images_per_second": round(result.images_per_second)}
                    runs.append(run)
                    print(json.dumps(run), flush=True)
                accuracies = [r["test_accuracy"] for r in runs]
                warm = [r["train_seconds"] for r in runs[1:]]
                row = {"dataset": dataset, "framework": framework, "profile": profile, "device": device,
                       "card": names[device], "epochs": runs[0]["epochs"], "seeds": len(runs),
                       "batch_size": cfg.recipe_on(runs[0]["device"]).batch_size,
                       "acc_mean": statistics.fmean(accuracies),
                       "acc_std": statistics.stdev(accuracies) if len(runs) > 1 else 0.0,
                       "acc_min": min(accuracies), "acc_max": max(accuracies),
                       "first_s": runs[0]["train_seconds"],
                       "warm_s": statistics.fmean(warm) if warm else None,
                       "images_per_second": round(statistics.fmean(r["images_per_second"] for r in (runs[1:] or runs))),
                       "task_wall_s": None, "task_acc": None, "runs": runs}
                if args.task_wall:
                    wall, child = task_wall(snapshots[dataset], dataset, framework, profile, device,
                                            args.seed, overrides(args))
                    row["task_wall_s"], row["task_acc"] = round(wall, 2), round(child["test_accuracy"], 4)
                    print(json.dumps({"task_wall_s": row["task_wall_s"], **child}), flush=True)
                table.append(row)
    if args.json:
        args.json.write_text(json.dumps(table, indent=1))
    print_table(table)
    return 0


def print_table(table: list[dict]) -> None:
    def seconds(value: float | None) -> str:
        return "-" if value is None else f"{value:.2f}"

    print("\n| data set | framework | profile | device | card | epochs | batch | seeds "
          "| test accuracy (mean +- sd, min-max) | train s, first | train s, warm | images/s | task wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        accuracy = f"{100 * r['acc_mean']:.2f} % +- {100 * r['acc_std']:.2f} ({100 * r['acc_min']:.2f}-{100 * r['acc_max']:.2f})"
        print(f"| {r['dataset']} | {r['framework']} | {r['profile']} | {r['device']} | {r['card']} | {r['epochs']} "
              f"| {r['batch_size']} | {r['seeds']} | {accuracy} | {seconds(r['first_s'])} | {seconds(r['warm_s'])} "
              f"| {r['images_per_second']:,} | {seconds(r['task_wall_s'])} |", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
