"""The distributed deployment's routing, for real: a Celery cluster on 127.0.0.1.

tools/cluster.py starts PostgreSQL and Redis (pinned wheels in the venv), MLflow, the Airflow API server,
scheduler and dag-processor, and one Celery worker per worker service of docker-compose-mlops.yml
(the same queues: ``default,batch_queue,realtime_queue`` and ``gpu_queue`` alone), each under its
own hostname. Every workflow that has a DAG file is triggered through the REST API with its demo
conf (smoke profile for the CNNs); then the metadata database must show every task succeeded on
the worker its queue names (the CNNs' train tasks on the GPU worker and nothing else there), that
Celery itself delivered each task to that worker, and that ``gpu_pool`` never ran two tasks at
once. Everything the cluster started is stopped at the end.
"""

from __future__ import annotations

import ipaddress
import os
import time
from datetime import datetime
from pathlib import Path

import pytest

from tests.image_synth import write_cifar_mirror, write_mnist_mirror
from tests.uci_synth import write_uci_file
from tools import demo
from tools.airflow_api import AirflowClient
from tools.cluster import Cluster, compose_workers

pytestmark = pytest.mark.e2e

# tools/demo.prepare_inputs (when present) prepares each workflow's input (the tick lake) and
# returns the conf to trigger each DAG with; otherwise a workflow's conf in demo.DEMO is all it needs.
PREPARE_INPUTS = getattr(demo, "prepare_inputs", None)
RUNS_TIMEOUT = 1500  # seconds for every run to finish on 2 cores


def write_mirror(mirror: Path) -> Path:
    """Small official-format files for the workflows that read DATA_MIRROR."""
    write_uci_file(mirror / "household_power" / "household_power_consumption.zip", days=200, seed=9)
    write_mnist_mirror(mirror)
    write_cifar_mirror(mirror)
    return mirror


def wait_for_runs(cluster: Cluster, client: AirflowClient, runs: dict[str, str]) -> dict[str, dict]:
    """Like AirflowClient.wait_for_runs, but fails at once, with the logs, if a part dies."""
    deadline = time.monotonic() + RUNS_TIMEOUT
    final: dict[str, dict] = {}
    while len(final) < len(runs):
        cluster.check_alive()
        for dag_id, run_id in runs.items():
            if dag_id not in final:
                record = client.dag_run(dag_id, run_id)
                if record["state"] in ("success", "failed"):
                    final[dag_id] = record
        if len(final) < len(runs):
            if time.monotonic() > deadline:
                pending = sorted(set(runs) - set(final))
                raise AssertionError(f"runs not finished after {RUNS_TIMEOUT} s: {pending}\n{cluster.log_tails()}")
            time.sleep(5)
    return final


def task_instances(cluster: Cluster) -> list[dict]:
    import psycopg2
    import psycopg2.extras

    conn = psycopg2.connect(cluster.db_url("airflow", "postgresql"))
    try:
        cur = conn.cursor(cursor_factory=psycopg2.extras.RealDictCursor)
        cur.execute("""SELECT dag_id, task_id, run_id, state, hostname, queue, pool, try_number,
                              start_date, end_date, external_executor_id
                       FROM task_instance ORDER BY start_date""")
        return [dict(row) for row in cur.fetchall()]
    finally:
        conn.close()


def listening_beyond_loopback(cluster: Cluster) -> list[str]:
    """Listening sockets of any process the cluster started that are not on 127.0.0.1/::1."""
    import psutil

    ours = set()
    for proc in cluster.procs:
        try:
            ours.add(proc.popen.pid)
            ours.update(c.pid for c in psutil.Process(proc.popen.pid).children(recursive=True))
        except psutil.NoSuchProcess:
            pass
    return [f"pid {c.pid} listens on {c.laddr.ip}:{c.laddr.port}"
            for c in psutil.net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.pid in ours
            and not ipaddress.ip_address(c.laddr.ip).is_loopback]


def overlaps(intervals: list[tuple[datetime, datetime]]) -> list[tuple]:
    ordered = sorted(intervals)
    return [(a, b) for a, b in zip(ordered, ordered[1:], strict=False) if b[0] < a[1]]


@pytest.mark.timeout(RUNS_TIMEOUT + 900)
def test_celery_cluster_routes_every_task_to_the_worker_its_queue_names(tmp_path, monkeypatch):
    workflows = demo.present_workflows()
    workers = compose_workers()
    gpu_workers = [w for w in workers if w.gpu]
    assert len(gpu_workers) == 1 and len(workers) == 2, workers
    consumer = {}  # queue -> the one worker service consuming it
    for spec in workers:
        for queue in spec.queues:
            assert queue not in consumer, f"{queue} consumed by {consumer.get(queue)} and {spec.service}"
            consumer[queue] = spec.service
    gpu = gpu_workers[0].service

    home = tmp_path / "home"
    env = {"VTM_HOME": str(home), "TICK_LAKE": str(home / "lake"),
           "DATA_MIRROR": str(write_mirror(tmp_path / "mirror"))}
    cluster = Cluster(tmp_path / "cluster", env=env, workers=workers)
    env["MLFLOW_TRACKING_URI"] = cluster.mlflow_url
    for key, value in env.items():  # prepare_inputs reads the same settings as the tasks
        monkeypatch.setenv(key, value)
    if PREPARE_INPUTS is not None:
        confs = PREPARE_INPUTS(workflows)
    else:
        confs = {cfg.dag_id: dict(demo.DEMO[cfg.dag_id].conf) for cfg in workflows}

    started = time.monotonic()
    try:
        cluster.start()
        startup = time.monotonic() - started
        client = AirflowClient(cluster.api_url, "admin", cluster.admin_password)
        client.wait_for_dags([cfg.dag_id for cfg in workflows])
        runs = {}
        for cfg in workflows:
            client.unpause(cfg.dag_id)
            runs[cfg.dag_id] = client.trigger(cfg.dag_id, confs[cfg.dag_id])
        final = wait_for_runs(cluster, client, runs)
        elapsed = time.monotonic() - started
        tis = task_instances(cluster)
        exposed = listening_beyond_loopback(cluster)
        defined = {cfg.dag_id: {t["task_id"]: t for t in client.request("GET", f"/dags/{cfg.dag_id}/tasks")["tasks"]}
                   for cfg in workflows}
    finally:
        cluster.stop()

    # The demo's confs promote unattended (auto_promote): each run's approval steps are skipped,
    # never sent to a worker. Every other task ran.
    skipped = {(t["dag_id"], t["task_id"]) for t in tis if t["state"] == "skipped"}
    assert {task for _, task in skipped} <= {"approve", "promote"}, skipped
    tis = [t for t in tis if t["state"] != "skipped"]
    print("\n" + "\n".join(
        f"{t['dag_id']:22} {t['task_id']:16} queue={t['queue']:15} pool={t['pool']:17} on {t['hostname']:19} "
        f"{(t['end_date'] - t['start_date']).total_seconds():6.1f} s" for t in tis))
    failed = [f"{t['dag_id']}.{t['task_id']}: {t['state']} on {t['hostname']}" for t in tis if t["state"] != "success"]
    assert all(r["state"] == "success" for r in final.values()) and not failed, (
        f"runs: { {d: r['state'] for d, r in final.items()} }; tasks not successful: {failed}\n"
        + cluster.log_tails())
    assert not exposed, exposed

    # Only the triggered runs exist (no cron runs: use_job_schedule is off), each complete.
    assert {(t["dag_id"], t["run_id"]) for t in tis} == set(runs.items())
    for dag_id, tasks in defined.items():
        ran = {t["task_id"] for t in tis if t["dag_id"] == dag_id}
        assert ran | {task for d, task in skipped if d == dag_id} == set(tasks), dag_id

    # Each task ran on the worker that consumes its queue, as the DAG defines it.
    for t in tis:
        where = f"{t['dag_id']}.{t['task_id']}"
        assert t["queue"] == defined[t["dag_id"]][t["task_id"]]["queue"], where
        assert t["queue"] in consumer, f"{where}: no worker consumes {t['queue']}"
        assert t["hostname"] == consumer[t["queue"]], (
            f"{where} (queue {t['queue']}) ran on {t['hostname']}, not {consumer[t['queue']]}")

    # The GPU worker ran the CNNs' train tasks and nothing else.
    on_gpu = {(t["dag_id"], t["task_id"]) for t in tis if t["hostname"] == gpu}
    expected_gpu = {(cfg.dag_id, "train") for cfg in workflows if cfg.pool == "gpu_pool"}
    assert expected_gpu and on_gpu == expected_gpu
    assert {(t["dag_id"], t["task_id"]) for t in tis if t["hostname"] != gpu} and all(
        t["hostname"] in consumer.values() for t in tis)

    # Celery itself delivered each task to that worker: its task id is in that worker's log only.
    worker_logs = {spec.service: (cluster.logs / f"{spec.service}.log").read_text(errors="replace")
                   for spec in workers}
    for t in tis:
        assert t["external_executor_id"], t
        received_by = {name for name, text in worker_logs.items() if t["external_executor_id"] in text}
        assert received_by == {t["hostname"]}, (t["dag_id"], t["task_id"], received_by)

    # One GPU: gpu_pool tasks never overlapped in time.
    gpu_pool = [(t["start_date"], t["end_date"]) for t in tis if t["pool"] == "gpu_pool"]
    assert len(gpu_pool) == len(expected_gpu) >= 2
    assert not overlaps(gpu_pool), overlaps(gpu_pool)

    # Everything the cluster started has stopped.
    for proc in cluster.procs:
        assert proc.popen.poll() is not None, proc.name
        with pytest.raises(ProcessLookupError):
            os.killpg(proc.popen.pid, 0)  # no process left in its group
    print(f"\ncluster up in {startup:.0f} s; {len(runs)} runs, {len(tis)} tasks done in {elapsed:.0f} s")
