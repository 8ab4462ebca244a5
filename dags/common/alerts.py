"""Failure, retry and success callbacks every DAG uses.

Channels are Airflow connections, so credentials live in the secrets backend, never in code:

* ``alerts_slack``   - Slack incoming webhook; URL in extra ``url`` (or the connection's host).
* ``alerts_smtp``    - SMTP e-mail; host/port/login/password, extra ``to`` (comma list), ``from``,
  ``starttls`` (default true).
* ``alerts_webhook`` - generic webhook; receives the whole alert as JSON.

With no channel configured an alert is one clear log line. A channel that fails to send logs the
error and never raises: a broken alert must not hide the task's real outcome.
Standard library only: callbacks run inside the task process and at DAG parse time nothing here
is executed.
"""

from __future__ import annotations

import json
import logging
import smtplib
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from email.message import EmailMessage
from typing import Any

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


def on_failure(context: Mapping[str, Any]) -> None:
    notify(alert_from_context("failed", context))


def on_retry(context: Mapping[str, Any]) -> None:
    notify(alert_from_context("up_for_retry", context))


def on_success(context: Mapping[str, Any]) -> None:
    notify(alert_from_context("success", context))


def task_callbacks() -> dict[str, Callable[[Mapping[str, Any]], None]]:
    """For ``default_args``: every task alerts on failure and on retry."""
    return {"on_failure_callback": on_failure, "on_retry_callback": on_retry}
