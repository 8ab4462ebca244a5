"""MLflow plumbing shared by every workflow: where the server is, which experiment, which run.

``task_run`` is the one way a task opens an MLflow run. It tags the run with the Airflow identity
(dag_id, run_id, task_id, try_number, logical date), the git commit and the data version, and it is
*resumable*: a retried task (worker killed, timeout) finds the run its earlier try opened, by those
tags, and continues it instead of leaving a second, half-finished run behind.

Imported only inside tasks (it imports mlflow), never at DAG parse time.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from common.config import REPO_ROOT

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
MLFLOW_CONN_ID = "mlflow_default"
TAG_DAG_ID, TAG_RUN_ID, TAG_TASK_ID = "airflow.dag_id", "airflow.run_id", "airflow.task_id"
TAG_TRY, TAG_LOGICAL_DATE, TAG_URL = "airflow.try_number", "airflow.logical_date", "airflow.url"
TAG_GIT_COMMIT, TAG_DATA_VERSION = "git_commit", "data_version"


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI``, else the Airflow connection ``mlflow_default``, else localhost."""
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return uri
    with contextlib.suppress(Exception):  # not inside Airflow, or no such connection
        from airflow.sdk import BaseHook

        conn = BaseHook.get_connection(MLFLOW_CONN_ID)
        extra = conn.extra_dejson or {}
        uri = extra.get("tracking_uri")
        if not uri and conn.host:
            uri = f"{extra.get('scheme', 'http')}://{conn.host}" + (f":{conn.port}" if conn.port else "")
        if uri:
            # Credentials for basic auth travel in the environment MLflow's client reads.
            if conn.login:
                os.environ.setdefault("MLFLOW_TRACKING_USERNAME", conn.login)
                os.environ.setdefault("MLFLOW_TRACKING_PASSWORD", conn.password or "")
            return uri
    return DEFAULT_TRACKING_URI


def configure() -> MlflowClient:
    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def ensure_experiment(name: str) -> str:
    """Get or create the experiment; returns its id (safe when two tasks race to create it)."""
    client = configure()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name)
        except mlflow.exceptions.MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id


def git_commit() -> str:
    """The code version: ``VTM_GIT_COMMIT`` (set in images), else ``git rev-parse`` (+ dirty)."""
    if commit := os.environ.get("VTM_GIT_COMMIT"):
        return commit
    try:
        sha = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], check=True,
                             capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "dags"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


@dataclass(frozen=True)
class AirflowIdentity:
    """Who is running: filled from the Airflow task context, or by hand on the command line."""

    dag_id: str
    run_id: str
    task_id: str
    try_number: int = 1
    logical_date: str = ""

    @classmethod
    def from_context(cls, context: Mapping[str, Any]) -> AirflowIdentity:
        ti = context["ti"]
        logical = context.get("logical_date")
        return cls(dag_id=ti.dag_id, run_id=ti.run_id, task_id=ti.task_id,
                   try_number=int(ti.try_number or 1),
                   logical_date=logical.isoformat() if logical is not None else "")

    @classmethod
    def from_current_context(cls) -> AirflowIdentity:
        from airflow.sdk import get_current_context

        return cls.from_context(get_current_context())

    def airflow_url(self) -> str:
        base = os.environ.get("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8080").rstrip("/")
        return f"{base}/dags/{self.dag_id}/runs/{self.run_id}"

    def tags(self) -> dict[str, str]:
        return {TAG_DAG_ID: self.dag_id, TAG_RUN_ID: self.run_id, TAG_TASK_ID: self.task_id,
                TAG_TRY: str(self.try_number), TAG_LOGICAL_DATE: self.logical_date,
                TAG_URL: self.airflow_url()}


def find_task_run(experiment_id: str, who: AirflowIdentity) -> str | None:
    """The MLflow run an earlier try of this very task opened, if any."""
    def quoted(value: str) -> str:
        return value.replace("'", "\\'")

    runs = mlflow.search_runs(
        experiment_ids=[experiment_id], output_format="list", max_results=1,
        filter_string=(f"tags.`{TAG_DAG_ID}` = '{quoted(who.dag_id)}' AND "
                       f"tags.`{TAG_RUN_ID}` = '{quoted(who.run_id)}' AND "
                       f"tags.`{TAG_TASK_ID}` = '{quoted(who.task_id)}'"),
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


@contextlib.contextmanager
def task_run(experiment: str, who: AirflowIdentity, data_version: str,
             extra_tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open (or resume, on a retry) this task's MLflow run, fully tagged.

    On an exception the run is marked FAILED and the exception propagates; a later try reopens the
    same run and, on success, it ends FINISHED.
    """
    experiment_id = ensure_experiment(experiment)
    existing = find_task_run(experiment_id, who)
    if existing:
        log.info("resuming MLflow run %s of an earlier try of %s", existing, who.task_id)
    run_name = f"{who.dag_id}.{who.run_id}"[:250]
    # The fluent API refuses to resume a run outside the active experiment: make it this one.
    mlflow.set_experiment(experiment_id=experiment_id)
    with mlflow.start_run(run_id=existing, run_name=None if existing else run_name) as run:
        mlflow.set_tags({**who.tags(), TAG_GIT_COMMIT: git_commit(),
                         TAG_DATA_VERSION: data_version, **(extra_tags or {})})
        yield run


@contextlib.contextmanager
def reopen_run(run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Continue a run a previous task created (evaluate adds to what train logged)."""
    client = configure()
    mlflow.set_experiment(experiment_id=client.get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def run_url(run_id: str) -> str:
    """Link to the run in the MLflow UI."""
    client = configure()
    run = client.get_run(run_id)
    base = tracking_uri().rstrip("/")
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
