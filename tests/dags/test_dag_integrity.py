"""Every DAG file loads, carries what config.py says, and stays cheap to parse."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from common import config

ROOT = Path(__file__).resolve().parents[2]
# dags/airflow_local_settings.py is Airflow's local-settings hook (in .airflowignore), not a DAG file.
DAG_FILES = sorted(p for p in (ROOT / "dags").glob("*.py") if p.name != "airflow_local_settings.py")
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
    assert dag.schedule == cfg.timetable()  # the cron, or the cron-or-asset schedule (tick)
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
        expected_pool = (config.REGISTRY_POOL.name if task.task_id in ("register", "promote")
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


# The trainer settings each workflow's run parameters parse into (scripts.core.params.build).
TRAINER_SETTINGS = {
    "power_lgbm_training": ("scripts.power.model", "ModelParams"),
    "tick_model_training": ("scripts.tick.model", "ModelParams"),
    "mnist_cnn_training": ("scripts.image.base", "TrainConfig"),
    "cifar10_cnn_training": ("scripts.image.base", "TrainConfig"),
}
PY_TYPES = {"integer": (int,), "number": (int, float), "string": (str,), "boolean": (bool,)}


@pytest.mark.parametrize("dag_file", DAG_FILES, ids=lambda p: p.stem)
def test_every_run_param_is_a_typed_param_built_from_config(dagbag, dag_file):
    """The trigger form shows every knob with its type, default and meaning; the schema Airflow
    validates a triggered conf against is config's, verbatim."""
    from airflow.sdk import Param

    dag = dagbag.dags[dag_file.stem]
    cfg = config.get(dag.dag_id)
    assert cfg.run_params and set(dag.params) == {spec.name for spec in cfg.run_params}
    for spec in cfg.run_params:
        param = dag.params.get_param(spec.name)
        assert isinstance(param, Param), spec.name
        assert param.schema == spec.schema() and param.schema["type"], spec.name
        assert param.description == spec.description and len(spec.description) > 10, spec.name
        assert param.value == spec.default, spec.name
        assert spec.nullable == (spec.default is None)
        if spec.default is not None:
            assert isinstance(spec.default, PY_TYPES[spec.type]) and not (
                spec.type != "boolean" and isinstance(spec.default, bool)), spec.name
        if spec.type in ("integer", "number"):  # every number has at least a lower bound
            assert spec.minimum is not None or spec.exclusive_minimum is not None, spec.name


def test_bounds_and_enums_where_the_issue_asks():
    image = config.get("mnist_cnn_training")
    assert image.param_spec("profile").schema() == {"type": "string", "enum": ["smoke", "fast", "quality"]}
    assert image.param_spec("framework").enum == ("pytorch", "tensorflow")
    assert image.param_spec("device").enum == ("auto", "cpu", "cuda")
    assert image.param_spec("epochs").schema() == {"type": ["integer", "null"], "minimum": 1, "maximum": 1000}
    assert image.param_spec("batch_size").minimum == 1
    assert image.param_spec("learning_rate").schema()["exclusiveMinimum"] == 0
    assert image.param_spec("seed").schema() == {"type": "integer", "minimum": 0}
    power = config.get("power_lgbm_training")
    assert power.param_spec("num_boost_round").minimum == 1
    assert power.param_spec("learning_rate").exclusive_minimum == 0
    tick = config.get("tick_model_training")
    assert tick.param_spec("trade_date").schema() == {"type": ["string", "null"], "format": "date"}
    assert (tick.param_spec("max_bad_share").minimum, tick.param_spec("max_bad_share").maximum) == (0, 1)


@pytest.mark.parametrize("dag_id", sorted(TRAINER_SETTINGS))
def test_param_defaults_are_the_trainers_defaults(dag_id):
    """The trainer's dataclass is the truth (the CLI, benchmarks and tests build it without
    Airflow); config.py cannot import it (numpy), so this test is what keeps the two equal."""
    import dataclasses
    import importlib

    module, name = TRAINER_SETTINGS[dag_id]
    cls = getattr(importlib.import_module(module), name)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    specs = {spec.name: spec for spec in config.get(dag_id).run_params}
    # Every setting a person tunes is a parameter (the data set is the DAG's, not a knob).
    assert set(fields) - {"dataset"} <= set(specs)
    for field_name, fld in fields.items():
        if field_name in specs:
            assert specs[field_name].default == fld.default, f"{dag_id}.{field_name}"
            assert type(specs[field_name].default) is type(fld.default), f"{dag_id}.{field_name}"


def test_image_enums_are_the_trainers():
    from scripts.image import base as image_common

    assert config.IMAGE_PROFILES == image_common.PROFILES
    assert config.IMAGE_FRAMEWORKS == image_common.FRAMEWORKS
    assert config.IMAGE_DEVICES == image_common.DEVICES
    assert set(config.IMAGE_PROFILES) == set(image_common.PROFILE_TABLE["mnist"])


def test_params_table_lists_every_parameter():
    out = subprocess.run([sys.executable, str(ROOT / "dags/common/config.py"), "params-table"],
                         capture_output=True, text=True, check=True).stdout
    for cfg in config.WORKFLOWS.values():
        assert f"**`{cfg.dag_id}`**" in out
        for spec in cfg.run_params:
            assert f"| `{spec.name}` |" in out


def test_operations_doc_shows_the_params_table_config_generates():
    """docs/operations.md "What each parameter accepts" is the generated table, not a copy that drifts."""
    table = config.params_table().strip()
    assert table in (ROOT / "docs/operations.md").read_text(), \
        "regenerate with: python dags/common/config.py params-table"


def test_tick_bad_row_limit_default_is_the_lakes():
    """The importer refuses, and validate fails, at the same share unless a run says otherwise:
    the lake module holds the contract, the DAG's parameter defaults to it."""
    from scripts.tick import lake

    assert config.get("tick_model_training").params["max_bad_share"] == lake.MAX_BAD_SHARE
