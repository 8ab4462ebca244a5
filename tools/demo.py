"""``make demo``: unpause and trigger every workflow on the running stack, wait, print a table.

Expects ``tools/stack.sh up`` to have run (it is what ``make demo`` does first) and the stack's
environment (``eval "$(tools/stack.sh env)"``). Every workflow of ``dags/common/config.py`` that
has a DAG file is triggered with its conf in ``DEMO`` below.

No secret is printed: the end says where the Airflow and MLflow passwords are kept.

Runs that are still active when the demo's own runs are done get a row of their own saying why
they wait and until when. Unpausing ``tick_model_training`` makes the scheduler create its latest
scheduled run (catchup is off), for the last weekday's New York close; no importer feeds the demo
lake, so that run's ``wait_for_trades`` sensor waits (reschedule mode: no worker slot held) up to
the workflow's ``data_wait`` (6 h) and then fails. It is left waiting on purpose rather than
cancelled: it is exactly what the schedule does in production while the importer is late, and it
blocks nothing the demo or the README needs: backfills (how the demo runs the tick workflow) and
``airflow dags test`` do not queue behind it, only another triggered tick run would (max_active_runs
1). Marking it failed instead would fake an outcome; pausing the DAG would also stop the backfill.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "dags"), str(ROOT)]

from common import config  # noqa: E402
from scripts.core import paths  # noqa: E402
from tools.airflow_api import AirflowApiError, AirflowClient  # noqa: E402
from tools.backfill import create_backfill  # noqa: E402


@dataclass(frozen=True)
class DemoSpec:
    """What the demo triggers a workflow with, and which metric its table row shows beside which
    baseline (demo-only: the workflows' own settings live in dags/common/config.py)."""

    headline_metric: str
    baseline_metric: str
    conf: dict[str, object] = field(default_factory=dict)


# Every demo run promotes unattended (run parameter auto_promote): nobody is at the Airflow UI to
# approve, and the table says so. Without it a passing challenger waits for a person's approval.
UNATTENDED = {"auto_promote": True}
DEMO: dict[str, DemoSpec] = {
    "power_lgbm_training": DemoSpec("mae", "baseline_mae", dict(UNATTENDED)),
    "tick_model_training": DemoSpec("rmse_log_rv", "har_rmse_log_rv", dict(UNATTENDED)),
    "mnist_cnn_training": DemoSpec("test_accuracy", "baseline_accuracy", {"profile": "smoke", **UNATTENDED}),
    "cifar10_cnn_training": DemoSpec("test_accuracy", "baseline_accuracy", {"profile": "smoke", **UNATTENDED}),
}
DEMO_REJECT_REASON = "make demo: a run the demo did not start is not reviewed here (answer in the UI instead)"


def password_file(airflow_home: Path) -> Path:
    """Where the simple auth manager keeps the generated admin password (tools/stack.sh writes it
    before the API server starts, so Airflow never prints it)."""
    configured = os.environ.get("AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE")
    return Path(configured) if configured else airflow_home / "simple_auth_manager_passwords.json.generated"


def admin_password(airflow_home: Path) -> str:
    return json.loads(password_file(airflow_home).read_text())["admin"]


def present_workflows() -> list[config.WorkflowConfig]:
    return [cfg for cfg in config.WORKFLOWS.values() if (ROOT / "dags" / f"{cfg.dag_id}.py").is_file()]


SEEDED_TICK_DAYS: list = []  # the trade days prepare_inputs put in the lake


def prepare_inputs(workflows: list[config.WorkflowConfig], tick_days: int = 4) -> dict[str, dict]:
    """What each workflow needs before its trigger, and the conf to trigger it with.

    The tick DAG waits for trade partitions it never writes: as the upstream importer would, fill
    the lake from DATA_MIRROR/ticks (real trades) or with ``tick_days`` simulated days (the
    first only builds features; each later one trains on the days before it), and run them.
    """
    confs = {cfg.dag_id: dict(DEMO[cfg.dag_id].conf) for cfg in workflows}
    if "tick_model_training" in confs:
        from scripts.tick import importer as tick_import

        days = tick_import.seed(paths.tick_lake(), paths.data_mirror(), simulate_days=tick_days)
        SEEDED_TICK_DAYS[:] = days
        print(f"tick lake {paths.tick_lake()}: trade days {[d.isoformat() for d in days]}", flush=True)
        confs["tick_model_training"]["trade_date"] = days[-1].isoformat()
    return confs


def backfill_lake_days(client: AirflowClient, dag_id: str) -> str:
    """Backfill the tick DAG over the trade days just seeded; returns the last day's run id.

    A backfill rather than a trigger: its runs have their own max_active_runs, so they do not queue
    behind the latest scheduled run that unpausing creates, whose sensor waits (for hours, holding
    no slot) for a trading day the demo lake does not have. It also shows every day processed in
    order: the first day builds features only, each later one trains on the days before it.
    """
    from datetime import timedelta

    days = SEEDED_TICK_DAYS
    # The CLI, as an operator would run it (the REST endpoint refuses backfills on SQLite), one day
    # at a time in date order: each day's champion is the previous day's.
    create_backfill(dag_id, days[0].isoformat(), (days[-1] + timedelta(days=1)).isoformat(),
                    ["--reprocess-behavior", "completed",
                     "--dag-run-conf", json.dumps(DEMO[dag_id].conf)])  # auto_promote, as the table says
    runs = client.request("GET", f"/dags/{dag_id}/dagRuns?run_type=backfill&limit=1000")["dag_runs"]
    mine = [r for r in runs if r.get("logical_date", "")[:10] <= days[-1].isoformat()
            and r.get("logical_date", "")[:10] >= days[0].isoformat()]
    if not mine:
        raise RuntimeError(f"the backfill of {dag_id} created no run for {days}")
    return max(mine, key=lambda r: r["logical_date"])["dag_run_id"]


def seconds(record: dict) -> float:
    start, end = record.get("start_date"), record.get("end_date")
    if not start or not end:
        return float("nan")
    return (datetime.fromisoformat(end) - datetime.fromisoformat(start)).total_seconds()


def describe(client: AirflowClient, cfg: config.WorkflowConfig, record: dict) -> dict[str, str]:
    """One table row: the run's outcome and what it left in MLflow."""
    from mlflow.tracking import MlflowClient

    from common import mlflow_utils

    row = {"dag_id": cfg.dag_id, "state": record["state"], "duration": f"{seconds(record):.0f} s",
           "metric": "-", "model": "-", "alias": "-", "champion": "-", "mlflow_run": "-"}
    trained = client.xcom(cfg.dag_id, record["dag_run_id"], "train")
    decision = client.xcom(cfg.dag_id, record["dag_run_id"], "register")
    if isinstance(trained, dict) and trained.get("run_id"):
        mlflow = MlflowClient(mlflow_utils.tracking_uri())
        metrics = mlflow.get_run(trained["run_id"]).data.metrics
        spec = DEMO[cfg.dag_id]
        if spec.headline_metric in metrics:
            row["metric"] = f"{spec.headline_metric}={metrics[spec.headline_metric]:.4f}"
            if spec.baseline_metric in metrics:
                row["metric"] += f" vs {spec.baseline_metric}={metrics[spec.baseline_metric]:.4f}"
        row["mlflow_run"] = mlflow_utils.run_url(trained["run_id"])
    if isinstance(decision, dict):
        row["model"] = f"{decision['model_name']} v{decision['version']}"
        mv = MlflowClient(mlflow_utils.tracking_uri()).get_model_version(
            decision["model_name"], decision["version"])
        row["alias"] = ",".join(mv.aliases) or "-"  # a decided version keeps only `champion`, if that
        if decision["decision"] != "promoted":
            row["alias"] += f" ({decision['decision']}: {decision['reason']})"
        row["champion"] = f"v{decision['champion_after']}" if decision["champion_after"] else "none"
    return row


def still_active(client: AirflowClient, workflows: list[config.WorkflowConfig],
                 demo_runs: dict[str, str]) -> list[dict[str, str]]:
    """A row for every other run still queued or running: which task waits, for what, until when."""
    rows = []
    for cfg in workflows:
        for state in ("running", "queued"):
            records = client.request("GET", f"/dags/{cfg.dag_id}/dagRuns?state={state}")["dag_runs"]
            for record in records:
                if record["dag_run_id"] == demo_runs.get(cfg.dag_id):
                    continue
                rows.append({"dag_id": cfg.dag_id, "state": f"{state} ({record['run_type']})",
                             "duration": "-", "metric": "-", "model": "-", "alias": "-",
                             "champion": "-", "mlflow_run": "-",
                             "note": why_waiting(client, cfg, record)})
    return rows


def wait_answering_other_approvals(client: AirflowClient, workflows: list[config.WorkflowConfig],
                                   demo_runs: dict[str, str], timeout: float) -> dict[str, dict]:
    """Wait for the demo's runs. A run the demo did not start (the scheduled one unpausing
    creates, which has no auto_promote) would wait at its approval step for a day and hold the
    DAG's one active run: the demo rejects it (champion unchanged), says so, and goes on."""

    deadline = time.monotonic() + timeout
    final: dict[str, dict] = {}
    answered: set[tuple[str, str]] = set()
    while len(final) < len(demo_runs):
        for cfg in workflows:
            dag_id = cfg.dag_id
            if dag_id in demo_runs and dag_id not in final:
                record = client.dag_run(dag_id, demo_runs[dag_id])
                if record["state"] in ("success", "failed"):
                    final[dag_id] = record
            for record in client.request("GET", f"/dags/{dag_id}/dagRuns?state=running")["dag_runs"]:
                if record["dag_run_id"] == demo_runs.get(dag_id) or (dag_id, record["dag_run_id"]) in answered:
                    continue
                waiting = [t for t in client.task_instances(dag_id, record["dag_run_id"])
                           if t["task_id"] == "approve" and t["state"] == "awaiting_input"]
                if waiting:
                    path = (f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(record['dag_run_id'])}"
                            "/taskInstances/approve/-1/hitlDetails")
                    answered.add((dag_id, record["dag_run_id"]))
                    try:
                        client.request("PATCH", path, {"chosen_options": ["Reject"],
                                                       "params_input": {"reason": DEMO_REJECT_REASON}})
                    except AirflowApiError as exc:  # answered meanwhile, in the UI
                        print(f"{dag_id} {record['dag_run_id']}: approval not answered by the demo: {exc}")
                        continue
                    print(f"rejected the approval waiting in {dag_id} {record['dag_run_id']}: "
                          f"{DEMO_REJECT_REASON}", flush=True)
        if len(final) < len(demo_runs):
            if time.monotonic() > deadline:
                raise RuntimeError(f"runs still not finished after {timeout:.0f}s: {sorted(set(demo_runs) - set(final))}")
            time.sleep(5)
    return final


def why_waiting(client: AirflowClient, cfg: config.WorkflowConfig, record: dict) -> str:
    tasks = client.task_instances(cfg.dag_id, record["dag_run_id"])
    waiting = [t for t in tasks if t["state"] in ("up_for_reschedule", "deferred", "running", "awaiting_input")]
    if any(t["task_id"] == "approve" and t["state"] == "awaiting_input" for t in waiting):
        return "approve waits for a person: Airflow UI -> Browse -> Required Actions (Approve/Reject)"
    if cfg.dag_id == "tick_model_training" and any(t["task_id"] == "wait_for_trades" for t in waiting):
        when = record.get("logical_date") or record.get("run_after") or ""
        day = (record.get("conf") or {}).get("trade_date") or when[:10]
        started = record.get("start_date")
        until = ""
        if started:
            deadline = datetime.fromisoformat(started) + cfg.data_wait
            until = f" until about {deadline:%Y-%m-%d %H:%M} UTC"
        hours = cfg.data_wait.total_seconds() / 3600
        return (f"wait_for_trades waits for the trades of {day}, which no importer writes into the "
                f"demo lake; it gives up{until} (data_wait {hours:g} h) and the run fails. "
                "Backfills and `airflow dags test` do not queue behind it")
    if waiting:
        return ", ".join(f"{t['task_id']} {t['state']}" for t in waiting)
    return "queued behind another run of this DAG (max_active_runs)" if record["state"] == "queued" else "-"


def print_table(rows: list[dict[str, str]]) -> None:
    headers = list(rows[0])
    widths = {h: max(len(h), *(len(r[h]) for r in rows)) for h in headers}
    print("  ".join(h.ljust(widths[h]) for h in headers))
    print("  ".join("-" * widths[h] for h in headers))
    for r in rows:
        print("  ".join(r[h].ljust(widths[h]) for h in headers))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--timeout", type=float, default=3600, help="seconds to wait for the runs")
    parser.add_argument("--tick-days", type=int, default=4,
                        help="simulated trading days for the tick workflow when DATA_MIRROR has no trades "
                             "(at least 2: the last trains on the days before it)")
    args = parser.parse_args(argv)
    os.umask(0o077)  # it writes under VTM_HOME (the tick lake): private, like everything the stack writes
    airflow_home = Path(os.environ["AIRFLOW_HOME"])
    base_url = os.environ.get("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8080")
    client = AirflowClient(base_url, "admin", admin_password(airflow_home))
    workflows = present_workflows()
    client.wait_for_dags([cfg.dag_id for cfg in workflows])
    if args.tick_days < 2:
        parser.error("--tick-days must be at least 2 (the last day trains on the days before it)")
    confs = prepare_inputs(workflows, args.tick_days)
    runs = {}
    for cfg in workflows:
        # Unpausing also lets the scheduler create the latest scheduled run (catchup is off); it
        # runs after or before this one (max_active_runs) and goes through the same gate.
        if cfg.dag_id == "tick_model_training":
            runs[cfg.dag_id] = backfill_lake_days(client, cfg.dag_id)
        else:
            runs[cfg.dag_id] = client.trigger(cfg.dag_id, confs[cfg.dag_id])
        client.unpause(cfg.dag_id)
        print(f"triggered {cfg.dag_id}: {runs[cfg.dag_id]}", flush=True)
    print(f"waiting for {len(runs)} run(s) (up to {args.timeout:.0f} s) ...", flush=True)
    final = wait_answering_other_approvals(client, workflows, runs, args.timeout)
    rows = [{**describe(client, cfg, final[cfg.dag_id]),
             "note": "auto_promote=true (demo conf): no approval step"
             if (confs.get(cfg.dag_id) or {}).get("auto_promote") else "-"} for cfg in workflows]
    rows += still_active(client, workflows, runs)
    print()
    print_table(rows)
    vtm_home = Path(os.environ.get("VTM_HOME", ROOT / ".local"))
    print(f"""
Airflow UI  {base_url}   user: admin   password: in {password_file(airflow_home)}
MLflow UI   {os.environ.get('MLFLOW_TRACKING_URI', 'http://127.0.0.1:5000')}   user: admin   password: in {vtm_home / 'secrets' / 'mlflow_admin_password'}
            (both generated on the first start, readable by you only)
Both keep running; stop them with: make down""")
    return 0 if all(r["state"] == "success" for r in final.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
