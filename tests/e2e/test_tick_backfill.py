"""``airflow backfill create`` over a date range on the real embedded stack (scheduler,
dag-processor, api-server, LocalExecutor; MLflow): every day's run succeeds and leaves exactly
one feature partition per day; a second, reprocessing backfill rebuilds them byte-identically."""

from __future__ import annotations

import json
import os
import subprocess
import time
from datetime import date
from pathlib import Path

import pytest

from scripts.tick import importer as tick_import
from scripts.tick import lake as tick_lake
from tests.helpers import free_port
from tools.airflow_api import AirflowClient
from tools.backfill import create_backfill

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "tick_model_training"


def feature_files(lake: Path) -> dict[str, bytes]:
    """Every file under features/, relative path -> bytes (manifests excluded: they are small JSON)."""
    return {str(p.relative_to(lake)): p.read_bytes() for p in sorted((lake / "features").rglob("*"))
            if p.is_file() and p.name != tick_lake.MANIFEST_FILE}


def backfill_runs(client: AirflowClient) -> list[dict]:
    return client.request("GET", f"/dags/{DAG_ID}/dagRuns?run_type=backfill&limit=100")["dag_runs"]


def wait_backfills_completed(client: AirflowClient, timeout: float = 300) -> None:
    """The scheduler marks a backfill completed a little after its last run; only one may run."""
    deadline = time.monotonic() + timeout
    while True:
        backfills = client.request("GET", f"/backfills?dag_id={DAG_ID}")["backfills"]
        if all(b["completed_at"] for b in backfills):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"backfill not marked completed after {timeout}s: {backfills}")
        time.sleep(3)


# Longer than the suite's 900 s: two backfills of two days each, each run a full tick workflow,
# on a busy 2-core machine beside the other worker's tests.
@pytest.mark.timeout(2100)
def test_backfill_rebuilds_each_day_once(tmp_path):
    lake = tmp_path / "lake"
    days = tick_import.seed(str(lake), mirror=None, simulate_start=date(2026, 1, 5), simulate_days=2)
    assert days == [date(2026, 1, 5), date(2026, 1, 6)]  # the fewest that train: the second on the first
    env = {**os.environ, "VTM_HOME": str(tmp_path / "home"), "TICK_LAKE": str(lake),
           "MLFLOW_PORT": str(free_port()), "AIRFLOW_PORT": str(free_port()),
           "VENV": str(ROOT / ".venv"), "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5"}
    env.pop("MLFLOW_TRACKING_URI", None)
    stack = str(ROOT / "tools/stack.sh")

    def backfill(*extra: str) -> None:
        # As documented in docs/tick_model_training.md; --to-date is exclusive of the 17:30 run of
        # that day, so the range 01-05 .. 01-07 holds the two closes of 01-05 and 01-06.
        create_backfill(DAG_ID, "2026-01-05", "2026-01-07", extra, env=env,
                        runner=["bash", "-c", f'eval "$({stack} env)" && exec "$@"', "backfill"])

    try:
        subprocess.run([stack, "up"], env=env, check=True, timeout=600, capture_output=True, text=True)
        password = json.loads((tmp_path / "home/airflow/simple_auth_manager_passwords.json.generated")
                              .read_text())["admin"]
        client = AirflowClient(f"http://127.0.0.1:{env['AIRFLOW_PORT']}", "admin", password)
        client.wait_for_dags([DAG_ID])
        # The scheduler runs a backfill's runs only while the DAG is unpaused (they stay queued
        # otherwise). Unpausing also adds the latest scheduled run, whose sensor waits (in
        # reschedule mode, holding no slot) for a trade day this lake does not have.
        client.unpause(DAG_ID)
        backfill()
        wait_backfills_completed(client, timeout=900)
        runs = backfill_runs(client)
        assert sorted(r["logical_date"][:10] for r in runs) == [str(d) for d in days]
        assert all(r["state"] == "success" for r in runs), runs
        lk = tick_lake.Lake.open(str(lake))
        assert lk.days(tick_lake.FEATURES) == days
        first = feature_files(lake)
        assert sorted(first) == [f"features/date={d}/{tick_lake.PART_FILE}" for d in days]
        by_day = {r["logical_date"][:10]: r["dag_run_id"] for r in runs}
        trained = client.xcom(DAG_ID, by_day["2026-01-06"], "train")
        assert trained["train_days"] == ["2026-01-05"]

        # Reprocessing re-runs the same two runs (cleared: a later try of every task).
        backfill("--reprocess-behavior", "completed")
        wait_backfills_completed(client, timeout=900)
        rerun = backfill_runs(client)
        assert len(rerun) == 2 and all(r["state"] == "success" for r in rerun), rerun
        for run_id in by_day.values():
            tries = {t["task_id"]: t["try_number"] for t in client.task_instances(DAG_ID, run_id)}
            assert tries["build_features"] >= 2, tries
        assert feature_files(lake) == first  # same files, same bytes: one partition per day
    finally:
        subprocess.run([stack, "down"], env=env, timeout=120)
