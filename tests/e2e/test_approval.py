"""Approval end to end on one embedded stack (tools/stack.sh: real scheduler, api-server,
dag-processor, triggerer, MLflow): the power workflow on the synthetic UCI mirror, answered through
the REST API's human-in-the-loop endpoints (what the UI's "Required actions" form calls) and in a
real headless browser; plus the approval form itself (common.approval.approval_operator) in two
test-only DAGs served as a second bundle (tests/e2e/bundle/approval_checks.py): twenty answers
given the instant the form opens, and a form nobody answers.

The tests run in order on one stack and one registered model: each starts from the champion the
one before left. The browser test signs in before its run waits, so the power workflow's approval
timeout (VTM_APPROVAL_TIMEOUT_SECONDS, read when the DAGs are parsed) only has to outlast it; the
timeout itself is checked on ``approval_no_answer`` (10 s), and what the registry makes of that
answer against a real MLflow server in tests/test_registry_approval.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import threading
import time
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest

from common import config, registry
from tests.helpers import STACK, embedded_stack, stack_env
from tests.uci_synth import write_uci_file
from tools import browser
from tools.airflow_api import AirflowApiError, AirflowClient

# The stack's start, 20 runs of the form, four trainings and the browser.
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]
ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "power_lgbm_training"
CFG = config.get(DAG_ID)
ASSET = registry.model_asset_name(CFG.model_name)
REASON = "checked the plots in the browser"
APPROVAL_TIMEOUT = 900  # seconds: nobody's answer should time out while a test (or the browser) works
BUNDLE = Path(__file__).resolve().parent / "bundle"
RACE_DAG, NO_ANSWER_DAG = "approval_race", "approval_no_answer"
RACES = 20
SMALL = {"eval_weeks": 2, "validation_weeks": 2, "num_boost_round": 300}
WEAKER = {**SMALL, "num_boost_round": 30}  # passes the gate (skill_mae ~0.26); SMALL beats it (mae ~0.396 < ~0.406)


@contextlib.contextmanager
def power_approval_stack(base: Path, approval_timeout: float) -> Iterator[SimpleNamespace]:
    """The embedded stack with the power workflow on a synthetic UCI mirror, unpaused, approval
    timeout ``approval_timeout`` seconds, and the test DAGs of tests/e2e/bundle (unpaused); this
    process reads the stack's MLflow meanwhile."""
    mirror = base / "mirror"
    write_uci_file(mirror / "household_power" / "household_power_consumption.zip", days=200, seed=9)
    local = "airflow.dag_processing.bundles.local.LocalDagBundle"
    bundles = json.dumps([{"name": "dags-folder", "classpath": local, "kwargs": {"path": str(ROOT / "dags")}},
                          {"name": "approval-checks", "classpath": local, "kwargs": {"path": str(BUNDLE)}}])
    # ORPHANED_TASKS_CHECK_INTERVAL: a scheduler restarted after a crash takes over what the dead one
    # had queued at its first check after the dead one's heartbeat is 30 s old; Airflow checks every
    # 300 s, these tests every 10 s (the restart cases below).
    env = stack_env(base / "home", DATA_MIRROR=str(mirror), AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL="5",
                    AIRFLOW__SCHEDULER__ORPHANED_TASKS_CHECK_INTERVAL="10",
                    VTM_APPROVAL_TIMEOUT_SECONDS=str(approval_timeout),
                    AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST=bundles)
    with embedded_stack(env) as shell:
        client = AirflowClient(shell["AIRFLOW__API__BASE_URL"], shell["AIRFLOW_API_USERNAME"],
                               shell["AIRFLOW_API_PASSWORD"])
        client.wait_for_dags([DAG_ID, RACE_DAG, NO_ANSWER_DAG])
        client.unpause(RACE_DAG)
        client.unpause(NO_ANSWER_DAG)
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


def hitl_path(run_id: str, dag_id: str = DAG_ID) -> str:
    return f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id)}/taskInstances/approve/-1/hitlDetails"


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


@pytest.mark.reliability(case="8.1 approval answered the instant it opens",
                         fault="20 forms each answered within a second of waiting (Airflow 3.3.2 failed the "
                               "resumed attempt: answer lost, form reopened empty)",
                         survives="every answer applied on the first try, none reopened (scheduler guard)")
def test_an_answer_the_instant_the_form_opens_is_applied_every_time(stack):
    """Twenty runs of the approval form, each answered the moment it waits. Airflow 3.3.2 loses
    some of these answers (the scheduler fails the resumed attempt and the retry opens the form
    again, empty; common/airflow_guard.py). Every answer must be applied on the first try."""
    client = stack.client
    runs = {client.trigger(RACE_DAG, {}) for _ in range(RACES)}
    answers: dict[str, int] = {}  # run id -> times its form was answered
    lags: list[float] = []
    deadline = time.monotonic() + 900
    while True:
        seen = time.monotonic()
        waiting = client.request("GET", f"/dags/{RACE_DAG}/dagRuns/~/taskInstances"
                                        "?state=awaiting_input&limit=100")["task_instances"]
        for ti in waiting:
            run_id = ti["dag_run_id"]
            answers[run_id] = answers.get(run_id, 0) + 1
            client.request("PATCH", hitl_path(run_id, RACE_DAG),
                           {"chosen_options": ["Approve"], "params_input": {"reason": f"race {run_id}"}})
            lags.append(time.monotonic() - seen)
        records = client.request("GET", f"/dags/{RACE_DAG}/dagRuns?limit=100")["dag_runs"]
        done = {r["dag_run_id"]: r["state"] for r in records if r["state"] in ("success", "failed")}
        if runs <= set(done):
            break
        assert time.monotonic() < deadline, f"runs still active: {sorted(runs - set(done))}"
        time.sleep(0.2)
    print(f"\n{len(lags)} answers, each sent {max(lags):.2f} s at most after the form was seen waiting")
    assert {run_id: done[run_id] for run_id in runs} == dict.fromkeys(runs, "success")
    for run_id in sorted(runs):
        (ti,) = client.task_instances(RACE_DAG, run_id)
        assert ti["try_number"] == 1 and answers[run_id] == 1, (run_id, ti["try_number"], answers[run_id])
        result = client.xcom(RACE_DAG, run_id, "approve")
        assert result["chosen_options"] == ["Approve"] and result["params_input"]["reason"] == f"race {run_id}"
        assert result["responded_by_user"]["name"] == "admin"


def answer_together(client: AirflowClient, run_id: str, options: tuple[str, ...]) -> dict[str, int]:
    """PATCH one answer per option to the race DAG's form at the same instant (one thread each);
    the HTTP status each got."""
    barrier = threading.Barrier(len(options))

    def answer(option: str) -> int:
        barrier.wait()
        try:
            client.request("PATCH", hitl_path(run_id, RACE_DAG),
                           {"chosen_options": [option], "params_input": {"reason": option}})
            return 200
        except AirflowApiError as exc:
            return int(re.search(r"HTTP (\d+)", str(exc)).group(1))

    with ThreadPoolExecutor(len(options)) as pool:
        return dict(zip(options, pool.map(answer, options), strict=True))


@pytest.mark.reliability(case="8.3 two answers at once",
                         fault="Approve and Reject sent to one waiting form at the same instant, five times",
                         survives="one is applied, the other refused with 409; the result says which")
def test_two_answers_at_once_one_is_applied_the_other_refused(stack):
    client = stack.client
    runs = [client.trigger(RACE_DAG, {}) for _ in range(5)]
    for run_id in runs:
        deadline = time.monotonic() + 600
        while not any(t["state"] == "awaiting_input" for t in client.task_instances(RACE_DAG, run_id)):
            assert time.monotonic() < deadline, f"{run_id}: the form never waited"
            time.sleep(0.5)
        codes = answer_together(client, run_id, ("Approve", "Reject"))
        assert sorted(codes.values()) == [200, 409], (run_id, codes)
        (winner,) = [option for option, code in codes.items() if code == 200]
        final = client.wait_for_runs({RACE_DAG: run_id}, timeout=600)[RACE_DAG]
        (ti,) = client.task_instances(RACE_DAG, run_id)
        assert final["state"] == "success" and ti["try_number"] == 1, (final, ti)
        result = client.xcom(RACE_DAG, run_id, "approve")
        assert result["chosen_options"] == [winner] and result["params_input"]["reason"] == winner


# --- an answer while a part of the stack crashes or restarts -------------------------------------
#
# A part is stopped as a crash stops it (SIGKILL to its process group: tools/stack.sh starts each
# part as its own session and group) and started again with ``tools/stack.sh up``, which restarts
# only the dead part and stops the task processes it left behind. Each case uses approval_race
# runs (no training) whose forms were opened before any part went down: the forms that wait
# through a restart unanswered must survive it too.

RESTART_RUNS = 4  # the forms the restart cases answer: two (scheduler), one (api-server), one (triggerer)


def waiting_forms(stack, count: int) -> list[str]:
    """``count`` approval_race runs whose form waits (first try). The first call triggers the forms
    of every restart case at once (RESTART_RUNS) and waits for all of them, so that no part goes
    down while one of them is still starting, and the later cases find theirs waiting already."""
    client, pool = stack.client, stack.state.setdefault("waiting", [])
    if len(pool) < count:
        pool.extend(client.trigger(RACE_DAG, {}) for _ in range(max(count - len(pool), RESTART_RUNS)))
    deadline = time.monotonic() + 600
    while (states := {run_id: [(ti["state"], ti["try_number"]) for ti in client.task_instances(RACE_DAG, run_id)]
                      for run_id in pool}) != dict.fromkeys(pool, [("awaiting_input", 1)]):
        assert time.monotonic() < deadline, f"forms never waited: {states}"
        time.sleep(1)
    runs, stack.state["waiting"] = pool[:count], pool[count:]
    return runs


def crash(stack, part: str) -> None:
    """SIGKILL ``part``'s process group (its pid file: tools/stack.sh) and wait until it is gone."""
    pid = int((Path(stack.env["VTM_HOME"]) / "run" / f"{part}.pid").read_text().split()[0])
    os.killpg(pid, signal.SIGKILL)
    deadline = time.monotonic() + 60
    while True:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except FileNotFoundError:
            return
        if stat.rsplit(")", 1)[1].split()[0] in ("Z", "X"):
            return
        assert time.monotonic() < deadline, f"{part} (pid {pid}) still alive after SIGKILL"
        time.sleep(0.1)


def stack_up(stack) -> None:
    """``tools/stack.sh up``: starts the dead part again, waits until every part is healthy."""
    done = subprocess.run([STACK, "up"], env=stack.env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr


def answer(client: AirflowClient, run_id: str, option: str, reason: str) -> dict:
    return client.request("PATCH", hitl_path(run_id, RACE_DAG),
                          {"chosen_options": [option], "params_input": {"reason": reason}})


def assert_applied_once(client: AirflowClient, run_id: str, option: str, reason: str) -> None:
    """The run succeeded on its first try, the form was never opened again, the task's result is
    the answer given, and the form records that one answer."""
    deadline = time.monotonic() + 600
    while (run := client.dag_run(RACE_DAG, run_id))["state"] not in ("success", "failed"):
        (ti,) = client.task_instances(RACE_DAG, run_id)
        assert ti["try_number"] == 1 and ti["state"] != "awaiting_input", f"{run_id}: form opened again: {ti}"
        assert time.monotonic() < deadline, f"{run_id} still {run['state']} (approve {ti['state']})"
        time.sleep(1)
    (ti,) = client.task_instances(RACE_DAG, run_id)
    assert run["state"] == "success" and ti["try_number"] == 1, (run_id, run["state"], ti)
    quoted = urllib.parse.quote(run_id)
    tries = client.request("GET", f"/dags/{RACE_DAG}/dagRuns/{quoted}/taskInstances/approve/tries")
    assert [t["try_number"] for t in tries["task_instances"]] == [1], tries
    result = client.xcom(RACE_DAG, run_id, "approve")
    assert result["chosen_options"] == [option] and result["params_input"]["reason"] == reason, result
    assert result["responded_by_user"]["name"] == "admin"
    form = client.request("GET", hitl_path(run_id, RACE_DAG))
    assert form["response_received"] and form["chosen_options"] == [option], form
    assert form["params_input"]["reason"] == reason and form["responded_by_user"]["name"] == "admin"


def wait_resuming(client: AirflowClient, run_id: str) -> str:
    """Poll the answered form's task until the scheduler has handed its resumed attempt to the
    executor (queued or running); the state seen (or the end state, if the poll missed it)."""
    deadline = time.monotonic() + 300
    while (state := client.task_instances(RACE_DAG, run_id)[0]["state"]) not in ("queued", "running", "success",
                                                                                  "failed", "up_for_retry"):
        assert time.monotonic() < deadline, f"{run_id}: answered, but never resumed ({state})"
        time.sleep(0.1)
    return state


@pytest.mark.reliability(case="8.4 an answer while the scheduler crashes",
                         fault="scheduler SIGKILLed (a) with a form just answered, its resumed attempt queued or "
                               "running; (b) with a form waiting, answered while the scheduler is down",
                         survives="both answers applied on the first try once tools/stack.sh up restarted "
                                  "it; no form reopened (scheduler guard)")
def test_an_answer_while_the_scheduler_crashes_is_applied(stack):
    client = stack.client
    resuming, waiting = waiting_forms(stack, 2)
    answer(client, resuming, "Approve", "answered before the crash")
    seen = wait_resuming(client, resuming)
    crash(stack, "scheduler")
    print(f"\nscheduler killed with the answered attempt {seen}")
    assert answer(client, waiting, "Reject", "answered while the scheduler is down")["chosen_options"] == ["Reject"]
    stack_up(stack)
    assert_applied_once(client, resuming, "Approve", "answered before the crash")
    assert_applied_once(client, waiting, "Reject", "answered while the scheduler is down")


def answer_through_outage(client: AirflowClient, run_id: str, option: str, reason: str,
                          timeout: float = 600) -> tuple[int, int]:
    """What a client does while the API server restarts: send the answer, and send it again while
    the connection is refused or dropped (a server starting up may accept a connection and reset
    it); stop at the server's first HTTP reply. A 409 after a dropped try can mean that try landed:
    the form then shows whose answer was applied. (HTTP status, tries that got no reply.)"""
    failed = 0
    deadline = time.monotonic() + timeout
    while True:
        try:
            answer(client, run_id, option, reason)
            return 200, failed
        except (AirflowApiError, ConnectionError) as exc:
            if (status := re.search(r"HTTP (\d+)", str(exc))) is not None:
                return int(status.group(1)), failed
            assert time.monotonic() < deadline, f"API server still down after {timeout} s: {exc}"
            failed += 1
            time.sleep(0.5)


@pytest.mark.reliability(case="8.5 an answer while the API server restarts",
                         fault="API server SIGKILLed with a form waiting; the answer sent (and re-sent on "
                               "connection refused) while tools/stack.sh up starts it again",
                         survives="the first HTTP reply is 200 (or 409 when a dropped try had landed: the form "
                                  "shows it); the answer is applied on the first try")
def test_an_answer_while_the_api_server_restarts_is_applied(stack, monkeypatch):
    client = stack.client
    (run_id,) = waiting_forms(stack, 1)
    monkeypatch.setattr(client, "ATTEMPTS", 1)  # the loop below retries, one connection at a time
    crash(stack, "api-server")
    with ThreadPoolExecutor(1) as pool:
        sent = pool.submit(answer_through_outage, client, run_id, "Approve", "answered during the restart")
        stack_up(stack)
        status, refused = sent.result()
    print(f"\nthe answer got no reply {refused} times while the API server was down, then HTTP {status}")
    assert refused > 0 and status in (200, 409), (status, refused)
    monkeypatch.undo()
    if status == 409:  # a dropped try had landed: the form holds that (same) answer, applied once
        form = client.request("GET", hitl_path(run_id, RACE_DAG))
        assert form["chosen_options"] == ["Approve"] and form["params_input"]["reason"] == "answered during the restart"
    assert_applied_once(client, run_id, "Approve", "answered during the restart")


@pytest.mark.reliability(case="8.6 an answer while the triggerer crashes",
                         fault="triggerer SIGKILLed with a form waiting, answered while it is down",
                         survives="applied on the first try (a waiting form needs no triggerer in Airflow 3.3)")
def test_an_answer_while_the_triggerer_crashes_is_applied(stack):
    client = stack.client
    (run_id,) = waiting_forms(stack, 1)
    crash(stack, "triggerer")
    answer(client, run_id, "Reject", "answered while the triggerer is down")
    stack_up(stack)
    assert_applied_once(client, run_id, "Reject", "answered while the triggerer is down")


def test_no_answer_in_time_is_a_rejection_by_nobody(stack):
    """The approval form's timeout applies its default, Reject, with no respondent: the answer
    ``registry.resolve_approval`` records as ``decided_by=timeout`` (tests/test_registry_approval.py
    feeds it this same answer against a real MLflow server)."""
    client = stack.client
    run_id = client.trigger(NO_ANSWER_DAG, {})
    final = client.wait_for_runs({NO_ANSWER_DAG: run_id}, timeout=600)[NO_ANSWER_DAG]
    (ti,) = client.task_instances(NO_ANSWER_DAG, run_id)
    assert final["state"] == "success" and ti["try_number"] == 1, (final, ti)
    answer = client.xcom(NO_ANSWER_DAG, run_id, "approve")
    assert answer["chosen_options"] == ["Reject"] and answer["responded_by_user"] is None


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


def markdown_table(body: str) -> list[list[str]]:
    """The rows of the (one) Markdown table in an approval body, separator row left out."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in body.splitlines() if line.startswith("|")]
    return [row for row in rows if not all(set(cell) <= {"-"} and cell for cell in row)]


def sign_in(page, username: str, password: str, attempts: int = 3) -> None:
    """Fill the sign-in form and submit it. The login page may still be mounting when its inputs
    first appear (seen in CI on a busy machine: the typed values were gone and "Sign in" stayed
    disabled), so the form is filled again until the button is enabled."""
    from playwright.sync_api import expect

    button = page.get_by_role("button", name="Sign in")
    for attempt in range(1, attempts + 1):
        page.locator("input[name=username]").fill(username)
        page.locator("input[name=password]").fill(password)
        try:
            expect(button).to_be_enabled(timeout=10_000)
            break
        except AssertionError:
            if attempt == attempts:
                raise
    button.click()


def approve_in_browser(base_url: str, username: str, password: str, run_id: str, body: str,
                       shots: Path) -> None:
    """Sign in, check the form shows the body's score table, write the reason, click Approve."""
    from playwright.sync_api import expect, sync_playwright

    form = f"{base_url}/dags/{DAG_ID}/runs/{urllib.parse.quote(run_id, safe='')}/tasks/approve/required_actions"
    with sync_playwright() as pw:
        chromium = pw.chromium.launch(**browser.launch_options())
        page = chromium.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)  # 2 cores, shared with the stack's task processes
        try:
            # Not signed in: the UI sends the person to its sign-in page first. Its redirects can
            # abort the navigation Playwright waits on (CI: "net::ERR_ABORTED" from wait_for_url),
            # so the test waits for what the person sees, not for navigation events.
            page.goto(form, wait_until="commit")
            expect(page.locator("input[name=username]")).to_be_visible()
            assert "/auth/login" in page.url, page.url
            sign_in(page, username, password)
            subject = body.split("**")[1]  # "power_lgbm vN"
            expect(page.get_by_text(f"Promote {subject} to champion?")).to_be_visible()
            assert page.url.endswith("/tasks/approve/required_actions"), page.url  # back on the form
            table = page.locator("table").filter(has_text="challenger")
            expect(table).to_be_visible()
            shown = [row.locator("th, td").all_inner_texts() for row in table.locator("tr").all()]
            assert [[cell.strip() for cell in row] for row in shown] == markdown_table(body)
            approve = page.get_by_test_id("hitl-option-Approve")
            expect(approve).to_be_disabled()  # the reason is required
            page.locator("input[name=element_reason]").fill(REASON)
            expect(approve).to_be_enabled()
            approve.click()
            expect(page.get_by_text(re.compile(r"Response received at .* from " + re.escape(username)))).to_be_visible()
        except BaseException:
            shots.mkdir(parents=True, exist_ok=True)
            try:
                page.screenshot(path=shots / "failure.png", full_page=True)
                (shots / "failure.html").write_text(page.content())
                print(f"browser failure at {page.url}: screenshot and HTML in {shots}")
            except Exception as exc:  # a crashed page: keep the original error
                print(f"browser failure at {page.url}; no screenshot: {exc}")
            raise
        finally:
            chromium.close()


def test_approve_in_a_real_browser_promotes(stack, tmp_path):
    """A person signs in to the Airflow UI in headless Chromium (tools/browser.py, `make browser`),
    opens the approve task's "Required Action" form, sees the challenger's and the champion's
    scores, writes a reason and clicks Approve; the run then promotes the challenger. A failing
    browser step leaves a screenshot and the page's HTML in the test's tmp dir (named in the
    failure)."""
    client, shell, first = stack.client, stack.shell, stack.state["first"]
    assert champion() == first  # the rollback before left it there

    run_id, request = trigger_until_approval(client, SMALL)
    second = client.xcom(DAG_ID, run_id, "register")["version"]
    table = markdown_table(request["body"])
    assert table[0] == ["metric", f"challenger v{second}", f"champion v{first}"]
    mae = next(row for row in table if row[0] == "mae")
    assert all(re.fullmatch(r"\d+\.\d+", score) for score in mae[1:]), mae  # both scores in the body

    approve_in_browser(shell["AIRFLOW__API__BASE_URL"], shell["AIRFLOW_API_USERNAME"],
                       shell["AIRFLOW_API_PASSWORD"], run_id, request["body"], tmp_path / "browser")

    assert finish(client, run_id)["promote"] == "success"
    assert client.xcom(DAG_ID, run_id, "approve")["chosen_options"] == ["Approve"]
    assert champion() == second
    tags = model_version(second).tags
    assert (tags["decision"], tags["decided_by"]) == ("promoted", "admin")
    assert tags["decision_reason"].startswith(f"approved by admin: {REASON}; gate: ")
    events = asset_events(client)
    assert len(events) == 4 and events[-1]["source_task_id"] == "promote" and events[-1]["extra"]["version"] == second
