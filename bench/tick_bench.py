"""Tick workflow figures on real trades: feature-build throughput and walk-forward accuracy.

    .venv/bin/python bench/tick_bench.py [--data ../shared/data] [--repeats 5]

Imports every trade file of ``<data>/ticks`` into a temporary lake (the importer the DAG's
upstream runs), builds each day's features (after one warm-up build, the median of ``--repeats``
timed builds, reading the Parquet partitions included), then for every day after the first
trains on the days before it and scores model, persistence and HAR-RV on that day - what the DAG
does, day by day. Prints a table and whether the model beats persistence and is no worse than
HAR on every day.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "dags"), str(ROOT)]

from scripts.tick import features as tick_features  # noqa: E402
from scripts.tick import importer as tick_import  # noqa: E402
from scripts.tick import lake as tick_lake  # noqa: E402
from scripts.tick import model as tick_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    default = os.environ.get("DATA_MIRROR") or str(ROOT.parent / "shared" / "data")
    parser.add_argument("--data", type=Path, default=Path(default), help="mirror folder holding ticks/")
    parser.add_argument("--repeats", type=int, default=int(os.environ.get("VTM_BENCH_REPEATS", "5")),
                        help="timed feature builds per day (env VTM_BENCH_REPEATS)")
    args = parser.parse_args(argv)
    files = sorted((args.data / "ticks").glob("*.csv*"))
    if not files:
        print(f"no trade files in {args.data / 'ticks'}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="tick-bench-") as tmp:
        lake_uri = f"{tmp}/lake"
        started = time.perf_counter()
        reports = tick_import.import_files(lake_uri, files)
        import_seconds = time.perf_counter() - started
        rows = sum(r.rows_in for r in reports)
        print(f"import: {len(files)} file(s), {rows:,} trades, {sum(r.bad_rows for r in reports):,} "
              f"quarantined, {import_seconds:.1f} s ({rows / import_seconds / 1e6:.2f} M trades/s)")
        lake = tick_lake.Lake.open(lake_uri)
        days = lake.days(tick_lake.TRADES)
        tick_features.build_day(lake_uri, days[0])  # warm-up: engine start, file cache
        print(f"\n{'day':<12}{'trades':>11}{'build s':>10}{'M trades/s':>12}")
        total_trades = total_seconds = 0.0
        for day in days:
            timings = [tick_features.build_day(lake_uri, day) for _ in range(args.repeats)]
            seconds = statistics.median(t.seconds for t in timings)
            assert len({t.sha256 for t in timings}) == 1, f"{day}: rebuilds differ"
            total_trades += timings[0].trades
            total_seconds += seconds
            print(f"{day!s:<12}{timings[0].trades:>11,}{seconds:>10.3f}{timings[0].trades / seconds / 1e6:>12.2f}")
        print(f"{'all':<12}{int(total_trades):>11,}{total_seconds:>10.3f}{total_trades / total_seconds / 1e6:>12.2f}"
              "   (target >= 5 M trades/s; byte-identical rebuilds)")

        print(f"\n{'eval day':<12}{'train days':>11}{'model':>9}{'persist.':>10}{'HAR':>9}{'qlike':>8}"
              f"{'vs pers.':>10}{'vs HAR':>9}")
        ok = True
        params = tick_model.ModelParams()
        for i, day in enumerate(days[1:], start=1):
            history = days[max(0, i - params.train_days):i]
            fit = tick_model.fit(tick_features.load_features(lake, history), params)
            m = tick_model.evaluate(fit.model, tick_features.load_features(lake, [day])).metrics
            ok &= m["rmse_log_rv"] < m["persistence_rmse_log_rv"] and m["rmse_log_rv"] <= m["har_rmse_log_rv"]
            print(f"{day!s:<12}{len(history):>11}{m['rmse_log_rv']:>9.4f}{m['persistence_rmse_log_rv']:>10.4f}"
                  f"{m['har_rmse_log_rv']:>9.4f}{m['qlike']:>8.4f}{m['skill_vs_persistence']:>10.2%}"
                  f"{m['skill_vs_har']:>9.2%}")
        print(f"\nRMSE of log RV below persistence and no worse than HAR on every day: {'yes' if ok else 'NO'}")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
