"""Logs a person reads (issue 9, point 7): what the Airflow task log of each step says.

``dag.test()`` runs tasks inside the test process, where nothing is captured the way a worker
captures it. So these tests run the tasks of a DAG run the way the LocalExecutor does: each in a
forked process under Airflow's own task supervisor (``supervise_task``), which writes the task
log file and logs the child's stdout at INFO and its stderr at ERROR. Only the Execution API is
served in-process instead of over HTTP.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from common import config
from tests.helpers import dags_for_dag_test

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
POWER = config.get("power_lgbm_training")
SMALL = {"eval_weeks": 2, "validation_weeks": 2, "num_boost_round": 300}
ROUND_LINE = re.compile(r"round (\d+)/(\d+) \(\d+%\).*\| elapsed .*, remaining")
EPOCH_LINE = re.compile(r"epoch (\d+)/(\d+) \(\d+%\).*train_loss .*val_accuracy .*\| elapsed .*, remaining")


def run_supervised(dag, dag_run, task_id: str, folder: Path) -> list[dict]:
    """Run ``task_id`` of ``dag_run`` again, as a worker runs it: a forked task process under the
    real supervisor; returns the task log's records (JSON lines)."""
    from airflow.executors import workloads
    from airflow.executors.workloads import BundleInfo
    from airflow.models.taskinstance import TaskInstance
    from airflow.sdk.execution_time.supervisor import InProcessTestSupervisor, supervise_task
    from airflow.utils.session import create_session
    from airflow.utils.state import TaskInstanceState

    with create_session() as session:
        ti = session.query(TaskInstance).filter_by(dag_id=dag.dag_id, run_id=dag_run.run_id,
                                                   task_id=task_id).one()
        ti.try_number += 1
        ti.state = TaskInstanceState.QUEUED
        session.commit()
        session.refresh(ti)
        workload = workloads.ExecuteTask.make(ti, dag_rel_path=Path(dag.fileloc).relative_to(ROOT / "dags"),
                                              bundle_info=BundleInfo(name="dags-folder"))
    log_path = folder / f"{dag.dag_id}.{task_id}.log"
    exit_code = supervise_task(ti=workload.ti, bundle_info=workload.bundle_info,
                               dag_rel_path=workload.dag_rel_path, token="",
                               client=InProcessTestSupervisor._api_client(dag), log_path=str(log_path))
    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    assert exit_code == 0, "\n".join(f"{r.get('level')} {r.get('event')}" for r in records[-40:])
    return records


def lines(records: list[dict], logger: str | None = None) -> list[str]:
    return [str(r.get("event")) for r in records if logger is None or r.get("logger") == logger]


def errors(records: list[dict]) -> list[str]:
    return [f"{r.get('logger')}: {r.get('event')}" for r in records
            if str(r.get("level")).lower() in ("error", "critical", "fatal")]


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    return dags_for_dag_test()


@pytest.fixture
def power_mirror(tmp_path, synthetic_uci, monkeypatch) -> Path:
    target = tmp_path / "mirror" / "household_power" / "household_power_consumption.zip"
    target.parent.mkdir(parents=True)
    shutil.copy(synthetic_uci, target)
    monkeypatch.setenv("DATA_MIRROR", str(tmp_path / "mirror"))
    return target


@pytest.mark.reliability(
    case="7.1 power task logs",
    fault="32 s of training showed as three log lines; a successful register task logged three "
          "ERROR lines (MLflow's 'already exists, creating a new version' on stderr)",
    survives="train log: a line every ~5 % of boosting rounds with n/N, loss, metric, elapsed and "
             "remaining, VTM_PROGRESS/VTM_RUN_META; no ERROR line in any task of a successful run")
def test_power_task_logs_show_progress_and_no_error(dagbag, mlflow_server, power_mirror, tmp_path):
    dag = dagbag.dags[POWER.dag_id]
    assert dag.test(run_conf=SMALL).state == "success"  # the registered model exists from now on
    # A second run whose tasks the supervisor runs, one forked process each, in order.
    dag_run = dag.test(run_conf=SMALL, mark_success_pattern=".*")
    logs = {task: run_supervised(dag, dag_run, task, tmp_path)
            for task in ("prepare", "train", "evaluate", "register")}

    progress = lines(logs["train"], "vtm.progress")
    rounds = [ROUND_LINE.search(line) for line in progress]
    assert sum(1 for m in rounds if m) >= 5, progress
    assert any("loss " in line and "valid l1 " in line for line in progress), progress
    assert any("refit" in line for line in progress), "the ensemble refit reports too"
    stdout = lines(logs["train"], "task.stdout")
    assert sum(1 for line in stdout if line.startswith("VTM_RUN_META::")) == 1, stdout
    assert any(line.startswith("VTM_PROGRESS::") and '"round"' in line for line in stdout), stdout

    for task, records in logs.items():
        assert errors(records) == [], f"{task}: {errors(records)}"
    assert any("registered" in line for line in lines(logs["register"])), "register created a version"


@pytest.mark.reliability(
    case="7.2 image train task log",
    fault="an image training task's log said nothing between start and end",
    survives="one line per epoch with n/N, train loss, validation accuracy, elapsed and remaining")
def test_image_train_log_has_a_line_per_epoch(dagbag, mlflow_server, tmp_path, monkeypatch):
    from tests.image_synth import write_mnist_mirror

    mirror = tmp_path / "mirror"
    write_mnist_mirror(mirror)
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    dag = dagbag.dags["mnist_cnn_training"]
    dag_run = dag.test(run_conf={"profile": "smoke", "framework": "pytorch"}, mark_success_pattern=".*")
    run_supervised(dag, dag_run, "prepare", tmp_path)
    records = run_supervised(dag, dag_run, "train", tmp_path)
    epochs = [m for m in (EPOCH_LINE.search(line) for line in lines(records, "vtm.progress")) if m]
    assert [(int(m[1]), int(m[2])) for m in epochs] == [(1, 2), (2, 2)], lines(records, "vtm.progress")
    assert sum(1 for line in lines(records, "task.stdout") if line.startswith("VTM_RUN_META::")) == 1
    assert errors(records) == []
