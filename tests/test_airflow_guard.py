"""The guards of dags/common/airflow_guard.py: which executor SUCCESS is the stale exit of a parked
attempt, and where the answer guard hooks in. The guards at work, against Airflow's real
scheduler and API server, are tests/e2e/test_approval.py's
test_an_answer_the_instant_the_form_opens_is_applied_every_time and
test_two_answers_at_once_one_is_applied_the_other_refused."""

from __future__ import annotations

import pytest

from common import airflow_guard


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
    assert airflow_guard.is_stale_park_exit(event, event_try, state, ti_try, next_method) is stale


def test_install_wraps_the_scheduler_once():
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    before = SchedulerJobRunner.process_executor_events
    before_adopt = SchedulerJobRunner.adopt_or_reset_orphaned_tasks
    try:
        airflow_guard.install_scheduler_guard()
        wrapped = SchedulerJobRunner.__dict__["process_executor_events"]
        airflow_guard.install_scheduler_guard()  # idempotent
        assert SchedulerJobRunner.__dict__["process_executor_events"] is wrapped
        assert getattr(wrapped.__func__, "_vtm_guarded", False)
        adopt = SchedulerJobRunner.adopt_or_reset_orphaned_tasks
        assert getattr(adopt, "_vtm_guarded", False)
        airflow_guard.install_scheduler_guard()
        assert SchedulerJobRunner.adopt_or_reset_orphaned_tasks is adopt
    finally:
        SchedulerJobRunner.process_executor_events = classmethod(before.__func__)
        SchedulerJobRunner.adopt_or_reset_orphaned_tasks = before_adopt


@pytest.mark.parametrize(("next_method", "responded", "kept"), [
    ("execute_complete", True, True),  # answered (or the timeout's defaults applied): resume it
    ("execute_complete", False, False),  # no answer recorded: Airflow's reset
    (None, True, False),  # not resuming (the first attempt, or the form's own execute)
    ("__fail__", True, False),  # a resume Airflow routed to failure
])
def test_only_the_resume_of_an_answered_form_escapes_the_orphan_reset(next_method, responded, kept):
    assert airflow_guard.resumes_an_answer(next_method, responded) is kept


def test_an_answered_resume_is_scheduled_again_with_its_answer_and_try():
    from types import SimpleNamespace

    answered = SimpleNamespace(id="a", state="queued", next_method="execute_complete", next_kwargs={"event": 1},
                               try_number=1, queued_by_job_id=4, external_executor_id="x")
    waiting = SimpleNamespace(id="b", state="running", next_method="execute_complete", next_kwargs={},
                              try_number=1, queued_by_job_id=4, external_executor_id=None)
    fresh = SimpleNamespace(id="c", state="queued", next_method=None, next_kwargs=None, try_number=1,
                            queued_by_job_id=4, external_executor_id=None)
    assert airflow_guard.keep_answered_resumes([answered, waiting, fresh], {"a"}) == [waiting, fresh]
    assert (answered.state, answered.queued_by_job_id, answered.external_executor_id) == ("scheduled", None, None)
    assert (answered.next_method, answered.next_kwargs, answered.try_number) == ("execute_complete", {"event": 1}, 1)
    assert (waiting.state, fresh.state) == ("running", "queued")  # left for Airflow's reset


def test_answer_guard_wraps_the_hitl_lookup_once_and_only_for_the_answer_endpoint():
    from airflow.api_fastapi.core_api.routes.public import hitl as routes

    before = routes._get_task_instance_with_hitl_detail
    try:
        airflow_guard.install_answer_guard()
        wrapped = routes._get_task_instance_with_hitl_detail
        airflow_guard.install_answer_guard()  # idempotent
        assert routes._get_task_instance_with_hitl_detail is wrapped and wrapped is not before
        # The endpoint it serves is still Airflow's PATCH handler of that name (the guard looks
        # for its caller by name: a rename upstream must fail here, not silently in production).
        assert routes.update_hitl_detail.__name__ == airflow_guard.ANSWER_HANDLER
        assert "_get_task_instance_with_hitl_detail" in routes.update_hitl_detail.__code__.co_names
    finally:
        routes._get_task_instance_with_hitl_detail = before


def test_the_guards_follow_the_subcommand(monkeypatch):
    installed = []
    monkeypatch.setattr(airflow_guard, "install_scheduler_guard", lambda: installed.append("scheduler"))
    monkeypatch.setattr(airflow_guard, "install_answer_guard", lambda: installed.append("api-server"))
    for argv in (["scheduler", "--skip-serve-logs"], ["api-server"], ["dag-processor"], []):
        airflow_guard.install_for(argv)
    assert installed == ["scheduler", "api-server"]


@pytest.mark.parametrize(("deadline", "definitions"), [
    ([{"name": "decision deadline", "reference": {"reference_type": "DagRunQueuedAtDeadline"}}], True),
    (["01a251cb-3b91-70ea-965a-25aa83ed68ec"], False),  # what the scheduler's copy holds: ids
    ([], False),
    (None, False),
])
def test_only_a_deadline_of_alert_definitions_is_replaced(deadline, definitions):
    assert airflow_guard.holds_alert_definitions(deadline) is definitions


@pytest.mark.parametrize(("argv", "guarded"), [
    (["airflow", "dags", "test", "power_lgbm_training"], True),
    (["airflow", "dags", "list"], False),
    (["airflow", "scheduler"], False),
])
def test_the_local_settings_hook_guards_only_airflow_dags_test(argv, guarded):
    """Airflow imports dags/airflow_local_settings.py first in every command; it installs the
    dag-test guard in ``airflow dags test`` only (a real ``airflow dags test`` of every workflow is
    tests/e2e/test_embedded_stack.py)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    dags = Path(__file__).resolve().parents[1] / "dags"
    code = (f"import sys; sys.argv = {argv!r}; import airflow_local_settings; "
            "from airflow.models.dagrun import DagRun; "
            "print(getattr(DagRun.update_state, '_vtm_guarded', False))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(dags)},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == str(guarded)
