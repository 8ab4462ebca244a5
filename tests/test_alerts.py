"""The notifiers against real local receivers: an HTTP server (stands in for the Slack and webhook
endpoints, which cannot be reached from here) and an SMTP server (aiosmtpd), both on 127.0.0.1.
Channels are real Airflow connections (``AIRFLOW_CONN_*`` environment variables), read through
the Task SDK as in a task or the triggerer."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from datetime import timedelta
from email import policy
from email.parser import BytesParser
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from types import SimpleNamespace

import pytest

from common import alerts, config
from tests.helpers import free_port


@pytest.fixture
def http_receiver():
    received: list[tuple[str, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            body = self.rfile.read(int(self.headers["Content-Length"]))
            received.append((self.path, json.loads(body)))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}", received
    server.shutdown()


@pytest.fixture
def smtp_receiver():
    from aiosmtpd.controller import Controller

    messages = []

    class Collect:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802 - aiosmtpd API
            messages.append((envelope.rcpt_tos, BytesParser(policy=policy.default).parsebytes(envelope.content)))
            return "250 OK"

    port = free_port()
    controller = Controller(Collect(), hostname="127.0.0.1", port=port)
    controller.start()
    yield port, messages
    controller.stop()


@pytest.fixture
def no_channels(monkeypatch):
    for conn_id in alerts.CHANNELS:
        monkeypatch.delenv(f"AIRFLOW_CONN_{conn_id.upper()}", raising=False)


def use_http(monkeypatch, conn_id: str, url: str) -> None:
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", json.dumps({"conn_type": "http", "extra": {"url": url}}))


def use_smtp(monkeypatch, port: int, to: str = "ml-oncall@example.org") -> None:
    monkeypatch.setenv("AIRFLOW_CONN_ALERTS_SMTP", json.dumps({
        "conn_type": "smtp", "host": "127.0.0.1", "port": port,
        "extra": {"to": to, "from_email": "airflow@example.org", "disable_ssl": True, "disable_tls": True,
                  "retry_limit": 0, "timeout": 10}}))


FAILURE_CONTEXT = {
    "ti": SimpleNamespace(dag_id="power_lgbm_training", task_id="train", run_id="manual__1",
                          try_number=2, log_url="http://127.0.0.1:8080/log"),
    "exception": ValueError("bad row 17 {{ not a template }}"),
}

DEADLINE_CONTEXT = {  # what Deadline.handle_miss hands the callback
    "dag_run": {"dag_id": "tick_model_training", "dag_run_id": "scheduled__2026-01-05T22:30:00+00:00",
                "logical_date": "2026-01-05T22:30:00Z", "queued_at": "2026-01-05T22:30:01Z",
                "state": "running"},
    "deadline": {"id": "0199", "deadline_time": "2026-01-06T14:30:00Z"},
}


def test_one_airflow_notifier_per_channel():
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier
    from airflow.sdk import BaseNotifier

    notifiers = alerts.notifiers()
    assert [n.conn_id for n in notifiers] == list(alerts.CHANNELS)
    assert all(isinstance(n, BaseNotifier) for n in notifiers)
    assert isinstance(notifiers[1], SmtpNotifier)  # e-mail goes through the smtp provider


def test_failure_reaches_slack_and_webhook(http_receiver, monkeypatch, no_channels):
    url, received = http_receiver
    use_http(monkeypatch, alerts.SLACK_CONN_ID, f"{url}/slack")
    use_http(monkeypatch, alerts.WEBHOOK_CONN_ID, f"{url}/hook")
    assert alerts.notify(FAILURE_CONTEXT, alerts.FAILED) == [alerts.SLACK_CONN_ID, alerts.WEBHOOK_CONN_ID]
    by_path = dict(received)
    assert by_path["/slack"] == {"text": "[FAILED] power_lgbm_training.train (run manual__1, try 2): "
                                         "ValueError: bad row 17 {{ not a template }}\nhttp://127.0.0.1:8080/log"}
    hook = by_path["/hook"]
    assert hook["event"] == "failed" and hook["dag_id"] == "power_lgbm_training" and hook["try_number"] == 2
    assert hook["text"] == by_path["/slack"]["text"]


def test_retry_callback_says_retry(http_receiver, monkeypatch, no_channels):
    url, received = http_receiver
    use_http(monkeypatch, alerts.WEBHOOK_CONN_ID, url)
    alerts.on_retry(FAILURE_CONTEXT)
    assert received[0][1]["event"] == "up_for_retry"
    assert received[0][1]["text"].startswith("[UP_FOR_RETRY] power_lgbm_training.train")


def test_failure_reaches_email_through_the_smtp_provider(smtp_receiver, monkeypatch, no_channels):
    port, messages = smtp_receiver
    use_smtp(monkeypatch, port, to="ml-oncall@example.org, lead@example.org")
    assert alerts.notify(FAILURE_CONTEXT, alerts.FAILED) == [alerts.SMTP_CONN_ID]
    (rcpt, msg), = messages
    assert rcpt == ["ml-oncall@example.org", "lead@example.org"]
    assert msg["From"] == "airflow@example.org"
    assert msg["Subject"] == "[FAILED] power_lgbm_training.train (run manual__1, try 2)"
    body = msg.get_body(("html",)).get_content()
    assert "ValueError: bad row 17 {{ not a template }}" in body  # sent as written, never rendered


def test_deadline_callback_awaits_every_notifier(http_receiver, smtp_receiver, monkeypatch, no_channels):
    """The triggerer's path: the async callback, each notifier awaited (async_notify)."""
    url, received = http_receiver
    port, messages = smtp_receiver
    use_http(monkeypatch, alerts.SLACK_CONN_ID, f"{url}/slack")
    use_http(monkeypatch, alerts.WEBHOOK_CONN_ID, f"{url}/hook")
    use_smtp(monkeypatch, port)
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8080")
    sent = asyncio.run(alerts.deadline_missed(context=DEADLINE_CONTEXT, due="16 h after the run's logical date"))
    assert sent == list(alerts.CHANNELS)
    hook = dict(received)["/hook"]
    assert hook["event"] == "deadline_missed" and hook["dag_id"] == "tick_model_training"
    assert hook["run_id"] == DEADLINE_CONTEXT["dag_run"]["dag_run_id"]
    assert "not finished by 2026-01-06T14:30:00Z (due 16 h after the run's logical date)" in hook["text"]
    assert hook["extra"]["deadline_time"] == "2026-01-06T14:30:00Z"
    assert dict(received)["/slack"]["text"] == hook["text"]
    assert messages[0][1]["Subject"].startswith("[DEADLINE_MISSED] tick_model_training")


def test_approval_step_notifies_that_a_decision_waits(http_receiver, monkeypatch, no_channels):
    """Called as the human-in-the-loop operator calls its ``notifiers`` (``notifier(context)``)."""
    from airflow.providers.standard.operators.hitl import ApprovalOperator

    url, received = http_receiver
    use_http(monkeypatch, alerts.WEBHOOK_CONN_ID, url)
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8080")
    task = ApprovalOperator(task_id="approve", subject="Promote power_lgbm v7?", body="MAE 0.31 vs 0.35",
                            response_timeout=timedelta(hours=24), notifiers=alerts.notifiers())
    ti = SimpleNamespace(dag_id="power_lgbm_training", run_id="manual__7", task_id="approve", map_index=-1,
                         try_number=1, log_url="")
    for notifier in task.notifiers:
        notifier({"task": task, "ti": ti, "task_instance": ti})
    (_, hook), = received
    assert hook["event"] == "approval_needed"
    assert "A decision waits: Promote power_lgbm v7?" in hook["text"] and "MAE 0.31 vs 0.35" in hook["text"]
    assert hook["log_url"].startswith("http://127.0.0.1:8080/dags/power_lgbm_training/runs/manual__7/tasks/"
                                      "approve/required_actions")
    assert hook["extra"]["options"] == ["Approve", "Reject"]


def test_notify_message_reaches_every_configured_channel(http_receiver, monkeypatch, no_channels):
    url, received = http_receiver
    use_http(monkeypatch, alerts.WEBHOOK_CONN_ID, url)
    sent = alerts.notify_message("Champion power_lgbm v7 degraded", "MAE 0.41, promoted at 0.31",
                                 model="power_lgbm", version="7")
    assert sent == [alerts.WEBHOOK_CONN_ID]
    hook = received[0][1]
    assert hook["event"] == "message" and hook["subject"] == "Champion power_lgbm v7 degraded"
    assert hook["text"] == "Champion power_lgbm v7 degraded\nMAE 0.41, promoted at 0.31"
    assert hook["extra"] == {"model": "power_lgbm", "version": "7"}


def test_absent_connection_is_one_log_line_per_notifier(caplog, no_channels):
    with caplog.at_level(logging.INFO, logger="common.alerts"):
        for notifier in alerts.notifiers():
            notifier(FAILURE_CONTEXT)  # as a callback or the approval step calls it: never raises
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3 and all("no such Airflow connection" in line for line in lines)
    assert [line.split()[4] for line in lines] == list(alerts.CHANNELS)


def test_no_channel_is_one_clear_warning(caplog, no_channels):
    with caplog.at_level(logging.WARNING, logger="common.alerts"):
        assert alerts.notify(FAILURE_CONTEXT, alerts.UP_FOR_RETRY) == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no channel configured" in lines[0] and "UP_FOR_RETRY" in lines[0]


def test_broken_channel_logs_and_never_raises(caplog, monkeypatch, no_channels):
    use_http(monkeypatch, alerts.WEBHOOK_CONN_ID, f"http://127.0.0.1:{free_port()}/nothing")
    monkeypatch.setenv("AIRFLOW_CONN_ALERTS_SMTP", json.dumps({"conn_type": "smtp", "host": "127.0.0.1",
                                                               "port": free_port(), "extra": {}}))
    assert alerts.notify(FAILURE_CONTEXT, alerts.FAILED) == []
    assert asyncio.run(alerts.deadline_missed(context=DEADLINE_CONTEXT)) == []
    messages = [r.getMessage() for r in caplog.records]
    assert any("alert via alerts_webhook failed" in m for m in messages)
    assert any("alert via alerts_smtp failed" in m and "no extra 'to'" in m for m in messages)


@pytest.mark.parametrize("cfg", config.WORKFLOWS.values(), ids=lambda c: c.dag_id)
def test_each_workflow_gets_its_deadline(cfg, monkeypatch):
    from airflow.sdk import DeadlineAlert, DeadlineReference

    monkeypatch.delenv("VTM_DEADLINE_SECONDS", raising=False)
    alert = cfg.dag_kwargs()["deadline"]
    assert cfg.deadline is not None and isinstance(alert, DeadlineAlert)
    assert alert.interval == cfg.deadline
    expected = {"logical_date": DeadlineReference.DAGRUN_LOGICAL_DATE,
                "queued_at": DeadlineReference.DAGRUN_QUEUED_AT}[cfg.deadline_reference]
    assert alert.reference == expected
    assert alert.callback.path == "common.alerts.deadline_missed"  # awaited by the triggerer
    assert alert.callback.kwargs["due"].endswith(f"after the run's {cfg.deadline_reference.replace('_', ' ')}")
    monkeypatch.setenv("VTM_DEADLINE_SECONDS", "5")
    assert cfg.dag_kwargs()["deadline"].interval == timedelta(seconds=5)


def test_the_documented_deadlines():
    hours = {dag_id: cfg.deadline.total_seconds() / 3600 for dag_id, cfg in config.WORKFLOWS.items()}
    assert hours == {"power_lgbm_training": 2, "tick_model_training": 16, "mnist_cnn_training": 6,
                     "cifar10_cnn_training": 6}
    assert alerts.deadline_alert(None, "logical_date") is None
    with pytest.raises(ValueError, match="deadline_reference"):
        alerts.deadline_alert(timedelta(hours=1), "start_date")


def test_every_dag_file_carries_its_deadline():
    """The parsed DAGs (what the scheduler serializes), not just the config's arguments."""
    from airflow.dag_processing.dagbag import DagBag

    dagbag = DagBag(dag_folder=str(Path(__file__).resolve().parents[1] / "dags"))
    assert dagbag.dags, dagbag.import_errors
    for dag_id, dag in dagbag.dags.items():
        cfg = config.get(dag_id)
        (alert,) = dag.deadline
        assert alert == alerts.deadline_alert(cfg.deadline, cfg.deadline_reference)
        assert alert.name == "decision deadline"
