"""Two test-only DAGs around the approval form every workflow uses (common.approval's operator),
served to the embedded stack as a second DAG bundle by tests/e2e/test_approval.py:

- ``approval_race``: only the form, many runs at once, answered the instant it waits (an answer
  within a second of the pause must be applied, never lost or reopened);
- ``approval_no_answer``: the form with a 10 s timeout, never answered (the default, Reject,
  with nobody as the respondent).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import dag

from common import approval


# Retries as every workflow has them (config.WorkflowConfig.retries): a lost answer shows as a
# second try that opens the form again.
@dag(schedule=None, max_active_runs=32, max_active_tasks=32, tags=["test"],
     default_args={"retries": 2, "retry_delay": timedelta(seconds=5)})
def approval_race() -> None:
    approval.approval_operator(subject="Race: approve me", body="Answered the instant the form opens.",
                               response_timeout=timedelta(minutes=30))


@dag(schedule=None, tags=["test"])
def approval_no_answer() -> None:
    approval.approval_operator(subject="Nobody answers", body="Times out.", response_timeout=timedelta(seconds=10))


approval_race()
approval_no_answer()
