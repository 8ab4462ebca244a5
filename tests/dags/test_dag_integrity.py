"""Every DAG file loads, carries what config.py says, and stays cheap to parse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common import config

ROOT = Path(__file__).resolve().parents[2]
DAG_FILES = sorted((ROOT / "dags").glob("*.py"))
HEAVY = ("torch", "tensorflow", "pandas", "mlflow", "lightgbm", "xgboost", "numpy", "sklearn", "polars")


@pytest.fixture(scope="module")
def dagbag():
    from airflow.dag_processing.dagbag import DagBag

    return DagBag(dag_folder=str(ROOT / "dags"))


def test_no_import_errors(dagbag):
    assert dagbag.import_errors == {}


def test_one_file_one_dag_id(dagbag):
    assert {Path(d.fileloc).stem for d in dagbag.dags.values()} == set(dagbag.dag_ids)
    assert {p.stem for p in DAG_FILES} == set(dagbag.dag_ids)
    assert set(dagbag.dag_ids) <= set(config.WORKFLOWS)


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.stem)
def test_dag_matches_its_config(dagbag, dag_file):
    dag = dagbag.dags[dag_file.stem]
    cfg = config.get(dag.dag_id)
    assert dag.tags and set(cfg.tags) <= set(dag.tags)
    assert dag.max_active_runs == cfg.max_active_runs
    assert dag.catchup is False
    assert dag.doc_md and dag.doc_md.strip().startswith(f"### {dag.dag_id}")
    assert dag.schedule == cfg.schedule
    assert str(dag.timezone) == cfg.timezone
    assert dag.on_success_callback
    for task in dag.tasks:
        assert task.owner == cfg.owner
        assert task.retries >= 1 and task.retries == cfg.retries
        assert task.execution_timeout == cfg.execution_timeout
        assert task.on_failure_callback and task.on_retry_callback
        # Training goes where config says (the GPU for the CNNs); the rest to the support queue.
        training = task.task_id == "train"
        assert task.queue == (cfg.queue if training else cfg.support_queue or cfg.queue), task.task_id
        expected_pool = (config.REGISTRY_POOL.name if task.task_id == "register"
                         else cfg.pool if training else cfg.support_pool or cfg.pool)
        assert task.pool == expected_pool, task.task_id


def test_pools_file_covers_every_pool_a_task_uses(dagbag):
    pools = config.pools_file_content()
    used = {t.pool for d in dagbag.dags.values() for t in d.tasks}
    assert used <= set(pools)
    out = subprocess.run([sys.executable, str(ROOT / "dags/common/config.py"), "pools"],
                         capture_output=True, text=True, check=True).stdout
    assert json.loads(out) == pools


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.stem)
def test_parsing_imports_no_heavy_library(dag_file):
    """A fresh interpreter parses the file; none of the ML stack may be imported for that."""
    probe = (
        "import runpy, sys, time, json; sys.path.insert(0, sys.argv[2]); t = time.perf_counter();"
        "runpy.run_path(sys.argv[1]); heavy = [m for m in sys.argv[3].split(',') if m in sys.modules];"
        "print(json.dumps({'heavy': heavy, 'seconds': time.perf_counter() - t}))"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(dag_file), str(ROOT / "dags"), ",".join(HEAVY)],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out.strip().splitlines()[-1])
    assert result["heavy"] == []


def test_tick_workflow_waits_for_data_and_outranks_the_others(dagbag):
    dag = dagbag.dags["tick_model_training"]
    cfg = config.get(dag.dag_id)
    assert cfg.priority_weight > max(c.priority_weight for c in config.WORKFLOWS.values() if c is not cfg)
    assert all(task.priority_weight == cfg.priority_weight for task in dag.tasks)
    sensor = dag.get_task("wait_for_trades")
    # Reschedule mode: a late delivery holds no worker slot while the run waits for it.
    assert sensor.mode == "reschedule" and sensor.timeout == cfg.data_wait.total_seconds()
    assert sensor.poke_interval == cfg.poke_interval.total_seconds()
    assert [t.task_id for t in dag.topological_sort()][:3] == ["wait_for_trades", "validate", "build_features"]
