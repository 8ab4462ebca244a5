"""Approval in a real headless browser, end to end on the embedded stack (tools/stack.sh): a person
signs in to the Airflow UI, opens the approve task's "Required Action" form, sees the challenger's
and the champion's scores, writes a reason and clicks Approve; the run then promotes the challenger.

test_approval.py answers the same form through the REST API; this test is the one that drives the
UI itself. The browser is Debian's Chromium headless shell from pinned packages (tools/browser.py;
`make browser`, a prerequisite of `make test`), driven by Playwright. A failing browser step leaves
a screenshot and the page's HTML in the test's tmp dir (named in the failure).
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import urllib.parse
from pathlib import Path
from types import SimpleNamespace

import pytest

# The power workflow's settings and helpers; the stack itself is started here (the same way).
from tests.e2e.test_approval import (
    DAG_ID,
    SMALL,
    WEAKER,
    champion,
    finish,
    hitl_path,
    model_version,
    trigger_until_approval,
)
from tests.helpers import free_port
from tests.uci_synth import write_uci_file
from tools import browser
from tools.airflow_api import AirflowClient

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # the stack's start, two trainings, the browser
APPROVAL_TIMEOUT = 900  # seconds: nobody's answer should time out while the browser works
REASON = "checked the plots in the browser"
ROOT = Path(__file__).resolve().parents[2]
STACK = str(ROOT / "tools/stack.sh")


def stack_shell(env: dict[str, str]) -> dict[str, str]:
    """What `eval "$(tools/stack.sh env)"` gives a person's shell."""
    out = subprocess.run(["bash", "-c", f'eval "$({STACK} env)" && env -0'], env=env, capture_output=True,
                         check=True, timeout=60).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    base = tmp_path_factory.mktemp("approval_browser")
    mirror = base / "mirror"
    write_uci_file(mirror / "household_power" / "household_power_consumption.zip", days=200, seed=9)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("MLFLOW_TRACKING_", "AIRFLOW", "DATA_MIRROR"))}
    env.update({"VTM_HOME": str(base / "home"), "DATA_MIRROR": str(mirror),
                "MLFLOW_PORT": str(free_port()), "AIRFLOW_PORT": str(free_port()),
                "VENV": str(ROOT / ".venv"), "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
                "AIRFLOW__SCHEDULER__TRIGGER_TIMEOUT_CHECK_INTERVAL": "5",
                "VTM_APPROVAL_TIMEOUT_SECONDS": str(APPROVAL_TIMEOUT)})
    try:
        subprocess.run([STACK, "up"], env=env, check=True, timeout=600, capture_output=True, text=True)
        shell = stack_shell(env)
        client = AirflowClient(shell["AIRFLOW__API__BASE_URL"], shell["AIRFLOW_API_USERNAME"],
                               shell["AIRFLOW_API_PASSWORD"])
        client.wait_for_dags([DAG_ID])
        client.unpause(DAG_ID)  # a triggered run of a paused DAG never starts
        # Unpausing also creates the latest scheduled run: end it before it holds the DAG's one active run.
        deadline = time.monotonic() + 120
        while not (runs := client.request("GET", f"/dags/{DAG_ID}/dagRuns")["dag_runs"]):
            assert time.monotonic() < deadline, "no scheduled run after unpausing"
            time.sleep(2)
        for run in runs:
            client.request("PATCH", f"/dags/{DAG_ID}/dagRuns/{urllib.parse.quote(run['dag_run_id'])}",
                           {"state": "failed"})
        with pytest.MonkeyPatch.context() as mp:  # this process reads the stack's MLflow too
            for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
                mp.setenv(key, shell[key])
            yield SimpleNamespace(shell=shell, client=client)
    finally:
        subprocess.run([STACK, "down"], env=env, timeout=300)


def markdown_table(body: str) -> list[list[str]]:
    """The rows of the (one) Markdown table in an approval body, separator row left out."""
    rows = [[cell.strip() for cell in line.strip().strip("|").split("|")]
            for line in body.splitlines() if line.startswith("|")]
    return [row for row in rows if not all(set(cell) <= {"-"} and cell for cell in row)]


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
            page.goto(form)  # not signed in: the UI sends the person to its sign-in page first
            page.wait_for_url(re.compile(r"/auth/login"))
            page.locator("input[name=username]").fill(username)
            page.locator("input[name=password]").fill(password)
            page.get_by_role("button", name="Sign in").click()
            page.wait_for_url(re.compile(r"/tasks/approve/required_actions$"))
            subject = body.split("**")[1]  # "power_lgbm vN"
            expect(page.get_by_text(f"Promote {subject} to champion?")).to_be_visible()
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
    client, shell = stack.client, stack.shell
    # A champion first (answered through the REST API), so the form compares two versions.
    run_id, _ = trigger_until_approval(client, WEAKER)
    first = client.xcom(DAG_ID, run_id, "register")["version"]
    client.request("PATCH", hitl_path(run_id), {"chosen_options": ["Approve"],
                                                "params_input": {"reason": "the first champion"}})
    assert finish(client, run_id)["promote"] == "success" and champion() == first

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
