"""power_lgbm_training end to end: ``dag.test()`` against a real MLflow server."""

from __future__ import annotations

import shutil
from pathlib import Path

import mlflow
import pytest

from common import config, mlflow_utils, registry
from tests.helpers import SHARED_DATA, dags_for_dag_test

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
CFG = config.get("power_lgbm_training")
SMALL = {"eval_weeks": 2, "validation_weeks": 2, "num_boost_round": 300,
         "auto_promote": True}  # promoted unattended: dag.test() has nobody to approve


# Per test: Airflow 3.3 writes a run's conf into the DAG's own Param objects (ParamsDict.update ->
# Param.resolve stores the value), so a second dag.test() of the same DAG object would inherit
# the first run's conf as its defaults.
@pytest.fixture
def dag(airflow_db):
    dag = dags_for_dag_test().dags[CFG.dag_id]
    return dag


@pytest.fixture
def synthetic_mirror(tmp_path, synthetic_uci, monkeypatch) -> Path:
    target = tmp_path / "mirror" / "household_power" / "household_power_consumption.zip"
    target.parent.mkdir(parents=True)
    shutil.copy(synthetic_uci, target)
    monkeypatch.setenv("DATA_MIRROR", str(tmp_path / "mirror"))
    return target


def mlflow_run_of(dag_run):
    client = mlflow_utils.configure()
    experiment = client.get_experiment_by_name(CFG.experiment)
    runs = mlflow.search_runs(experiment_ids=[experiment.experiment_id], output_format="list",
                              filter_string=f"tags.`airflow.run_id` = '{dag_run.run_id}'")
    assert len(runs) == 1, "one MLflow run per DAG run"
    return runs[0]


def version_of(run_id: str):
    client = mlflow_utils.configure()
    (version,) = client.search_model_versions(f"name = '{CFG.model_name}' AND run_id = '{run_id}'")
    return client.get_model_version(CFG.model_name, version.version)


def test_run_registers_champion_then_worse_run_leaves_it(dag, mlflow_server, synthetic_mirror):
    first = dag.test(run_conf=SMALL)
    assert first.state == "success"
    run = mlflow_run_of(first)
    metrics = run.data.metrics
    for name in ("mae", "rmse", "baseline_mae", "skill_mae", "train_seconds"):
        assert name in metrics, name
    assert metrics["skill_mae"] == pytest.approx(1 - metrics["mae"] / metrics["baseline_mae"])
    tags = run.data.tags
    assert tags["airflow.dag_id"] == CFG.dag_id and tags["data_version"].startswith("power-")
    assert tags["git_commit"] and tags["airflow.url"].endswith(first.run_id)
    assert run.data.params["num_boost_round"] == "300"
    artifacts = {a.path for a in mlflow_utils.configure().list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/forecast_vs_actual.png", "evaluation/feature_importance.png"} <= artifacts

    v1 = version_of(run.info.run_id)
    assert v1.aliases == ["champion"]  # decided: no longer the challenger
    assert v1.tags["decision"] == "promoted" and v1.tags["data_version"] == tags["data_version"]
    model = mlflow.models.get_model_info(f"models:/{CFG.model_name}/{v1.version}")
    assert model.signature is not None and model.saved_input_example_info is not None
    # Evaluation metrics are the logged model's, linked to the window as a dataset (digest = data version).
    client = mlflow_utils.configure()
    on_model = {m.key: m for m in client.get_logged_model(model.model_id).metrics}
    assert on_model["mae"].value == pytest.approx(metrics["mae"])
    assert on_model["mae"].dataset_digest == tags["data_version"]
    assert on_model["mae"].dataset_name.startswith("household_power-eval-")
    (window,) = run.inputs.dataset_inputs
    assert window.dataset.digest == tags["data_version"] and window.dataset.name == on_model["mae"].dataset_name
    assert not [k for k in v1.tags if k.startswith("metric.")]

    # Same data, a far weaker model: registered as challenger, champion stays.
    second = dag.test(run_conf={**SMALL, "num_boost_round": 2, "learning_rate": 0.01})
    assert second.state == "success"
    run2 = mlflow_run_of(second)
    assert run2.data.metrics["mae"] > metrics["mae"]
    assert run2.data.metrics["champion_mae"] == pytest.approx(metrics["mae"], rel=1e-6)
    v2 = version_of(run2.info.run_id)
    assert v2.tags["decision"] == "rejected"
    # Champion health: the second run's score of v1 is a point of v1's series, in v1's own run.
    (point,) = client.get_metric_history(run.info.run_id, "champion_health_mae")
    assert point.value == pytest.approx(run2.data.metrics["champion_mae"])
    assert client.get_model_version(CFG.model_name, v1.version).tags["champion_health"] == "ok"
    assert client.get_model_version_by_alias(CFG.model_name, registry.CHAMPION).version == v1.version
    assert registry.alias_version(client, CFG.model_name, registry.CHALLENGER) is None  # v2 decided


def test_bad_data_fails_the_run_and_registers_nothing(dag, mlflow_server, tmp_path, monkeypatch):
    from tests.uci_synth import uci_lines, write_uci_file

    lines = uci_lines(days=120, seed=4)
    lines[5000] = lines[5000].replace(";", ",", 2)
    mirror = tmp_path / "mirror"
    write_uci_file(mirror / "household_power" / "household_power_consumption.zip", lines=lines)
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    client = mlflow_utils.configure()
    before = len(client.search_model_versions(f"name = '{CFG.model_name}'"))
    dag_run = dag.test(run_conf=SMALL)
    assert dag_run.state == "failed"
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["prepare"].state == "failed" and tis["register"].state != "success"
    assert tis["prepare"].try_number == 1, "bad data is not retried"
    assert len(client.search_model_versions(f"name = '{CFG.model_name}'")) == before


def test_real_uci_data(dag, mlflow_server, monkeypatch):
    if not (SHARED_DATA / "household_power" / "household_power_consumption.zip").is_file():
        pytest.skip(f"real data not present under {SHARED_DATA}")
    monkeypatch.setenv("DATA_MIRROR", str(SHARED_DATA))
    dag_run = dag.test(run_conf={"auto_promote": True})
    assert dag_run.state == "success"
    run = mlflow_run_of(dag_run)
    assert run.data.metrics["skill_mae"] > 0.2  # LightGBM clearly beats seasonal-naive on real data
    assert run.data.params["eval_weeks"] == "8"
    assert version_of(run.info.run_id).tags["decision"] in {"promoted", "rejected"}
