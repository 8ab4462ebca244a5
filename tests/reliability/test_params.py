"""Reliability 3.1: a bad run parameter never becomes work, a retry, or a RUNNING MLflow run.

(a) Airflow itself refuses a value outside a parameter's schema when the run is triggered: a real
    API server answers 400 naming the field, ``airflow dags trigger -c`` exits non-zero with it.
(b) What only the parser can reject (an unknown key: Airflow passes it through) fails the first
    task once, before it writes anything, and opens no MLflow run.
(c) A task that fails for good (killed, timed out, or raising) leaves its MLflow run FAILED with
    the reason as a tag, never RUNNING.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest

from common import alerts, config, mlflow_utils
from tests.helpers import dags_for_dag_test, free_port, stop_group, wait_http
from tests.image_synth import write_mnist_mirror

ROOT = Path(__file__).resolve().parents[2]
AIRFLOW = str(Path(os.sys.executable).parent / "airflow")


def _post(url: str, body: dict, token: str | None = None) -> tuple[int, str]:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def api_server(airflow_db, tmp_path_factory):
    """A real Airflow API server (simple auth manager, generated password) on the session's DB,
    with the project's DAGs serialized into it; yields (base URL, bearer token)."""
    env = {**os.environ, "AIRFLOW__API__WORKERS": "1",
           "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(16)}
    subprocess.run([AIRFLOW, "dags", "reserialize"], check=True, capture_output=True, env=env, timeout=180)
    port = free_port()
    log = tmp_path_factory.mktemp("api-server") / "api-server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{base}/api/v2/monitor/health", 120, proc, log)
        passwords = airflow_db / "simple_auth_manager_passwords.json.generated"
        password = json.loads(passwords.read_text())["admin"]
        status, body = _post(f"{base}/auth/token", {"username": "admin", "password": password})
        assert status in (200, 201), body
        yield base, json.loads(body)["access_token"]
    finally:
        stop_group(proc)


@pytest.mark.e2e
@pytest.mark.reliability(case="3.1a trigger validation (REST API)",
                         fault="POST dagRuns with epochs -5, profile 'huge', num_boost_round -5",
                         survives="400 naming the field; no run is created")
@pytest.mark.parametrize(("dag_id", "conf", "field"), [
    ("mnist_cnn_training", {"epochs": -5}, "epochs"),
    ("mnist_cnn_training", {"profile": "huge"}, "profile"),
    ("power_lgbm_training", {"num_boost_round": -5}, "num_boost_round"),
    ("tick_model_training", {"trade_date": "2013-13-45"}, "trade_date"),
])
def test_api_rejects_a_bad_param_at_trigger(api_server, dag_id, conf, field):
    base, token = api_server
    url = f"{base}/api/v2/dags/{dag_id}/dagRuns"

    def run_count() -> int:  # the session's DB also holds runs that other tests' dag.test() made
        runs = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
        with urllib.request.urlopen(runs, timeout=60) as response:
            return json.load(response)["total_entries"]

    before = run_count()
    status, body = _post(url, {"logical_date": None, "conf": conf}, token)
    assert status == 400, body
    assert f"param {field}" in json.loads(body)["detail"], body
    assert run_count() == before, "a rejected trigger created no run"


@pytest.mark.e2e
@pytest.mark.reliability(case="3.1a trigger validation (CLI)",
                         fault="airflow dags trigger mnist_cnn_training -c '{\"epochs\": 0}'",
                         survives="exit code non-zero, message names epochs; no run")
def test_cli_trigger_rejects_a_bad_param(api_server):
    # api_server: the DAGs are serialized into the session's DB (the CLI reads them from there).
    result = subprocess.run([AIRFLOW, "dags", "trigger", "mnist_cnn_training", "-c", '{"epochs": 0}'],
                            capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    output = result.stdout + result.stderr
    assert "Invalid input for param epochs" in output and "minimum" in output, output[-2000:]


def _no_mlflow_run(experiment: str, airflow_run_id: str) -> bool:
    client = mlflow_utils.configure()
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return True
    return not mlflow.search_runs(experiment_ids=[exp.experiment_id], output_format="list",
                                  filter_string=f"tags.`airflow.run_id` = '{airflow_run_id}'")


@pytest.fixture(scope="module")
def dagbag(airflow_db):
    return dags_for_dag_test()


@pytest.mark.e2e
@pytest.mark.reliability(case="3.1b unknown key fails before prepare",
                         fault="run conf with a key no parameter has (Airflow passes it through)",
                         survives="first task fails on try 1 (no retry), no snapshot, no MLflow run")
@pytest.mark.parametrize("dag_id", ["mnist_cnn_training", "power_lgbm_training"])
def test_unknown_key_fails_the_first_task_once(dagbag, mlflow_server, synthetic_uci, tmp_path,
                                               monkeypatch, caplog, dag_id):
    mirror = tmp_path / "mirror"
    write_mnist_mirror(mirror)
    (mirror / "household_power").mkdir()
    shutil.copy(synthetic_uci, mirror / "household_power" / synthetic_uci.name)
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    data = tmp_path / "data"
    monkeypatch.setenv("VTM_DATA_DIR", str(data))  # whatever prepare writes would land here

    conf = {"epochz": 3} if dag_id == "mnist_cnn_training" else {"num_boost_rounds": 50}
    with caplog.at_level("WARNING", logger="common.alerts"):
        dag_run = dagbag.dags[dag_id].test(run_conf=conf)
    (key,) = conf
    # The failure alert (no channel configured here: one log line) says why, naming the key.
    assert any(f"[FAILED] {dag_id}.prepare" in r.getMessage() and "ParameterError" in r.getMessage()
               and repr(key) in r.getMessage() for r in caplog.records), caplog.text[-3000:]

    assert dag_run.state == "failed"
    tis = {ti.task_id: ti for ti in dag_run.get_task_instances()}
    assert tis["prepare"].state == "failed"
    assert tis["prepare"].try_number == 1, "a parameter error is never retried"
    assert tis["train"].state != "success" and tis["register"].state != "success"
    written = [p for p in data.rglob("*") if p.is_file()] if data.exists() else []
    assert written == [], f"prepare did work before rejecting the params: {written}"
    assert _no_mlflow_run(config.get(dag_id).experiment, dag_run.run_id)


def _task_run(dag_id: str, run_id: str, task_id: str = "train") -> str:
    """An MLflow run tagged as the train task of ``run_id`` opens it, left RUNNING (its process
    was killed before it could end it)."""
    client = mlflow_utils.configure()
    experiment_id = mlflow_utils.ensure_experiment(config.get(dag_id).experiment)
    who = mlflow_utils.AirflowIdentity(dag_id, run_id, task_id)
    run = client.create_run(experiment_id, tags=who.tags())
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    return run.info.run_id


def _context(dag_id: str, run_id: str, state: str, exception: BaseException | None) -> dict:
    ti = SimpleNamespace(dag_id=dag_id, task_id="train", run_id=run_id, try_number=3, state=state,
                         log_url="")
    return {"ti": ti, "exception": exception} if exception else {"ti": ti}


@pytest.mark.reliability(case="3.1c failed task's MLflow run ends FAILED",
                         fault="train task killed / timed out; its MLflow run left RUNNING",
                         survives="failure callback ends it FAILED with failure_reason")
def test_failure_callback_marks_the_running_mlflow_run_failed(mlflow_server):
    dag_id = "mnist_cnn_training"
    client = mlflow_utils.configure()

    # While retries remain the run stays open: the next try resumes it.
    retried = _task_run(dag_id, "manual__rel_3_1c_retry")
    assert alerts.mark_mlflow_run_failed(_context(dag_id, "manual__rel_3_1c_retry", "up_for_retry",
                                                  TimeoutError("try 1 timed out"))) is None
    assert client.get_run(retried).info.status == "RUNNING"

    # Final failure with an exception: FAILED, and why.
    killed = _task_run(dag_id, "manual__rel_3_1c_final")
    reason = "AirflowTaskTimeout: Timeout, PID: 4242 " + "x" * 9000
    alerts.on_failure(_context(dag_id, "manual__rel_3_1c_final", "failed", TimeoutError(reason)))
    run = client.get_run(killed)
    assert run.info.status == "FAILED" and run.info.end_time
    tag = run.data.tags[alerts.FAILURE_REASON_TAG]
    assert tag.startswith("TimeoutError: AirflowTaskTimeout: Timeout, PID: 4242")
    assert len(tag) == alerts.MAX_TAG_VALUE  # truncated to MLflow's limit, not rejected

    # Killed (the DAG processor runs the callback; no exception in the context): still FAILED.
    zombie = _task_run(dag_id, "manual__rel_3_1c_zombie")
    assert alerts.mark_mlflow_run_failed(_context(dag_id, "manual__rel_3_1c_zombie", "failed", None)) == zombie
    run = client.get_run(zombie)
    assert run.info.status == "FAILED" and "killed" in run.data.tags[alerts.FAILURE_REASON_TAG]

    # A failed task that opened no run, and an unreachable server: nothing to do, never raises.
    assert alerts.mark_mlflow_run_failed(_context(dag_id, "manual__rel_3_1c_none", "failed", None)) is None
    os.environ["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"
    try:
        assert alerts.mark_mlflow_run_failed(_context(dag_id, "manual__rel_3_1c_final", "failed",
                                                      RuntimeError("x"))) is None
    finally:
        os.environ["MLFLOW_TRACKING_URI"] = mlflow_server
