"""MLflow plumbing shared by every workflow: where the server is, which experiment, which run.

``task_run`` is the one way a task opens an MLflow run. It tags the run with the Airflow identity
(dag_id, run_id, task_id, try_number, logical date), the git commit and the data version, and it is
*resumable*: a retried task (worker killed, timeout) finds the run its earlier try opened, by those
tags, and continues it instead of leaving a second, half-finished run behind.

A retry never shares that run (or the checkpoints beside it) with an earlier try that is still
alive: a task process dies with its Airflow supervisor (``die_with_supervisor``), and the run is
held under an exclusive per-task lock (``task_lock``) that a retry waits for.

Imported only inside tasks (it imports mlflow), never at DAG parse time.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import mlflow
from mlflow.tracking import MlflowClient

from common import mlflow_auth
from scripts.core import paths
from scripts.core.paths import REPO_ROOT

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "http://127.0.0.1:5000"
MLFLOW_CONN_ID = "mlflow_default"
TAG_DAG_ID, TAG_RUN_ID, TAG_TASK_ID = "airflow.dag_id", "airflow.run_id", "airflow.task_id"
TAG_TRY, TAG_LOGICAL_DATE, TAG_URL = "airflow.try_number", "airflow.logical_date", "airflow.url"
TAG_GIT_COMMIT, TAG_DATA_VERSION = "git_commit", "data_version"
TAG_FAILURE_REASON = "failure_reason"


def failure_reason(exc: BaseException, limit: int = 5000) -> str:
    """``Type: message`` of an exception, cut to fit an MLflow tag value."""
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


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
    """Point MLflow at the tracking server; every task's first MLflow call comes through here."""
    route_mlflow_logs()
    mlflow.set_tracking_uri(tracking_uri())
    return MlflowClient()


def route_mlflow_logs() -> None:
    """Inside an Airflow task, send MLflow's log records to the task log at their own level.

    MLflow gives its ``mlflow`` logger a handler of its own that writes to stderr and stops
    propagation; a worker's task runner logs every stderr line at ERROR, so an INFO message such as
    "Waiting up to 300 seconds for model version to finish creation" became an ERROR line in a
    successful task. Removing that handler lets the records propagate to Airflow's handler, which
    keeps their level. Outside Airflow (CLI, bench) MLflow's own handler stays.
    """
    from scripts.core import threads

    if not threads.in_airflow_task():
        return
    logger = logging.getLogger("mlflow")
    kept = [h for h in logger.handlers if type(getattr(h, "stream", None)).__name__ != "MlflowLoggingStream"]
    if len(kept) != len(logger.handlers) or not logger.propagate:
        logger.handlers = kept
        logger.propagate = True


def ensure_experiment(name: str) -> str:
    """Get or create the experiment; returns its id (safe when two tasks race to create it).

    Refuses (``mlflow_auth.OwnershipError``, permanent) an experiment that the workflows' MLflow
    user does not own: on a server with basic auth the stack creates it as that user beforehand.
    """
    client = configure()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            experiment_id = client.create_experiment(name)
        except mlflow.exceptions.MlflowException:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
        else:
            mlflow_auth.require_owned(mlflow_auth.EXPERIMENT, experiment_id, name)
            return experiment_id
    mlflow_auth.require_owned(mlflow_auth.EXPERIMENT, experiment.experiment_id, name)
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

    def airflow_url(self) -> str:
        base = os.environ.get("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8080").rstrip("/")
        return f"{base}/dags/{self.dag_id}/runs/{self.run_id}"

    def tags(self) -> dict[str, str]:
        return {TAG_DAG_ID: self.dag_id, TAG_RUN_ID: self.run_id, TAG_TASK_ID: self.task_id,
                TAG_TRY: str(self.try_number), TAG_LOGICAL_DATE: self.logical_date,
                TAG_URL: self.airflow_url()}


def tags_filter(tags: Mapping[str, str]) -> str:
    """An MLflow search filter matching every tag of ``tags`` (runs and model versions alike)."""
    return " AND ".join(f"tags.`{key}` = '{str(value).replace(chr(39), chr(92) + chr(39))}'"
                        for key, value in tags.items())


def find_task_run(experiment_ids: str | list[str], who: AirflowIdentity) -> str | None:
    """The MLflow run an earlier try of this very task opened, if any (in one experiment, or in
    any of several)."""
    runs = mlflow.search_runs(
        experiment_ids=[experiment_ids] if isinstance(experiment_ids, str) else experiment_ids,
        output_format="list", max_results=1,
        filter_string=tags_filter({TAG_DAG_ID: who.dag_id, TAG_RUN_ID: who.run_id, TAG_TASK_ID: who.task_id}),
        order_by=["attributes.start_time DESC"],
    )
    return runs[0].info.run_id if runs else None


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _under_airflow_supervisor() -> bool:
    """True in a task process that an Airflow supervisor forked (LocalExecutor, Celery), not in
    ``dag.test()``/``airflow dags test`` (in-process) nor on the command line."""
    runner = sys.modules.get("airflow.sdk.execution_time.task_runner")
    comms = getattr(runner, "SUPERVISOR_COMMS", None)
    return comms is not None and type(comms).__name__ != "InProcessSupervisorComms"


def die_with_supervisor() -> bool:
    """Ask the kernel to SIGKILL this task process when its supervisor dies (Linux).

    A supervisor killed with SIGKILL cannot stop its task, and the orphan would go on training
    and logging while the retry starts. Only under a supervisor: a trainer started from a shell
    (nohup, the CLI) must outlive it. Returns whether the death signal is set.
    """
    if not sys.platform.startswith("linux") or not _under_airflow_supervisor():
        return False
    supervisor = os.getppid()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, 9, 0, 0, 0) != 0:  # 9 = SIGKILL
        log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %s", ctypes.get_errno())
        return False
    if os.getppid() != supervisor:  # it died before the signal was armed
        os._exit(1)
    return True


@contextlib.contextmanager
def task_lock(who: AirflowIdentity, poll_seconds: float = 5.0) -> Iterator[None]:
    """Exclusive lock of one task of one Airflow run, across its tries, held while it works.

    A retry whose earlier try still runs (an orphan that outlived its supervisor) waits here until
    that process has exited; the kernel releases a flock when its holder dies, however it dies.
    The task's execution_timeout bounds the wait.
    """
    key = hashlib.sha256(f"{who.dag_id}\0{who.run_id}\0{who.task_id}".encode()).hexdigest()[:32]
    path = paths.locks_dir() / "tasks" / f"{key}.lock"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        waited_since = None
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if waited_since is None:
                    waited_since = time.monotonic()
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
                    log.warning("an earlier try of %s.%s (pid %s) is still running; waiting for it to end",
                                who.dag_id, who.task_id, holder)
                time.sleep(poll_seconds)
        if waited_since is not None:
            log.info("earlier try ended after %.0f s; continuing", time.monotonic() - waited_since)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def task_run(experiment: str, who: AirflowIdentity, data_version: str,
             extra_tags: Mapping[str, str] | None = None) -> Iterator[mlflow.ActiveRun]:
    """Open (or resume, on a retry) this task's MLflow run, fully tagged.

    On an exception the run is marked FAILED and the exception propagates; a later try reopens the
    same run and, on success, it ends FINISHED. The run is this try's alone while it is open
    (``task_lock``), and this task process dies with its supervisor (``die_with_supervisor``).
    """
    die_with_supervisor()
    with task_lock(who):
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
            try:
                yield run
            except BaseException as exc:
                # The run ends FAILED (start_run's context); say why where people look.
                with contextlib.suppress(Exception):
                    mlflow.set_tag(TAG_FAILURE_REASON, failure_reason(exc))
                raise


@contextlib.contextmanager
def reopen_run(run_id: str) -> Iterator[mlflow.ActiveRun]:
    """Continue a run a previous task created (evaluate adds to what train logged)."""
    client = configure()
    experiment_id = client.get_run(run_id).info.experiment_id
    mlflow_auth.require_owned(mlflow_auth.EXPERIMENT, experiment_id, client.get_experiment(experiment_id).name)
    mlflow.set_experiment(experiment_id=experiment_id)
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def run_url(run_id: str) -> str:
    """Link to the run in the MLflow UI."""
    client = configure()
    run = client.get_run(run_id)
    base = tracking_uri().rstrip("/")
    return f"{base}/#/experiments/{run.info.experiment_id}/runs/{run_id}"
