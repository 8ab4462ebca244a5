"""The tick workflow's data-aware schedule on the real embedded stack (scheduler, dag-processor,
api-server, LocalExecutor; MLflow): a user's upstream DAG runs the importer task
(``upstream.tick_import.import_trades``) on a vendor drop of one trading day; its Asset event starts
``tick_model_training`` for exactly that day, at once, with no wait for the partition.

The upstream DAG is a real DAG file, written by the test into its own folder and served as a second
DAG bundle beside the repository's dags/ (``[dag_processor] dag_bundle_config_list``, handed to
``tools/stack.sh up``): the event goes through the same path as in a user's deployment (task
outlet -> API server -> asset event -> the scheduler's asset-triggered run). Posting an event through
the REST API (POST /api/v2/assets/events) would skip the importer task, which is the part under test.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import date, datetime
from pathlib import Path

import pytest

from common import config
from scripts.tick import importer as tick_import
from scripts.tick import lake as tick_lake
from scripts.tick import simulate
from tests.helpers import stack_env
from tests.test_tick_import import upstream_bundle
from tools.airflow_api import AirflowClient

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
CFG = config.get("tick_model_training")
DAG_ID, UPSTREAM = CFG.dag_id, "upstream_trade_drop"
TERMINAL = ("success", "failed")


def runs(client: AirflowClient, dag_id: str, run_type: str) -> list[dict]:
    return client.request("GET", f"/dags/{dag_id}/dagRuns?run_type={run_type}&limit=100")["dag_runs"]


def wait_for(what: str, probe, timeout: float):
    deadline = time.monotonic() + timeout
    while not (found := probe()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not after {timeout}s")
        time.sleep(3)
    return found


def seconds(ti: dict) -> float:
    return (datetime.fromisoformat(ti["end_date"]) - datetime.fromisoformat(ti["start_date"])).total_seconds()


@pytest.mark.timeout(1500)
def test_importer_event_runs_the_tick_dag_for_that_day(tmp_path):
    lake = tmp_path / "lake"
    # The lake already holds a later complete day (imported outside Airflow: no event); the drop
    # holds 2026-01-07 only. The run must take the event's day, not the lake's newest.
    tick_import.import_simulated(str(lake), date(2026, 1, 8), 1)
    (tmp_path / "drop").mkdir()
    drop = simulate.write_vendor_files(tmp_path / "drop", date(2026, 1, 7), 1)
    bundles = upstream_bundle(tmp_path / "upstream", UPSTREAM, drop, dags_folder=ROOT / "dags", synthetic=True)
    env = stack_env(tmp_path / "home", TICK_LAKE=str(lake), AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST=bundles)
    stack = str(ROOT / "tools/stack.sh")
    try:
        subprocess.run([stack, "up"], env=env, check=True, timeout=600, capture_output=True, text=True)
        password = json.loads((tmp_path / "home/airflow/simple_auth_manager_passwords.json.generated")
                              .read_text())["admin"]
        client = AirflowClient(f"http://127.0.0.1:{env['AIRFLOW_PORT']}", "admin", password)
        client.wait_for_dags([DAG_ID, UPSTREAM])
        dag = client.request("GET", f"/dags/{DAG_ID}/details")
        assert dag["timetable_summary"].startswith("Asset or"), dag["timetable_summary"]

        # Unpausing adds the latest weekday 17:30 run (catchup off), whose sensor would wait hours
        # for a day this lake lacks, holding the DAG's one active run: fail it, as an operator would.
        client.unpause(DAG_ID)
        for run in wait_for("the latest scheduled run", lambda: runs(client, DAG_ID, "scheduled"), 180):
            client.request("PATCH", f"/dags/{DAG_ID}/dagRuns/{run['dag_run_id']}", {"state": "failed"})

        client.unpause(UPSTREAM)
        upstream_run = client.trigger(UPSTREAM)
        done = client.wait_for_runs({UPSTREAM: upstream_run}, timeout=300)
        assert done[UPSTREAM]["state"] == "success", client.task_instances(UPSTREAM, upstream_run)
        events = client.request("GET", f"/assets/events?source_dag_id={UPSTREAM}")["asset_events"]
        assert [(e["name"], e["source_run_id"], e["extra"]["day"]) for e in events] == [
            (CFG.trigger_asset, upstream_run, "2026-01-07")]
        assert sorted(events[0]["extra"]["symbols"]) == sorted(s.symbol for s in simulate.DEFAULT_SYMBOLS)

        (run,) = wait_for("an asset-triggered run", lambda: [
            r for r in runs(client, DAG_ID, "asset_triggered") if r["state"] in TERMINAL], 600)
        tis = {t["task_id"]: t for t in client.task_instances(DAG_ID, run["dag_run_id"])}
        assert run["state"] == "success", {t: ti["state"] for t, ti in tis.items()}
        assert client.xcom(DAG_ID, run["dag_run_id"], "wait_for_trades")["day"] == "2026-01-07"
        # The partition was there: the sensor passed at its first look, no reschedule, no wait.
        sensor = tis["wait_for_trades"]
        assert sensor["state"] == "success" and sensor["try_number"] == 1
        assert seconds(sensor) < CFG.poke_interval.total_seconds(), sensor
        assert tis["build_features"]["state"] == "success"
        assert tis["train"]["state"] == "skipped"  # no trading day before it in this lake
        # Exactly that day: its features, not the lake's newer day; one run for one event.
        assert tick_lake.Lake.open(str(lake)).days(tick_lake.FEATURES) == [date(2026, 1, 7)]
        assert len(runs(client, DAG_ID, "asset_triggered")) == 1
    finally:
        subprocess.run([stack, "down"], env=env, timeout=120)
