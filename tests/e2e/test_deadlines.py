"""A missed deadline fires the notifiers, on the real embedded stack (tools/stack.sh: scheduler,
dag-processor, api-server, triggerer; LocalExecutor, PostgreSQL) against a real HTTP receiver on
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
import subprocess
import time
import urllib.request
from datetime import UTC, datetime

import pytest

from tests.helpers import STACK, embedded_stack, http_receiver, stack_env
from tools.airflow_api import AirflowClient

pytestmark = pytest.mark.e2e
POWER, MNIST = "power_lgbm_training", "mnist_cnn_training"


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
def test_missed_deadline_notifies_the_webhook(tmp_path):
    env = stack_env(tmp_path / "home", VTM_DEADLINE_SECONDS="5")
    with http_receiver("/alerts") as (url, received), embedded_stack(env) as shell:
        client = AirflowClient(shell["AIRFLOW__API__BASE_URL"], shell["AIRFLOW_API_USERNAME"],
                               shell["AIRFLOW_API_PASSWORD"])
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
        out = subprocess.run(["bash", "-c", f'eval "$({STACK} env)" && exec python -c "$0"', probe],
                             env=env, check=True, timeout=120, capture_output=True, text=True)
        assert json.loads(out.stdout.strip().splitlines()[-1]) == ["alerts_webhook"]
        assert any(m.get("subject") == "drill" and m["extra"] == {"source": "e2e"} for m in received)
