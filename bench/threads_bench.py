"""Two tasks side by side on shared cores: an MNIST epoch alone and beside a power training run,
with every library at its default thread count and with the task thread budget
(``VTM_TASK_THREADS``, scripts/core/threads.py). Prints figures; asserts nothing.

    .venv/bin/python bench/threads_bench.py [--data ../shared/data] [--profile smoke] [--repeats 3]

The power run is a separate process (as a second Airflow task would be) that fits the power
model on the mirror's UCI file in a loop; the epochs are timed only while it is fitting.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dags"))

from scripts.core import threads  # noqa: E402
from scripts.image import data as image_data  # noqa: E402
from scripts.image.base import TrainConfig, draw_subset  # noqa: E402

POWER_LOOP = r"""
import sys, time
sys.path.insert(0, sys.argv[1])
from scripts.power import data as power_data
from scripts.power import model as power_model
from scripts.core import threads
threads.apply()
raw, name = power_data.read_source_bytes(__import__("pathlib").Path(sys.argv[2]))
table = power_model.build_features(power_data.to_hourly(power_data.parse_minutes(raw, name)))
print("FITTING", threads.budget(), flush=True)
while True:
    power_model.fit(table, power_model.ModelParams(num_threads=0))
"""


def epochs(arrays, profile: str, repeats: int) -> list[float]:
    from scripts.image.torch_trainer import train_torch

    seconds: list[float] = []
    for seed in range(repeats):
        cfg = TrainConfig(dataset="mnist", profile=profile, device="cpu", seed=seed)
        result = train_torch(draw_subset(arrays, cfg.recipe, seed).apply(arrays), cfg)
        seconds += [e.seconds for e in result.history]
    return seconds


def beside_power(arrays, profile: str, repeats: int, data: Path, env: dict[str, str]) -> list[float]:
    proc = subprocess.Popen([sys.executable, "-c", POWER_LOOP, str(ROOT / "dags"),
                             str(data / "household_power" / "household_power_consumption.zip")],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        if not line.startswith("FITTING"):
            raise RuntimeError(f"power run did not start: {line!r}")
        time.sleep(2)  # well into the fit
        return epochs(arrays, profile, repeats)
    finally:
        proc.kill()
        proc.wait()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DATA_MIRROR") or ROOT.parent / "shared" / "data"))
    parser.add_argument("--profile", default="smoke", choices=["smoke", "fast"])
    parser.add_argument("--repeats", type=int, default=3, help="trainings per figure (each runs the profile's epochs)")
    args = parser.parse_args()
    os.environ["DATA_MIRROR"] = str(args.data)
    os.environ.setdefault("VTM_HOME", str(ROOT / ".local"))
    arrays = image_data.load_snapshot(image_data.prepare("mnist").uri)
    print(f"machine: {platform.machine()}, {threads.cpu_count()} cores, python {platform.python_version()}; "
          f"MNIST {args.profile} epochs (PyTorch, CPU), {args.repeats} trainings per figure", flush=True)
    base = {k: v for k, v in os.environ.items() if k not in (threads.ENV_OVERRIDE, *threads.THREAD_ENV)}
    rows = []
    for label, budget in (("library defaults (every core)", None), ("thread budget 1 per task", "1")):
        env = dict(base) if budget is None else {**base, threads.ENV_OVERRIDE: budget}
        os.environ.clear()
        os.environ.update(env)
        epochs(arrays, args.profile, 1)  # warm-up
        alone = epochs(arrays, args.profile, args.repeats)
        shared = beside_power(arrays, args.profile, args.repeats, args.data, env)
        rows.append((label, statistics.median(alone), statistics.median(shared), max(shared)))
        print(f"{label}: alone {statistics.median(alone):.2f} s, beside a power run "
              f"{statistics.median(shared):.2f} s (max {max(shared):.2f} s)", flush=True)
    print(f"\n{'threads':32s}{'epoch alone':>13s}{'beside power':>14s}{'slowdown':>10s}")
    for label, alone, shared, _ in rows:
        print(f"{label:32s}{alone:11.2f} s{shared:12.2f} s{shared / alone:9.1f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
