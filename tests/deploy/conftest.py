"""Fixtures of the deployment checks: the compose model with a generated .env, and the DAGs' tasks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from common import config
from tests.deploy.compose import COMPOSE_FILE, ENV_EXAMPLE, ROOT, Task, resolve
from tools import deploy_env


@pytest.fixture(scope="session")
def env_file(tmp_path_factory) -> Path:
    """A complete .env: .env.example with every secret generated, as tools/deploy_env.py writes it."""
    path = tmp_path_factory.mktemp("deploy") / "complete.env"
    path.write_text(deploy_env.render(ENV_EXAMPLE.read_text()))
    return path


@pytest.fixture(scope="session")
def model(env_file) -> dict[str, Any]:
    return resolve(COMPOSE_FILE, env_file)


@pytest.fixture(scope="session")
def raw() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE_FILE.read_text())


@pytest.fixture(scope="session")
def dag_tasks() -> list[Task]:
    """Every task of every DAG file, as Airflow parses it (the tick DAG too, once it exists)."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))
    assert not bag.import_errors, bag.import_errors
    return [Task(dag.dag_id, t.task_id, t.queue, t.pool, t.pool_slots)
            for dag in bag.dags.values() for t in dag.tasks]


@pytest.fixture(scope="session")
def expected_pools() -> dict[str, Any]:
    return config.pools_file_content()
