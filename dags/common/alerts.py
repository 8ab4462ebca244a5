"""Failure, retry and success callbacks every DAG uses, and which failures are worth a retry.

Channels are Airflow connections, so credentials live in the secrets backend, never in code:

* ``alerts_slack``   - Slack incoming webhook; URL in extra ``url`` (or the connection's host).
* ``alerts_smtp``    - SMTP e-mail; host/port/login/password, extra ``to`` (comma list), ``from``,
  ``starttls`` (default true).
* ``alerts_webhook`` - generic webhook; receives the whole alert as JSON.

With no channel configured an alert is one clear log line. A channel that fails to send logs the
error and never raises: a broken alert must not hide the task's real outcome.

A task that fails for good also closes its MLflow run: ``mark_mlflow_run_failed`` finds the run by
its Airflow tags and ends it FAILED with a ``failure_reason`` tag. ``mlflow_utils.task_run`` already
ends a run FAILED when the task raises, but a task killed (SIGKILL, OOM, lost heartbeat: Airflow
then runs this callback in the DAG processor) or timed out mid-request leaves it RUNNING forever,
and neither path said why the run failed.

Standard library only at import: callbacks run inside the task process (or the DAG processor),
MLflow is imported inside the callback, and at DAG parse time nothing here is executed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import smtplib
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from typing import Any

from scripts.core.errors import DataValidationError, ParameterError, TrainingError

log = logging.getLogger(__name__)

SLACK_CONN_ID, SMTP_CONN_ID, WEBHOOK_CONN_ID = "alerts_slack", "alerts_smtp", "alerts_webhook"
CHANNELS = (SLACK_CONN_ID, SMTP_CONN_ID, WEBHOOK_CONN_ID)


@dataclass(frozen=True)
class Alert:
    state: str  # failed | up_for_retry | success
    dag_id: str
    task_id: str
    run_id: str
    try_number: int
    message: str
    log_url: str = ""

    def text(self) -> str:
        what = f"{self.dag_id}.{self.task_id}" if self.task_id else self.dag_id
        line = f"[{self.state.upper()}] {what} (run {self.run_id}, try {self.try_number})"
        if self.message:
            line += f": {self.message}"
        if self.log_url:
            line += f"\n{self.log_url}"
        return line


def alert_from_context(state: str, context: Mapping[str, Any]) -> Alert:
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    exception = context.get("exception")
    return Alert(
        state=state,
        dag_id=getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", ""),
        task_id=getattr(ti, "task_id", "") or "",
        run_id=getattr(ti, "run_id", None) or getattr(dag_run, "run_id", ""),
        try_number=int(getattr(ti, "try_number", 0) or 0),
        message=f"{type(exception).__name__}: {exception}" if exception else str(context.get("reason", "")),
        log_url=str(getattr(ti, "log_url", "") or ""),
    )


def _airflow_connection(conn_id: str) -> Any | None:
    try:
        from airflow.sdk import BaseHook

        return BaseHook.get_connection(conn_id)
    except Exception:  # not defined (AirflowNotFoundException), or not inside Airflow
        return None


def _url(conn: Any) -> str:
    extra = conn.extra_dejson or {}
    if extra.get("url"):
        return str(extra["url"])
    scheme = conn.schema or "https"
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{conn.host}{port}{extra.get('path', '')}"


def _post_json(url: str, payload: Mapping[str, Any]) -> None:
    request = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def send_slack(conn: Any, alert: Alert) -> None:
    _post_json(_url(conn), {"text": alert.text()})


def send_webhook(conn: Any, alert: Alert) -> None:
    _post_json(_url(conn), {**asdict(alert), "text": alert.text()})


def send_email(conn: Any, alert: Alert) -> None:
    extra = conn.extra_dejson or {}
    recipients = [r.strip() for r in str(extra.get("to", "")).split(",") if r.strip()]
    if not recipients:
        raise ValueError(f"connection {SMTP_CONN_ID} has no extra 'to'")
    msg = EmailMessage()
    msg["Subject"] = alert.text().splitlines()[0][:200]
    msg["From"] = extra.get("from", conn.login or "airflow@localhost")
    msg["To"] = ", ".join(recipients)
    msg.set_content(alert.text())
    with smtplib.SMTP(conn.host, conn.port or 25, timeout=10) as smtp:
        if str(extra.get("starttls", "true")).lower() == "true" and smtp.has_extn("starttls"):
            smtp.starttls()
        if conn.login:
            smtp.login(conn.login, conn.password or "")
        smtp.send_message(msg)


SENDERS: dict[str, Callable[[Any, Alert], None]] = {
    SLACK_CONN_ID: send_slack, SMTP_CONN_ID: send_email, WEBHOOK_CONN_ID: send_webhook,
}


def notify(alert: Alert, get_connection: Callable[[str], Any | None] = _airflow_connection) -> list[str]:
    """Send ``alert`` to every configured channel; returns the channels that accepted it."""
    sent = []
    for conn_id, sender in SENDERS.items():
        conn = get_connection(conn_id)
        if conn is None:
            continue
        try:
            sender(conn, alert)
            sent.append(conn_id)
        except Exception as exc:  # noqa: BLE001 - an alert must never raise
            log.error("alert via %s failed: %s", conn_id, exc)
    if not sent:
        log.warning("ALERT (no channel configured among %s): %s", ", ".join(CHANNELS), alert.text())
    return sent


# MLflow's own limit on a tag value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH, 8000 in 3.17).
MAX_TAG_VALUE = 8000
FAILURE_REASON_TAG = "failure_reason"


@contextlib.contextmanager
def _bounded_mlflow_requests() -> Any:
    """A dead tracking server must not hold a failure callback for minutes (MLflow's default is 7
    retries with backoff): one retry, 15 s, unless the environment says otherwise."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                                     "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def mark_mlflow_run_failed(context: Mapping[str, Any]) -> str | None:
    """End this task's MLflow run FAILED, tagged ``failure_reason``; returns its id, or None when
    the task opened no run (or MLflow cannot be reached). Never raises: it runs in a callback."""
    try:
        alert = alert_from_context("failed", context)
        ti = context.get("ti") or context.get("task_instance")
        if str(getattr(ti, "state", "") or "").endswith("up_for_retry"):
            return None  # a retry continues the same run (mlflow_utils.task_run resumes it)
        if not alert.task_id:
            return None
        with _bounded_mlflow_requests():
            from common import mlflow_utils

            client = mlflow_utils.configure()
            # Every experiment is searched (there is one per workflow): the run's Airflow tags
            # identify it, and this module stays below common.config, which wires its callbacks.
            experiments = [e.experiment_id for e in client.search_experiments()]
            who = mlflow_utils.AirflowIdentity(alert.dag_id, alert.run_id, alert.task_id)
            run_id = mlflow_utils.find_task_run(experiments, who) if experiments else None
            if run_id is None:
                return None
            reason = alert.message or "task failed (killed, timed out or lost; see the task log)"
            client.set_tag(run_id, FAILURE_REASON_TAG, reason[:MAX_TAG_VALUE])
            # FAILED even when the run itself had ended FINISHED: its task, which the run
            # stands for, did not succeed (e.g. the model logged, then the task was killed).
            # A run task_run already ended FAILED keeps its end time.
            if client.get_run(run_id).info.status != "FAILED":
                client.set_terminated(run_id, status="FAILED")
            log.info("MLflow run %s of %s.%s marked FAILED: %s", run_id, alert.dag_id, alert.task_id,
                     reason[:200])
            return run_id
    except Exception as exc:  # noqa: BLE001 - a callback must never raise
        log.error("could not mark the MLflow run of the failed task FAILED: %s", exc)
        return None


def on_failure(context: Mapping[str, Any]) -> None:
    """The task failed for good (Airflow calls ``on_retry`` instead while retries remain)."""
    notify(alert_from_context("failed", context))
    mark_mlflow_run_failed(context)


def on_retry(context: Mapping[str, Any]) -> None:
    notify(alert_from_context("up_for_retry", context))


def on_success(context: Mapping[str, Any]) -> None:
    notify(alert_from_context("success", context))


def task_callbacks() -> dict[str, Callable[[Mapping[str, Any]], None]]:
    """For ``default_args``: every task alerts on failure and on retry."""
    return {"on_failure_callback": on_failure, "on_retry_callback": on_retry}


# Which failures are worth a retry: bad input data, a bad parameter or an untrainable data set
# fail the same way on every try, so retrying only delays the alert.
PERMANENT = (DataValidationError, ParameterError, TrainingError)


@contextlib.contextmanager
def permanent_errors_fail_fast() -> Iterator[None]:
    """Inside a task: turn a permanent error into Airflow's ``AirflowFailException`` (fail now, no
    retries, callbacks still fire); everything else (network, a killed worker, a busy server) is
    left to the task's retries."""
    try:
        yield
    except PERMANENT as exc:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
