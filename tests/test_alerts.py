"""Alert callbacks against real local receivers: an HTTP server (stands in for the Slack and
webhook endpoints, which cannot be reached from here) and an SMTP server, both on 127.0.0.1."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest

from common import alerts
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
    from aiosmtpd.handlers import Message

    messages = []

    class Collect(Message):
        def handle_message(self, message):
            messages.append(message)

    port = free_port()
    controller = Controller(Collect(), hostname="127.0.0.1", port=port)
    controller.start()
    yield port, messages
    controller.stop()


def conn(**kw):
    base = {"host": None, "port": None, "schema": None, "login": None, "password": None, "extra_dejson": {}}
    return SimpleNamespace(**{**base, **kw})


FAILURE_CONTEXT = {
    "ti": SimpleNamespace(dag_id="power_lgbm_training", task_id="train", run_id="manual__1",
                          try_number=2, log_url="http://127.0.0.1:8080/log"),
    "exception": ValueError("bad row 17"),
}


def test_failure_reaches_slack_and_webhook(http_receiver):
    url, received = http_receiver
    channels = {alerts.SLACK_CONN_ID: conn(extra_dejson={"url": f"{url}/slack"}),
                alerts.WEBHOOK_CONN_ID: conn(extra_dejson={"url": f"{url}/hook"})}
    sent = alerts.notify(alerts.alert_from_context("failed", FAILURE_CONTEXT), channels.get)
    assert sent == [alerts.SLACK_CONN_ID, alerts.WEBHOOK_CONN_ID]
    by_path = dict(received)
    assert "[FAILED] power_lgbm_training.train" in by_path["/slack"]["text"]
    assert "ValueError: bad row 17" in by_path["/slack"]["text"]
    assert by_path["/hook"]["dag_id"] == "power_lgbm_training" and by_path["/hook"]["try_number"] == 2


def test_failure_reaches_email(smtp_receiver):
    port, messages = smtp_receiver
    channels = {alerts.SMTP_CONN_ID: conn(host="127.0.0.1", port=port,
                                          extra_dejson={"to": "ml-oncall@example.org", "starttls": "false"})}
    assert alerts.notify(alerts.alert_from_context("failed", FAILURE_CONTEXT), channels.get) == [
        alerts.SMTP_CONN_ID]
    assert messages[0]["To"] == "ml-oncall@example.org"
    assert "power_lgbm_training.train" in messages[0]["Subject"]


def test_no_channel_is_one_clear_log_line(caplog):
    with caplog.at_level(logging.WARNING, logger="common.alerts"):
        assert alerts.notify(alerts.alert_from_context("up_for_retry", FAILURE_CONTEXT), lambda _: None) == []
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "no channel configured" in lines[0] and "UP_FOR_RETRY" in lines[0]


def test_broken_channel_logs_and_never_raises(caplog):
    channels = {alerts.WEBHOOK_CONN_ID: conn(extra_dejson={"url": "http://127.0.0.1:9/nothing"})}
    assert alerts.notify(alerts.alert_from_context("failed", FAILURE_CONTEXT), channels.get) == []
    assert any("alerts_webhook failed" in r.getMessage() for r in caplog.records)


def test_channels_come_from_airflow_connections(http_receiver, monkeypatch):
    url, received = http_receiver
    monkeypatch.setenv("AIRFLOW_CONN_ALERTS_WEBHOOK",
                       json.dumps({"conn_type": "http", "extra": {"url": f"{url}/from-airflow"}}))
    assert alerts.notify(alerts.alert_from_context("failed", FAILURE_CONTEXT)) == [alerts.WEBHOOK_CONN_ID]
    assert received[0][0] == "/from-airflow"
