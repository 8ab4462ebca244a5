"""A missed deadline fires the notifiers, on the real embedded stack (tools/stack.sh: scheduler,
dag-processor, api-server, triggerer; LocalExecutor, SQLite) against a real HTTP receiver on
127.0.0.1.

The DAGs are parsed with ``VTM_DEADLINE_SECONDS=5`` (every workflow's deadline shortened to 5 s) and
stay paused, so the triggered runs stay queued and nothing trains: the scheduler sees each run miss
its deadline (5 s after it was queued) and queues the
``AsyncCallback``, the triggerer awaits ``common.alerts.deadline_missed`` and its notifiers read the
``alerts_webhook`` connection, created through the REST API as a person would (the metastore, not
an environment variable). Then ``alerts.notify_message`` from a shell with the stack's environment
(the rollback CLI's path) reaches the same receiver through the same connection."""

from __future__ import annotations

import json
import os
import subprocess
import threading
import time
import urllib.request
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from tests.helpers import free_port
from tools.airflow_api import AirflowClient

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
POWER, MNIST = "power_lgbm_training", "mnist_cnn_training"


@pytest.fixture
def receiver():
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/alerts", received
    server.shutdown()


def wait_for(received: list[dict], run_ids: set[str], timeout: float) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = {m["run_id"]: m for m in received if m.get("event") == "deadline_missed"}
        if run_ids <= set(got):
            return got
        time.sleep(2)
    raise AssertionError(f"no deadline alert for {run_ids - set(got)} after {timeout}s; received {received}")


def ui_deadlines(client: AirflowClient, dag_id: str, run_id: str) -> list[dict]:
    """The run's deadlines as the UI's Deadlines panel reads them (``/ui``, not ``/api/v2``)."""
    client.request("GET", "/version")  # logs in
    request = urllib.request.Request(f"{client.base_url}/ui/dags/{dag_id}/dagRuns/{run_id}/deadlines",
                                     headers={"Authorization": f"Bearer {client._token}"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.load(response)["deadlines"]


@pytest.mark.timeout(900)
def test_missed_deadline_notifies_the_webhook(tmp_path, receiver):
    url, received = receiver
    env = {**os.environ, "VTM_HOME": str(tmp_path / "home"), "MLFLOW_PORT": str(free_port()),
           "AIRFLOW_PORT": str(free_port()), "VENV": str(ROOT / ".venv"), "VTM_DEADLINE_SECONDS": "5",
           "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5"}
    for name in ("MLFLOW_TRACKING_URI", "AIRFLOW_CONN_ALERTS_WEBHOOK", "AIRFLOW_CONN_ALERTS_SLACK",
                 "AIRFLOW_CONN_ALERTS_SMTP"):
        env.pop(name, None)
    stack = str(ROOT / "tools/stack.sh")
    try:
        subprocess.run([stack, "up"], env=env, check=True, timeout=600, capture_output=True, text=True)
        password = json.loads((tmp_path / "home/airflow/simple_auth_manager_passwords.json.generated")
                              .read_text())["admin"]
        client = AirflowClient(f"http://127.0.0.1:{env['AIRFLOW_PORT']}", "admin", password)
        client.request("POST", "/connections", {"connection_id": "alerts_webhook", "conn_type": "http",
                                                "extra": json.dumps({"url": url})})
        client.wait_for_dags([POWER, MNIST])
        for dag_id in (POWER, MNIST):
            assert client.request("GET", f"/dags/{dag_id}")["is_paused"], "runs must stay queued"

        now = datetime.now(UTC).isoformat()
        power = client.request("POST", f"/dags/{POWER}/dagRuns", {"logical_date": now, "conf": {}})
        mnist = client.request("POST", f"/dags/{MNIST}/dagRuns", {"logical_date": None, "conf": {}})
        runs = {POWER: power["dag_run_id"], MNIST: mnist["dag_run_id"]}
        got = wait_for(received, set(runs.values()), timeout=300)

        for dag_id, run_id in runs.items():
            alert = got[run_id]
            assert alert["dag_id"] == dag_id
            assert "(due 5 s after the run's queued at)" in alert["text"]
            assert alert["text"].startswith(f"[DEADLINE_MISSED] {dag_id} (run {run_id})")
            assert alert["log_url"].endswith(f"/dags/{dag_id}/runs/{run_id}")
            (deadline,) = ui_deadlines(client, dag_id, run_id)
            assert deadline["missed"] and deadline["alert_name"] == "decision deadline"
            assert client.dag_run(dag_id, run_id)["state"] == "queued"  # nothing ran: the deadline alone
        assert sum(m.get("event") == "deadline_missed" for m in received) == 2  # once per run

        # A shell with the stack's environment (python -m common.registry rollback's path).
        probe = ("from common import alerts; import json; "
                 "print(json.dumps(alerts.notify_message('drill', 'from a shell', source='e2e')))")
        out = subprocess.run(["bash", "-c", f'eval "$({stack} env)" && exec python -c "$0"', probe],
                             env=env, check=True, timeout=120, capture_output=True, text=True)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == ["alerts_webhook"]
        assert any(m.get("subject") == "drill" and m["extra"] == {"source": "e2e"} for m in received)
    finally:
        subprocess.run([stack, "down"], env=env, timeout=120)
