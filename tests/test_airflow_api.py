"""tools/airflow_api.AirflowClient against a real HTTP server on 127.0.0.1 that is slow or failing
the way a busy embedded stack is: reads are retried, and so is a trigger, which names its run so
that a retry never makes a second run."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tools.airflow_api import AirflowApiError, AirflowClient


class FlakyApi(BaseHTTPRequestHandler):
    """Answers /auth/token; every other request follows ``script``: 'slow', '500' or 'ok'."""

    script: list[str] = []
    seen: list[tuple[str, str]] = []
    bodies: list[dict] = []

    def log_message(self, *args) -> None:  # keep test output clean
        pass

    def _answer(self, code: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path == "/auth/token":
            return self._answer(201, {"access_token": "t"})
        self.seen.append((self.command, self.path))
        self.bodies.append(json.loads(body) if body else {})
        step = self.script.pop(0) if self.script else "ok"
        if step == "slow":
            time.sleep(1.0)  # longer than the client's timeout in these tests
            return self._answer(200, {"late": True})
        if step == "500":
            return self._answer(500, {"detail": "database is locked"})
        if step == "409":
            return self._answer(409, {"detail": "DAG Run with that id already exists"})
        return self._answer(200, {"state": "success", "dag_run_id": "r1"})

    do_GET = do_POST = do_PATCH = _handle


@pytest.fixture
def api() -> Iterator[tuple[AirflowClient, type[FlakyApi]]]:
    FlakyApi.script, FlakyApi.seen, FlakyApi.bodies = [], [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), FlakyApi)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = AirflowClient(f"http://127.0.0.1:{server.server_address[1]}", "admin", "pw")
    client.TIMEOUT, client.BACKOFF = 0.3, 0.01
    try:
        yield client, FlakyApi
    finally:
        server.shutdown()
        server.server_close()


def test_a_read_survives_a_timeout_and_a_server_error(api):
    client, handler = api
    handler.script = ["slow", "500"]
    assert client.dag_run("d", "r1")["state"] == "success"
    assert handler.seen == [("GET", "/api/v2/dags/d/dagRuns/r1")] * 3


def test_a_read_gives_up_with_a_clear_error(api):
    client, handler = api
    handler.script = ["500"] * client.ATTEMPTS
    with pytest.raises(AirflowApiError, match=r"GET /dags/d/dagRuns/r1: HTTP 500 .*database is locked"):
        client.dag_run("d", "r1")
    assert len(handler.seen) == client.ATTEMPTS


def test_a_trigger_that_timed_out_is_sent_again_with_the_same_run_id(api):
    """The first POST times out on the client but created the run; the retry's 409 means done."""
    client, handler = api
    handler.script = ["slow", "409"]
    run_id = client.trigger("d", {"x": 1})
    assert handler.seen == [("POST", "/api/v2/dags/d/dagRuns")] * 2
    first, second = handler.bodies
    assert first == second and first["dag_run_id"] == run_id and first["conf"] == {"x": 1}
    assert run_id.startswith("manual__") and client.trigger("d") != run_id  # a new trigger, a new run


def test_a_conflict_on_the_first_try_is_an_error(api):
    client, handler = api
    handler.script = ["409"]
    with pytest.raises(AirflowApiError, match="HTTP 409"):
        client.trigger("d", {})
    assert len(handler.seen) == 1
