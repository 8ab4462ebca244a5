"""Approval in a real headless browser, end to end on the embedded stack (tools/stack.sh): a person
signs in to the Airflow UI, opens the approve task's "Required Action" form, sees the challenger's
and the champion's scores, writes a reason and clicks Approve; the run then promotes the challenger.

test_approval.py answers the same form through the REST API; this test is the one that drives the
UI itself. The browser is Debian's Chromium headless shell from pinned packages (tools/browser.py;
`make browser`, a prerequisite of `make test`), driven by Playwright. A failing browser step leaves
a screenshot and the page's HTML in the test's tmp dir (named in the failure).
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

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
    power_approval_stack,
    trigger_until_approval,
)
from tools import browser

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(1800)]  # the stack's start, two trainings, the browser
APPROVAL_TIMEOUT = 900  # seconds: nobody's answer should time out while the browser works
REASON = "checked the plots in the browser"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with power_approval_stack(tmp_path_factory.mktemp("approval_browser"), APPROVAL_TIMEOUT) as ns:
        yield ns


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
