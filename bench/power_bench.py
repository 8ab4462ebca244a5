"""Benchmark of the power workflow: forecast skill on the real UCI file, training and evaluation
time, and each DAG file's parse time. Prints figures; asserts nothing (targets live in the docs).

    .venv/bin/python bench/power_bench.py [--data ../shared/data] [--repeats 3]

No MLflow or Airflow needed: it runs the trainer's pure core (scripts/power/model.py).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "dags"))

from scripts.power import data as power_data  # noqa: E402
from scripts.power import model as power_model  # noqa: E402


def dag_parse_seconds(repeats: int) -> dict[str, tuple[float, float]]:
    """Median seconds to import each DAG file in a fresh interpreter: (cold, with airflow.sdk
    already imported). The second is what the dag-processor pays per file; the first includes
    importing Airflow itself."""
    probe = ("import runpy, sys, time; sys.path.insert(0, sys.argv[2]); t0 = time.perf_counter();"
             "import airflow.sdk; t1 = time.perf_counter(); runpy.run_path(sys.argv[1]);"
             "t2 = time.perf_counter(); print(t2 - t0, t2 - t1)")
    out = {}
    # airflow_local_settings.py is Airflow's local-settings hook, not a DAG file.
    for dag_file in sorted(f for f in (ROOT / "dags").glob("*.py") if f.name != "airflow_local_settings.py"):
        runs = [tuple(map(float, subprocess.run(
            [sys.executable, "-c", probe, str(dag_file), str(ROOT / "dags")],
            capture_output=True, text=True, check=True).stdout.split()[-2:])) for _ in range(repeats)]
        out[dag_file.stem] = (statistics.median(r[0] for r in runs), statistics.median(r[1] for r in runs))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--data", type=Path, default=Path(os.environ.get("DATA_MIRROR") or ROOT.parent / "shared" / "data"),
                        help="mirror folder holding household_power/household_power_consumption.zip")
    parser.add_argument("--repeats", type=int, default=int(os.environ.get("VTM_BENCH_REPEATS", "3")),
                        help="parse-time runs per DAG file (env VTM_BENCH_REPEATS)")
    args = parser.parse_args()
    source = args.data / power_data.MIRROR_PATH
    print(f"machine: {platform.processor() or platform.machine()}, python {platform.python_version()}")

    started = time.perf_counter()
    raw, name = power_data.read_source_bytes(source)
    hourly = power_data.to_hourly(power_data.parse_minutes(raw, name))
    prepare_s = time.perf_counter() - started
    print(f"data: {name}: {hourly.index[0]} .. {hourly.index[-1]}, {len(hourly)} hours, "
          f"{int(hourly[power_data.TARGET].isna().sum())} missing; validate+aggregate {prepare_s:.1f} s")

    params = power_model.ModelParams()
    started = time.perf_counter()
    table = power_model.build_features(hourly)
    features_s = time.perf_counter() - started
    result = power_model.fit(table, params)
    started = time.perf_counter()
    evaluation = power_model.score(result.booster.predict, table, result.window_start)
    score_s = time.perf_counter() - started
    m = evaluation.metrics
    total = features_s * 2 + result.train_seconds + score_s  # the DAG builds features in train and evaluate
    figures = {
        "eval_window": f"{result.window_start.date()} .. {table.day.iloc[-1].date()} ({params.eval_weeks} weeks)",
        "mae_kw": round(m["mae"], 4), "rmse_kw": round(m["rmse"], 4),
        "baseline_mae_same_hour_yesterday": round(m["baseline_mae_same_hour_yesterday"], 4),
        "baseline_mae_same_hour_last_week": round(m["baseline_mae_same_hour_last_week"], 4),
        "skill_mae_vs_best_baseline": f"{m['skill_mae']:.2%}",
        "features_seconds": round(features_s, 1), "train_seconds": round(result.train_seconds, 1),
        "boosting_rounds": result.best_iteration, "score_seconds": round(score_s, 2),
        "train_plus_evaluation_seconds": round(total, 1),
    }
    print(json.dumps(figures, indent=2))
    print("DAG parse time (fresh interpreter, median of", args.repeats, "runs):")
    for dag_id, (cold, own) in dag_parse_seconds(args.repeats).items():
        print(f"  {dag_id:28s} {own * 1000:7.1f} ms  (cold, importing Airflow too: {cold * 1000:.0f} ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
