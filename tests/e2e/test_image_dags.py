"""mnist_cnn_training and cifar10_cnn_training end to end (smoke profile, CPU) against a real
MLflow server, in both frameworks; and the resume-after-kill path with a real killed process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from common import config, mlflow_utils, registry
from tests.helpers import dags_for_dag_test
from tests.image_synth import write_cifar_mirror, write_mnist_mirror

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def mirror(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("image-mirror")
    write_mnist_mirror(root)
    write_cifar_mirror(root)
    return root


# Per test: a dag.test() conf sticks to the DAG object's Params in Airflow 3.3 (test_power_dag.py).
@pytest.fixture
def dagbag(airflow_db):
    return dags_for_dag_test()


def runs_of(experiment: str, airflow_run_id: str):
    client = mlflow_utils.configure()
    exp = client.get_experiment_by_name(experiment)
    return mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list",
                              filter_string=f"tags.`airflow.run_id` = '{airflow_run_id}'")


@pytest.mark.parametrize("framework", ["pytorch", "tensorflow"])
@pytest.mark.parametrize("dag_id", ["mnist_cnn_training", "cifar10_cnn_training"])
def test_smoke_run_logs_everything_and_never_promotes(dagbag, mlflow_server, mirror, monkeypatch,
                                                      dag_id, framework):
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    cfg = config.get(dag_id)
    dag_run = dagbag.dags[dag_id].test(run_conf={"profile": "smoke", "framework": framework})
    assert dag_run.state == "success"
    (run,) = runs_of(cfg.experiment, dag_run.run_id)
    client = mlflow_utils.configure()
    metrics = run.data.metrics
    for name in ("test_accuracy", "train_seconds", "images_per_second", "baseline_accuracy"):
        assert name in metrics, name
    # Chance is 0.1. Two smoke epochs at the smoke learning rate land anywhere from about 0.45
    # to 1.0 on these classes, depending on the reduction order of the thread count the task gets
    # (Keras, 1 thread: 0.475; 2 threads: 0.885): the bar proves learning, not a quality.
    assert metrics["test_accuracy"] > 0.3, "the synthetic classes are easy to learn"
    history = client.get_metric_history(run.info.run_id, "val_accuracy")
    assert sorted(m.step for m in history) == [1, 2]
    assert run.data.tags["framework"] == framework and run.data.tags["profile"] == "smoke"
    assert run.data.tags["data_version"].startswith(dag_id.split("_")[0])
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert {"evaluation/learning_curves.png", "evaluation/confusion_matrix.png",
            "evaluation/misclassified.png"} <= artifacts
    (version,) = client.search_model_versions(f"name = '{cfg.model_name}' AND run_id = '{run.info.run_id}'")
    version = client.get_model_version(cfg.model_name, version.version)
    assert version.tags["decision"] == "rejected" and "smoke" in version.tags["decision_reason"]
    assert "challenger" not in version.aliases  # decided (rejected): challenges nobody
    assert registry.alias_version(client, cfg.model_name, registry.CHAMPION) is None
    info = mlflow.models.get_model_info(f"models:/{cfg.model_name}/{version.version}")
    assert info.signature is not None and info.saved_input_example_info is not None


def test_killed_training_resumes_in_the_same_mlflow_run(mlflow_server, mirror, tmp_path):
    """SIGKILL the trainer after its second epoch; the rerun with the same run id continues."""
    env = {**os.environ, "DATA_MIRROR": str(mirror), "MLFLOW_TRACKING_URI": mlflow_server,
           "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "scripts.image.cli", "--dataset", "mnist", "--profile", "smoke",
           "--epochs", "6", "--run-id", "manual__resume_test", "--steps", "train"]
    proc = subprocess.Popen(cmd, cwd=ROOT / "dags", env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    first_meta, epochs_seen = None, []
    for line in proc.stdout:
        if line.startswith("VTM_RUN_META::"):
            first_meta = json.loads(line.split("::", 1)[1])
        if line.startswith("VTM_PROGRESS::"):
            epochs_seen.append(json.loads(line.split("::", 1)[1])["epoch"])
            if epochs_seen[-1] == 2:
                os.killpg(proc.pid, signal.SIGKILL)  # the worker dies mid-training
                break
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL and epochs_seen == [1, 2]

    done = subprocess.run(cmd, cwd=ROOT / "dags", env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    metas = [json.loads(line.split("::", 1)[1]) for line in done.stdout.splitlines()
             if line.startswith("VTM_RUN_META::")]
    progress = [json.loads(line.split("::", 1)[1]) for line in done.stdout.splitlines()
                if line.startswith("VTM_PROGRESS::")]
    assert metas == [first_meta]
    assert [p["epoch"] for p in progress] == [3, 4, 5, 6]
    assert {"epoch", "total_epochs", "val_accuracy", "device"} <= set(progress[0])
    client = mlflow_utils.configure()
    run = client.get_run(first_meta["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["resumed_from_epoch"] == 2
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val_accuracy")]
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]


def test_full_profile_promotes_then_other_framework_is_compared_with_the_champion(
        dagbag, mlflow_server, mirror, monkeypatch):
    """Not smoke: the gate applies (unattended: dag.test() has nobody to approve). A PyTorch
    champion is scored beside a Keras challenger."""
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    cfg = config.get("mnist_cnn_training")
    client = mlflow_utils.configure()
    dag = dagbag.dags[cfg.dag_id]
    first = dag.test(run_conf={"profile": "fast", "framework": "pytorch", "epochs": 8, "auto_promote": True})
    assert first.state == "success"
    (run1,) = runs_of(cfg.experiment, first.run_id)
    assert run1.data.metrics["test_accuracy"] >= cfg.gate.threshold  # synthetic classes are easy
    champion = registry.alias_version(client, cfg.model_name, registry.CHAMPION)
    assert champion is not None and champion.run_id == run1.info.run_id

    second = dag.test(run_conf={"profile": "fast", "framework": "tensorflow", "epochs": 8,
                                 "auto_promote": True})
    assert second.state == "success"
    (run2,) = runs_of(cfg.experiment, second.run_id)
    # The PyTorch champion was loaded through pyfunc and scored on the same test images.
    assert run2.data.metrics["champion_test_accuracy"] == pytest.approx(run1.data.metrics["test_accuracy"])
    version2 = client.get_model_version(cfg.model_name, client.search_model_versions(
        f"name = '{cfg.model_name}' AND run_id = '{run2.info.run_id}'")[0].version)
    now = registry.alias_version(client, cfg.model_name, registry.CHAMPION)
    if run2.data.metrics["test_accuracy"] > run1.data.metrics["test_accuracy"]:
        assert version2.tags["decision"] == "promoted" and now.version == version2.version
    else:
        assert version2.tags["decision"] == "rejected" and now.version == champion.version
