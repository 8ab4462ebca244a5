"""The scheduler guard's rule (dags/common/scheduler_guard.py): which executor SUCCESS is the stale
exit of a parked attempt. The guard at work, against Airflow's real scheduler, is
tests/e2e/test_approval.py::test_an_answer_the_instant_the_form_opens_is_applied_every_time."""

from __future__ import annotations

import pytest

from common import scheduler_guard


@pytest.mark.parametrize(("event", "event_try", "state", "ti_try", "next_method", "stale"), [
    # The race: the answer resumed the attempt before the scheduler read the park's exit.
    ("success", 1, "scheduled", 1, "execute_complete", True),
    ("success", 1, "queued", 1, "execute_complete", True),
    ("success", 1, "running", 1, None, True),  # the resumed attempt already started
    # Everything else reaches Airflow's own handling untouched.
    ("success", 1, "queued", 1, None, False),  # queued, never parked: Airflow's "killed externally"
    ("success", 1, "scheduled", 1, None, False),
    ("success", 1, "queued", 2, "execute_complete", False),  # another try's event
    ("success", 1, "success", 1, None, False),  # the normal end of a task
    ("success", 1, "awaiting_input", 1, "execute_complete", False),  # parked, not yet answered
    ("failed", 1, "queued", 1, "execute_complete", False),  # a failure is never dropped
    ("failed", 1, "running", 1, None, False),
])
def test_only_the_parked_attempts_stale_success_is_dropped(event, event_try, state, ti_try, next_method, stale):
    assert scheduler_guard.is_stale_park_exit(event, event_try, state, ti_try, next_method) is stale


def test_install_wraps_the_scheduler_once():
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    before = SchedulerJobRunner.process_executor_events
    try:
        scheduler_guard.install()
        wrapped = SchedulerJobRunner.__dict__["process_executor_events"]
        scheduler_guard.install()  # idempotent
        assert SchedulerJobRunner.__dict__["process_executor_events"] is wrapped
        assert getattr(wrapped.__func__, "_vtm_guarded", False)
    finally:
        SchedulerJobRunner.process_executor_events = classmethod(before.__func__)
