"""tick_model_training end to end: ``dag.test()`` over several simulated days against a real
MLflow server, then a day whose partition breaks the bad-share limit."""

from __future__ import annotations

from datetime import UTC, date, datetime
from pathlib import Path

import mlflow
import pytest

from common import config, mlflow_utils, registry
from scripts.tick import importer as tick_import
from scripts.tick import lake as tick_lake
from tests.helpers import dags_for_dag_test
from tests.test_tick_import import GOOD, write_csv

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CFG = config.get("tick_model_training")


# Per test: a dag.test() conf sticks to the DAG object's Params in Airflow 3.3 (test_power_dag.py).
@pytest.fixture
def dag(airflow_db):
    return dags_for_dag_test().dags[CFG.dag_id]


@pytest.fixture
def lake(tmp_path, monkeypatch) -> str:
    root = str(tmp_path / "lake")
    monkeypatch.setenv("TICK_LAKE", root)
    return root


def run_for(dag, day: date, **conf):
    return dag.test(logical_date=datetime(day.year, day.month, day.day, tzinfo=UTC), run_conf=conf or None)


def states(dag_run) -> dict[str, str]:
    return {ti.task_id: ti.state for ti in dag_run.get_task_instances()}


def feature_days(lake: str) -> list[date]:
    return tick_lake.Lake.open(lake).days(tick_lake.FEATURES)


def test_days_in_order_then_a_bad_partition_changes_nothing(dag, mlflow_server, lake, tmp_path):
    days = tick_import.seed(lake, mirror=None, simulate_start=date(2026, 1, 5), simulate_days=3)

    # The first day has no history: features are built, training is skipped, the run succeeds.
    first = run_for(dag, days[0])
    assert first.state == "success"
    assert states(first)["build_features"] == "success" and states(first)["train"] == "skipped"
    assert states(first)["register"] == "skipped"
    assert feature_days(lake) == days[:1]

    # The third day trains on the two before it (building the second day's features on the way).
    third = run_for(dag, days[2])
    assert third.state == "success", states(third)
    assert feature_days(lake) == days
    client = mlflow_utils.configure()
    experiment = client.get_experiment_by_name(CFG.experiment)
    (run,) = mlflow.search_runs(experiment_ids=[experiment.experiment_id], output_format="list",
                                filter_string=f"tags.`airflow.run_id` = '{third.run_id}'")
    metrics = run.data.metrics
    for name in ("rmse_log_rv", "persistence_rmse_log_rv", "har_rmse_log_rv", "qlike",
                 "features_trades_per_second"):
        assert name in metrics, name
    assert metrics["rmse_log_rv"] < metrics["persistence_rmse_log_rv"]
    assert metrics["features_trades_per_second"] > 0
    assert run.data.tags["data.synthetic"] == "true" and run.data.tags["data_version"].startswith("synthetic-")
    assert run.data.params["train_first_day"] == str(days[0]) and run.data.params["n_train_days"] == "2"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert "evaluation/predicted_vs_realized_volatility.png" in artifacts
    (version,) = client.search_model_versions(f"name = '{CFG.model_name}' AND run_id = '{run.info.run_id}'")
    version = client.get_model_version(CFG.model_name, version.version)
    assert version.aliases == [] and version.tags["trade_date"] == str(days[2])
    assert version.tags["synthetic"] == "true"
    # Simulated trades never produce a champion, whatever the scores.
    assert version.tags["decision"] == "rejected" and "synthetic" in version.tags["decision_reason"]
    # The registered pyfunc serves the whole model (HAR core + XGBoost correction).
    info = mlflow.models.get_model_info(f"models:/{CFG.model_name}/{version.version}")
    assert info.signature is not None and info.saved_input_example_info is not None
    champion_before = registry.alias_version(client, CFG.model_name, registry.CHAMPION)
    versions_before = len(client.search_model_versions(f"name = '{CFG.model_name}'"))

    # A late, broken delivery: a quarter of the rows are bad. The run fails at validate; no
    # feature partition, no MLflow model, no new version, and the champion stays.
    bad_day = date(2026, 1, 8)
    rows = [row.replace("2013-10-08", str(bad_day)) for row in GOOD] + [
        f"IBM,{bad_day} 09:31:00.000,-1,100,N,1,0", f"IBM,{bad_day} 22:00:00.000,185,100,N,1,0"]
    tick_import.import_files(lake, [write_csv(tmp_path / "late.csv", rows)], max_bad_share=1.0)
    broken = run_for(dag, bad_day)
    assert broken.state == "failed"
    assert states(broken)["validate"] == "failed" and states(broken)["build_features"] == "upstream_failed"
    assert bad_day not in feature_days(lake)
    assert len(client.search_model_versions(f"name = '{CFG.model_name}'")) == versions_before
    champion_after = registry.alias_version(client, CFG.model_name, registry.CHAMPION)
    assert (champion_after and champion_after.version) == (champion_before and champion_before.version)
