"""Point 4 (second bullet) of the reliability suite: a retry never shares its MLflow run or its
checkpoints with an earlier try that is still running.

Real processes and a real MLflow server. The Airflow supervisor is stood in by a plain parent
process (the task process is marked as supervised the way Airflow's task runner marks it: its
``SUPERVISOR_COMMS`` is set); the fault is the one seen on the stack: SIGKILL of the parent while
the task trains.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]

# A task body: open this task's MLflow run through mlflow_utils.task_run, say so, and work.
TASK = textwrap.dedent("""
    import sys, time
    supervised = sys.argv[1] == "supervised"
    if supervised:
        import airflow.sdk.execution_time.task_runner as runner
        runner.SUPERVISOR_COMMS = object()  # as in a task process that a supervisor forked
    from common import mlflow_utils
    from common.mlflow_utils import AirflowIdentity
    who = AirflowIdentity("orphan_dag", sys.argv[2], "train")
    print("STARTED", flush=True)
    with mlflow_utils.task_run("orphans", who, "v1") as run:
        print("OPENED", run.info.run_id, time.time(), flush=True)
        time.sleep(float(sys.argv[3]))
    print("DONE", run.info.run_id, flush=True)
""")

# The supervisor stand-in: start the task as its child, print the child's pid, wait.
SUPERVISOR = textwrap.dedent("""
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[2:]])
    print(child.pid, flush=True)
    child.wait()
""")


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "dags"), str(ROOT)]),
            "PYTHONUNBUFFERED": "1"}


def _read_until(proc: subprocess.Popen, prefix: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith(prefix):
            return line.strip()
        if not line and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before {prefix!r}")
    raise AssertionError(f"no {prefix!r} line after {timeout} s")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped by init) counts as dead.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.reliability(case="4.8 task supervisor SIGKILL", fault="SIGKILL of a training task's supervisor",
                         survives="the orphaned task process dies with it (no second writer to the run)")
def test_task_process_dies_with_its_supervisor(mlflow_server):
    supervisor = subprocess.Popen([sys.executable, "-c", SUPERVISOR, TASK, "supervised", "run-a", "120"],
                                  stdout=subprocess.PIPE, text=True, env=_env(), cwd=ROOT)
    task_pid = int(supervisor.stdout.readline())
    try:
        _read_until(supervisor, "OPENED")
        supervisor.send_signal(signal.SIGKILL)
        supervisor.wait(10)
        deadline = time.monotonic() + 10
        while _alive(task_pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(task_pid), "the task process outlived its supervisor"
    finally:
        if _alive(task_pid):
            os.kill(task_pid, signal.SIGKILL)


@pytest.mark.reliability(case="4.9 retry beside a live orphan", fault="a retry starts while the earlier try still trains",
                         survives="the retry waits for the earlier try to end, then resumes the same MLflow run")
def test_retry_waits_for_a_live_earlier_try(mlflow_server):
    # Not supervised: no death signal, so only the per-task lock stands between the two tries.
    first = subprocess.Popen([sys.executable, "-c", TASK, "cli", "run-b", "120"], stdout=subprocess.PIPE,
                             text=True, env=_env(), cwd=ROOT)
    second = None
    try:
        first_run = _read_until(first, "OPENED").split()[1]
        second = subprocess.Popen([sys.executable, "-c", TASK, "cli", "run-b", "0"], stdout=subprocess.PIPE,
                                  text=True, env=_env(), cwd=ROOT)
        _read_until(second, "STARTED")
        time.sleep(8)  # ample time to open the run, were it not locked
        assert second.poll() is None, "the retry finished while the earlier try still ran"
        import select

        ready, _, _ = select.select([second.stdout], [], [], 0)
        assert not ready, f"the retry went on beside the earlier try: {second.stdout.readline()!r}"
        first.send_signal(signal.SIGKILL)
        killed_at = time.time()
        first.wait(10)
        opened = _read_until(second, "OPENED", timeout=60).split()
        assert opened[1] == first_run, "the retry opened a second MLflow run"
        assert float(opened[2]) >= killed_at
        assert second.wait(60) == 0
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.kill()
