"""Approval in the Airflow UI, end to end on the embedded stack (tools/stack.sh): the power
workflow on the synthetic UCI mirror, answered through the REST API's human-in-the-loop endpoints
(what the UI's "Required actions" form calls): approve, reject, no answer (time out), then an
unattended promotion and a rollback from the command line.

The approval timeout is shortened for this stack with VTM_APPROVAL_TIMEOUT_SECONDS (read when the
DAGs are parsed; docs/operations.md). The tests run in order on one stack and one registered model:
each starts from the champion the one before left.
"""

from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from common import config, registry
from tests.helpers import STACK, embedded_stack, stack_env
from tests.uci_synth import write_uci_file
from tools.airflow_api import AirflowClient

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "power_lgbm_training"
CFG = config.get(DAG_ID)
ASSET = registry.model_asset_name(CFG.model_name)
APPROVAL_TIMEOUT = 90  # seconds: long enough to answer, short enough to wait out
SMALL = {"eval_weeks": 2, "validation_weeks": 2, "num_boost_round": 300}
WEAKER = {**SMALL, "num_boost_round": 30}  # passes the gate (skill_mae ~0.26); SMALL beats it (mae ~0.396 < ~0.406)


@contextlib.contextmanager
def power_approval_stack(base: Path, approval_timeout: float) -> Iterator[SimpleNamespace]:
    """The embedded stack with the power workflow on a synthetic UCI mirror, unpaused, approval
    timeout ``approval_timeout`` seconds; this process reads the stack's MLflow meanwhile."""
    mirror = base / "mirror"
    write_uci_file(mirror / "household_power" / "household_power_consumption.zip", days=200, seed=9)
    env = stack_env(base / "home", DATA_MIRROR=str(mirror), AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL="5",
                    VTM_APPROVAL_TIMEOUT_SECONDS=str(approval_timeout))
    with embedded_stack(env) as shell:
        client = AirflowClient(shell["AIRFLOW__API__BASE_URL"], shell["AIRFLOW_API_USERNAME"],
                               shell["AIRFLOW_API_PASSWORD"])
        client.wait_for_dags([DAG_ID])
        client.unpause(DAG_ID)  # a triggered run of a paused DAG never starts
        # Unpausing also creates the latest scheduled run (default parameters, no conf): not part
        # of these tests, and it would hold the DAG's one active run. End it before it starts work.
        deadline = time.monotonic() + 120
        while not (runs := client.request("GET", f"/dags/{DAG_ID}/dagRuns")["dag_runs"]):
            assert time.monotonic() < deadline, "no scheduled run after unpausing"
            time.sleep(2)
        for run in runs:
            client.request("PATCH", f"/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run['dag_run_id'])}",
                           {"state": "failed"})
        with pytest.MonkeyPatch.context() as mp:
            for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                mp.setenv(key, shell[key])
            yield SimpleNamespace(env=env, shell=shell, client=client, state={})


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with power_approval_stack(tmp_path_factory.mktemp("approval"), APPROVAL_TIMEOUT) as ns:
        yield ns


def hitl_path(run_id: str) -> str:
    return f"/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run_id)}/taskInstances/approve/-1/hitlDetails"


def states(client: AirflowClient, run_id: str) -> dict[str, str]:
    return {t["task_id"]: t["state"] for t in client.task_instances(DAG_ID, run_id)}


def trigger_until_approval(client: AirflowClient, conf: dict) -> tuple[str, dict]:
    """Trigger a run and wait until its approve step waits for a person; its request and run id."""
    run_id = client.trigger(DAG_ID, conf)
    deadline = time.monotonic() + 600
    while (now := states(client, run_id)).get("approve") != "awaiting_input":
        assert time.monotonic() < deadline, f"approve never waited: {now}"
        assert client.dag_run(DAG_ID, run_id)["state"] not in ("success", "failed"), now
        time.sleep(3)
    return run_id, client.request("GET", hitl_path(run_id))


def finish(client: AirflowClient, run_id: str) -> dict[str, str]:
    final = client.wait_for_runs({DAG_ID: run_id}, timeout=600)[DAG_ID]
    now = states(client, run_id)
    assert final["state"] == "success", now
    return now


def model_version(version: str):
    return registry.configure().get_model_version(CFG.model_name, version)


def champion() -> str | None:
    mv = registry.alias_version(registry.configure(), CFG.model_name, registry.CHAMPION)
    return mv.version if mv else None


def asset_events(client: AirflowClient) -> list[dict]:
    query = urllib.parse.urlencode({"name_pattern": ASSET, "order_by": "timestamp", "limit": 100})
    return [e for e in client.request("GET", f"/assets/events?{query}")["asset_events"] if e["name"] == ASSET]


def test_approve_from_the_ui_promotes_and_announces_the_champion(stack):
    client = stack.client
    run_id, request = trigger_until_approval(client, WEAKER)
    decision = client.xcom(DAG_ID, run_id, "register")
    version = decision["version"]
    assert decision["decision"] == "pending_approval" and champion() is None
    # The form a person sees: the scores on the evaluation data, the data version, MLflow links.
    assert request["options"] == ["Approve", "Reject"] and request["defaults"] == ["Reject"]
    assert f"v{version}" in request["subject"] and CFG.model_name in request["subject"]
    body = request["body"]
    assert "| mae |" in body and "| skill_mae |" in body and "baseline" in body
    assert "data version: `power-" in body and "/#/experiments/" in body and "forecast_vs_actual.png" in body
    assert "reason" in request["params"]

    answer = client.request("PATCH", hitl_path(run_id), {"chosen_options": ["Approve"],
                                                        "params_input": {"reason": "checked the plots"}})
    assert answer["chosen_options"] == ["Approve"]
    assert finish(client, run_id)["promote"] == "success"
    assert champion() == version
    tags = model_version(version).tags
    assert tags["decision"] == "promoted" and tags["decided_by"] == "admin"
    assert tags["decision_reason"].startswith("approved by admin: checked the plots; gate: skill_mae=")
    (event,) = asset_events(client)
    assert event["source_dag_id"] == DAG_ID and event["source_task_id"] == "promote"
    assert event["extra"]["version"] == version and event["extra"]["metric"] == "mae"
    assert event["extra"]["model_name"] == CFG.model_name and event["extra"]["value"] > 0
    stack.state["first"] = version


def test_reject_from_the_ui_keeps_the_champion(stack):
    client, first = stack.client, stack.state["first"]
    run_id, request = trigger_until_approval(client, SMALL)
    version = client.xcom(DAG_ID, run_id, "register")["version"]
    assert f"champion v{first}" in request["body"]  # both scores, side by side
    client.request("PATCH", hitl_path(run_id), {"chosen_options": ["Reject"],
                                                "params_input": {"reason": "holiday week"}})
    assert finish(client, run_id)["promote"] == "success"
    assert champion() == first
    tags = model_version(version).tags
    assert (tags["decision"], tags["decided_by"]) == ("rejected", "admin")
    assert tags["decision_reason"] == "rejected by admin: holiday week"
    assert len(asset_events(client)) == 1  # nothing moved, nothing announced


def test_no_answer_in_time_is_a_rejection(stack):
    client, first = stack.client, stack.state["first"]
    run_id, _ = trigger_until_approval(client, SMALL)
    version = client.xcom(DAG_ID, run_id, "register")["version"]
    time.sleep(APPROVAL_TIMEOUT)  # nobody answers; the scheduler applies the default (Reject)
    now = finish(client, run_id)
    assert now["approve"] == "success" and now["promote"] == "success"
    assert champion() == first
    tags = model_version(version).tags
    assert (tags["decision"], tags["decided_by"]) == ("rejected", "timeout")
    assert "no answer within the approval timeout" in tags["decision_reason"]
    assert client.xcom(DAG_ID, run_id, "approve")["responded_by_user"] is None
    assert len(asset_events(client)) == 1


def test_unattended_promotion_then_rollback_from_the_command_line(stack):
    client, first = stack.client, stack.state["first"]
    run_id = client.trigger(DAG_ID, {**SMALL, "auto_promote": True})
    now = finish(client, run_id)
    assert now["awaits_approval"] == "success" and now["approve"] == "skipped" and now["promote"] == "skipped"
    decision = client.xcom(DAG_ID, run_id, "register")
    second = decision["version"]
    assert decision["decision"] == "promoted" and champion() == second
    assert model_version(second).tags["decided_by"] == "gate"
    events = asset_events(client)
    assert len(events) == 2 and events[-1]["source_task_id"] == "register"
    assert events[-1]["extra"]["version"] == second and events[-1]["extra"]["previous_version"] == first

    done = subprocess.run(
        ["bash", "-c", f'eval "$({STACK} env)" && python -m common.registry rollback {CFG.model_name} '
                       '--by carol --reason "complaints from serving"'],
        cwd=ROOT / "dags", env=stack.env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"asset event emitted: {ASSET} v{first}" in done.stdout, done.stdout
    assert champion() == first
    rolled = model_version(second).tags
    assert (rolled["decision"], rolled["decided_by"]) == ("rolled_back", "carol")
    assert "complaints from serving" in rolled["decision_reason"]
    assert model_version(first).tags["restored_by"] == "carol"
    events = asset_events(client)
    assert len(events) == 3 and events[-1]["extra"]["version"] == first
    assert events[-1]["extra"]["from_rest_api"] is True and events[-1]["extra"]["decided_by"] == "carol"
    # The password is read from its file when the shell evaluates the line, never printed.
    printed = subprocess.run([STACK, "env"], env=stack.env, capture_output=True, text=True, timeout=60).stdout
    assert stack.shell["AIRFLOW_API_PASSWORD"] not in printed
