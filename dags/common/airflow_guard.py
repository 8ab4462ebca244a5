"""Airflow's scheduler and API server with guards against a lost or doubled approval answer
(Airflow 3.3.2 bugs: a stale SUCCESS, an answered resume reset after a scheduler crash, two answers
at once; docs/operations.md "A lost or doubled answer" has the reproductions).

Run a part as ``python -m common.airflow_guard scheduler|api-server [args]``: every deployment
starts these two parts this way (tools/stack.sh, tools/cluster.py, docker-compose-mlops.yml). Any
other subcommand runs as plain ``airflow``. Nothing here is imported by a DAG file or a task.

**Scheduler: a stale SUCCESS (apache/airflow#72716, #71580).** An approval task parks in
``awaiting_input`` and its worker process exits; the executor reports that exit as SUCCESS. When a
person answers before the scheduler has read that report, the API server moves the task to
``scheduled`` (``next_method`` set) and the scheduler re-queues it. The stale SUCCESS then finds the
task ``queued`` (or already ``running`` the resumed attempt), which Airflow 3.3.2 takes for a task
"killed externally": it fails the attempt, the retry opens the form again, empty, and the answer
is gone. Airflow's own check covers only ``scheduled``. The guard drops such a stale SUCCESS before
the scheduler reads it: a SUCCESS that finds its attempt (same try number) still
``scheduled``/``queued`` with a ``next_method`` is the exit of the parked process; one that finds it
``running`` is the same exit read after the resumed attempt started (a worker that really finished
reports its final state before it exits, and one that died without one is caught by Airflow's
heartbeat timeout). Everything else passes through untouched.

**Scheduler: an answered form's resume reset after a scheduler crash.** A scheduler that dies
(crash, OOM, a restart) with an answered form's resumed attempt ``queued`` or ``running`` leaves
it to the next scheduler's orphan check, which resets every task instance of a dead scheduler that
its executor cannot adopt (LocalExecutor adopts none): new try, state ``None`` and
``next_method``/``next_kwargs`` cleared. The task then runs ``execute`` again: the form opens
again, empty, and the accepted answer (carried in ``next_kwargs``) is gone; with no retries left
the run fails. The guard hands such a task instance back to the scheduler instead, as the answer
left it: ``scheduled``, same try, ``next_method``/``next_kwargs`` kept, so the resumed attempt
runs again and applies the answer. Only task instances that resume a form with a recorded answer
(a person's, or the defaults the timeout applied) are kept; everything else is reset as Airflow
does.

**API server: two answers at once.** ``PATCH .../hitlDetails`` locks the task instance and the
form's row, then checks "already answered" on the row it had read *before* taking the lock (the
ORM keeps the loaded object). Two answers sent together are therefore both accepted: the first
resumes the task, the second overwrites the recorded answer (reason and chooser) without being
applied. For that endpoint the guard takes the same locks first and reads the form's row again
under them, so the second answer sees the first and gets Airflow's own 409.

**``airflow dags test``: the deadline lookup.** ``dag.test()`` runs its DAG as
``deserialize(serialize(dag))`` made in memory, whose ``deadline`` holds the encoded
``DeadlineAlert`` definitions; the scheduler's copy, read from the database, holds the ids of the
stored alerts instead, and ``DagRun.update_state`` looks each entry up by id when the run succeeds.
Any DAG with a ``DeadlineAlert`` therefore ends a successful ``airflow dags test`` with
``StatementError ... 'dict' object has no attribute 'hex'`` (SQLite) or ``can't adapt type 'dict'``
(PostgreSQL), exit 1. The guard gives such a run's DAG the ids of the alerts stored for the run's
DAG version (which ``dags test`` has just written), so the lookup, and the pruning of the run's
unneeded deadlines that follows it, work as under the scheduler. ``dags/airflow_local_settings.py``
installs it in every ``airflow dags test``.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from typing import Any

log = logging.getLogger(__name__)
UPSTREAM_BUG = "apache/airflow#72716"


# --- scheduler ----------------------------------------------------------------------------------


def is_stale_park_exit(event_state: str, event_try: int, ti_state: str | None, ti_try: int,
                       next_method: str | None) -> bool:
    """True for the executor's SUCCESS from the process that parked an attempt which has since
    been resumed (the rule in the module docstring)."""
    if event_state != "success" or ti_try != event_try:
        return False
    if ti_state in ("scheduled", "queued"):
        return next_method is not None
    return ti_state == "running"


def drop_stale_park_exits(executor: Any, session: Any) -> list[Any]:
    """Remove the stale SUCCESS events from ``executor.event_buffer``; the keys removed."""
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.models.taskinstancekey import TaskInstanceKey
    from sqlalchemy import select

    dropped = []
    for key, (state, _info) in list(executor.event_buffer.items()):
        if not isinstance(key, TaskInstanceKey) or str(state) != "success":
            continue
        ti = session.scalar(select(TI).where(TI.dag_id == key.dag_id, TI.task_id == key.task_id,
                                             TI.run_id == key.run_id, TI.map_index == key.map_index))
        if ti is None:
            continue
        ti_state = ti.state.value if hasattr(ti.state, "value") else ti.state
        if is_stale_park_exit("success", key.try_number, ti_state, ti.try_number, ti.next_method):
            executor.event_buffer.pop(key)
            dropped.append(key)
            log.warning("Ignoring the executor's SUCCESS for %s: it is the exit of the process that "
                        "parked this attempt, which has been resumed since (task now %s; %s)",
                        key, ti_state, UPSTREAM_BUG)
    return dropped


def install_scheduler_guard() -> None:
    """Wrap ``SchedulerJobRunner.process_executor_events`` (idempotent)."""
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    original = SchedulerJobRunner.process_executor_events.__func__
    if getattr(original, "_vtm_guarded", False):
        return

    def process_executor_events(cls, executor, job_id, scheduler_dag_bag, session):
        drop_stale_park_exits(executor, session)
        return original(cls, executor=executor, job_id=job_id, scheduler_dag_bag=scheduler_dag_bag,
                        session=session)

    process_executor_events._vtm_guarded = True
    SchedulerJobRunner.process_executor_events = classmethod(process_executor_events)
    install_orphan_guard()


def resumes_an_answer(next_method: str | None, responded: bool) -> bool:
    """True for a task instance on its way back into a form's ``execute_complete`` with the
    recorded answer (``responded``: the form's row has ``responded_at``)."""
    return next_method is not None and next_method != "__fail__" and responded


def answered_forms(tis: Sequence[Any]) -> set[Any]:
    """The ids of those ``tis`` on their way back into ``execute_complete`` (``next_method`` set)
    whose form has a recorded answer (read in the task instances' own session)."""
    from airflow.models.hitl import HITLDetail
    from sqlalchemy import select
    from sqlalchemy.orm import object_session

    pending = [ti for ti in tis if ti.next_method is not None]
    session = object_session(pending[0]) if pending else None
    if session is None:
        return set()
    return set(session.scalars(select(HITLDetail.ti_id).where(
        HITLDetail.ti_id.in_([ti.id for ti in pending]), HITLDetail.responded_at.is_not(None))))


def keep_answered_resumes(tis: Sequence[Any], answered: set[Any]) -> list[Any]:
    """Of ``tis`` (what an executor could not adopt, about to be reset), put those that resume an
    answered form (their id in ``answered``) back to ``scheduled`` with their
    ``next_method``/``next_kwargs`` and try; the rest, for Airflow to reset."""
    from airflow.utils.state import TaskInstanceState

    reset = []
    for ti in tis:
        if not resumes_an_answer(ti.next_method, ti.id in answered):
            reset.append(ti)
            continue
        log.warning("Not resetting %s (%s, queued by a scheduler that is gone): it resumes an answered "
                    "form; scheduled again with its answer, same try", ti, ti.state)
        ti.state = TaskInstanceState.SCHEDULED
        ti.queued_by_job_id = None
        ti.external_executor_id = None
    return reset


def guard_adoption(executor: Any) -> None:
    """Wrap this executor's ``try_adopt_task_instances`` (idempotent): what it gives back to be
    reset goes through :func:`keep_answered_resumes` first."""
    original = executor.try_adopt_task_instances
    if getattr(original, "_vtm_guarded", False):
        return

    def try_adopt_task_instances(tis):
        unadopted = list(original(tis))
        return keep_answered_resumes(unadopted, answered_forms(unadopted))

    try_adopt_task_instances._vtm_guarded = True
    executor.try_adopt_task_instances = try_adopt_task_instances


def install_orphan_guard() -> None:
    """Wrap ``SchedulerJobRunner.adopt_or_reset_orphaned_tasks`` (idempotent): the scheduler's
    executors get :func:`guard_adoption` before Airflow asks them to adopt."""
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner

    original = SchedulerJobRunner.adopt_or_reset_orphaned_tasks
    if getattr(original, "_vtm_guarded", False):
        return

    def adopt_or_reset_orphaned_tasks(self, **kwargs):
        for executor in self.executors:
            guard_adoption(executor)
        return original(self, **kwargs)

    adopt_or_reset_orphaned_tasks._vtm_guarded = True
    SchedulerJobRunner.adopt_or_reset_orphaned_tasks = adopt_or_reset_orphaned_tasks


# --- API server ---------------------------------------------------------------------------------

ANSWER_HANDLER = "update_hitl_detail"  # the PATCH endpoint's function in Airflow's HITL routes


def install_answer_guard() -> None:
    """Wrap the HITL routes' task-instance lookup (idempotent): called by the answer endpoint, it
    locks the task instance, then the form's row, and reloads both (GETs are left alone)."""
    from airflow.api_fastapi.core_api.routes.public import hitl as routes
    from airflow.models.hitl import HITLDetail
    from airflow.models.taskinstance import TaskInstance as TI

    original = routes._get_task_instance_with_hitl_detail
    if getattr(original, "_vtm_guarded", False):
        return

    def get_task_instance_with_hitl_detail(*args, **kwargs):
        ti = original(*args, **kwargs)
        session = kwargs.get("session")
        if (isinstance(ti, TI) and ti.hitl_detail is not None and session is not None
                and sys._getframe(1).f_code.co_name == ANSWER_HANDLER):
            # Airflow's lock order: the task instance, then the form's row, which is read again
            # under the lock (refresh: the task instance's own loaded attributes stay as they are).
            session.get(TI, ti.id, with_for_update={"of": TI})
            session.refresh(ti.hitl_detail, with_for_update={"of": HITLDetail})
        return ti

    get_task_instance_with_hitl_detail._vtm_guarded = True
    routes._get_task_instance_with_hitl_detail = get_task_instance_with_hitl_detail


# --- airflow dags test ---------------------------------------------------------------------------


def holds_alert_definitions(deadline: Any) -> bool:
    """True when a DAG's ``deadline`` holds alert definitions (dicts) where ids belong."""
    return bool(deadline) and any(isinstance(alert, dict) for alert in deadline)


def stored_alert_ids(dag_run: Any, session: Any) -> list[str]:
    """The ids of the deadline alerts stored for ``dag_run``'s DAG version."""
    from airflow.models.deadline_alert import DeadlineAlert
    from airflow.models.serialized_dag import SerializedDagModel
    from sqlalchemy import select

    query = (select(DeadlineAlert.id)
             .join(SerializedDagModel, DeadlineAlert.serialized_dag_id == SerializedDagModel.id)
             .where(SerializedDagModel.dag_version_id == dag_run.created_dag_version_id))
    return [str(alert_id) for alert_id in session.scalars(query)]


def install_dag_test_guard() -> None:
    """Wrap ``DagRun.update_state`` (idempotent): a run whose DAG holds alert definitions gets the
    stored alerts' ids first (only ``dag.test()`` makes such a DAG)."""
    from airflow.models.dagrun import DagRun

    original = DagRun.update_state
    if getattr(original, "_vtm_guarded", False):
        return

    def update_state(self, *, session=None, execute_callbacks=True):
        dag = getattr(self, "dag", None)
        if dag is not None and holds_alert_definitions(dag.deadline) and session is not None:
            dag.deadline = stored_alert_ids(self, session)
        kwargs = {"execute_callbacks": execute_callbacks}
        if session is not None:
            kwargs["session"] = session
        return original(self, **kwargs)

    update_state._vtm_guarded = True
    DagRun.update_state = update_state


# --- entry point --------------------------------------------------------------------------------


def install_for(argv: list[str]) -> None:
    """The guards of the Airflow subcommand ``argv`` starts."""
    if "scheduler" in argv[:1]:
        install_scheduler_guard()
    if "api-server" in argv[:1]:
        install_answer_guard()
    if argv[:2] == ["dags", "test"]:
        install_dag_test_guard()


def main(argv: list[str] | None = None) -> None:
    """``airflow <argv>`` with its part's guard installed."""
    args = sys.argv[1:] if argv is None else argv
    install_for(args)
    from airflow.__main__ import main as airflow_main

    sys.argv = ["airflow", *args]
    airflow_main()


if __name__ == "__main__":
    main()
elif __name__ == "__mp_main__":
    # An API server with several workers spawns them: each re-imports this module under this
    # name (with the parent's argv) before it builds its app, and gets the guard here.
    install_for(sys.argv[1:])
