"""``airflow scheduler`` with a guard against a lost approval (Airflow 3.3.2 bug).

Run it as ``python -m common.scheduler_guard scheduler [args]``: every deployment starts its
scheduler this way (tools/stack.sh, tools/cluster.py, docker-compose-mlops.yml).

The bug (apache/airflow#72716, #71580; docs/operations.md "A lost approval" has the reproduction):
an approval task parks in ``awaiting_input`` and its worker process exits; the executor reports
that exit as SUCCESS. When a person answers before the scheduler has read that report, the API
server moves the task to ``scheduled`` (``next_method`` set) and the scheduler re-queues it. The
stale SUCCESS then finds the task ``queued`` (or already ``running`` the resumed attempt), which
Airflow 3.3.2 takes for a task "killed externally": it fails the attempt, the retry opens the
form again, empty, and the answer is gone. Airflow's own check covers only ``scheduled``.

The guard drops such a stale SUCCESS before the scheduler reads it. A SUCCESS that finds its
attempt (same try number) still ``scheduled``/``queued`` with a ``next_method`` is the exit of the
parked or deferred process; one that finds it ``running`` is the same exit read after the resumed
attempt started: a worker that really finished reports its final state before it exits, and a
worker that died without one is caught by Airflow's heartbeat timeout. Everything else passes
through untouched. It is imported only by this entry point, never by a DAG file or a task.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

log = logging.getLogger(__name__)
UPSTREAM_BUG = "apache/airflow#72716"


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


def install() -> None:
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


def main(argv: list[str] | None = None) -> None:
    """``airflow <argv>`` with the guard installed (the scheduler is the part it matters to)."""
    install()
    from airflow.__main__ import main as airflow_main

    sys.argv = ["airflow", *(sys.argv[1:] if argv is None else argv)]
    airflow_main()


if __name__ == "__main__":
    main()
