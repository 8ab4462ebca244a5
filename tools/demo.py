"""``make demo``: unpause and trigger every workflow on the running stack, wait, print a table.

Expects ``tools/stack.sh up`` to have run (it is what ``make demo`` does first) and the stack's
environment (``eval "$(tools/stack.sh env)"``). Every workflow of ``dags/common/config.py`` that
has a DAG file gets a run with its conf in ``DEMO`` below.

The demo never waits on an approval and never answers one: its runs promote unattended (the
``auto_promote`` conf, and the table says so), and no run it did not start can hold them up.
A DAG runs one run at a time (``max_active_runs``), so:

* The scheduled workflows (power, tick) get their demo runs as **backfills**, which Airflow runs
  beside the DAG's other runs (a backfill has its own ``max_active_runs``): a nightly run waiting
  for a person, or a run someone triggered, does not hold them up.
* Unpausing a DAG makes the scheduler create the run of its latest past tick (catchup is off),
  without the demo's conf: it would wait for a person's approval (power) or for trades no importer
  brings (tick) and hold the DAG's one active run for hours. So the first demo run of a DAG is
  placed on exactly that tick, before unpausing: the scheduler finds a run there and goes on to
  the next tick. Later demo runs take the latest past tick without a run.
* The manual workflows (the CNNs) have no scheduled runs. If one of them has an active run the
  demo did not start (say a run of yours waiting for approval), the demo does not trigger it,
  which would queue behind that run: its row says "not run" and why.

No secret is printed: the end says where the Airflow and MLflow passwords are kept.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "dags"), str(ROOT)]

from common import config  # noqa: E402
from scripts.core import paths  # noqa: E402
from tools.airflow_api import AirflowClient  # noqa: E402


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
    # A quick model (40 boosting rounds instead of up to 2000; skill 0.16 on the real UCI file, 0.25
    # with the defaults): it passes the gate, and a run with the defaults beats it,
    # so the README's "trigger with the defaults, approve it in the UI" finds an approval waiting.
    "power_lgbm_training": DemoSpec("mae", "baseline_mae", {"num_boost_round": 40, **UNATTENDED}),
    "tick_model_training": DemoSpec("rmse_log_rv", "har_rmse_log_rv", dict(UNATTENDED)),
    "mnist_cnn_training": DemoSpec("test_accuracy", "baseline_accuracy", {"profile": "smoke", **UNATTENDED}),
    "cifar10_cnn_training": DemoSpec("test_accuracy", "baseline_accuracy", {"profile": "smoke", **UNATTENDED}),
}


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
        # A triggered run (tests/e2e/test_celery_cluster.py) trains on the last day; the demo's own
        # runs name their days themselves (start_tick).
        confs["tick_model_training"]["trade_date"] = days[-1].isoformat()
    return confs


def demo_tick(client: AirflowClient, dag_id: str) -> str:
    """The logical date of the demo's run of a scheduled workflow: a past tick without a run.

    While the DAG is still paused, the tick its first scheduled run would take (``next_dagrun``):
    with the demo's run on it, unpausing adds no run of its own (the module docstring says why).
    Otherwise the latest tick of the last 14 days that has no run (Airflow's backfill dry run
    lists them)."""
    dag = client.request("GET", f"/dags/{dag_id}")
    now = datetime.now(UTC)
    first = dag.get("next_dagrun_logical_date")
    start = now - timedelta(days=14)
    if first and datetime.fromisoformat(first) < start:
        start = datetime.fromisoformat(first)
    free = [entry["logical_date"] for entry in client.request("POST", "/backfills/dry_run", {
        "dag_id": dag_id, "from_date": start.isoformat(), "to_date": now.isoformat(),
        "reprocess_behavior": "none"})["backfills"] if entry.get("logical_date")]
    if dag["is_paused"] and first in free:
        return first
    if not free:
        raise RuntimeError(f"{dag_id}: every tick of the last 14 days has a run; no free tick for the demo's run")
    return max(free, key=datetime.fromisoformat)


def backfill(client: AirflowClient, dag_id: str, from_date: str, to_date: str, conf: dict,
             reprocess: str = "none") -> tuple[int, list[str]]:
    """A backfill of ``dag_id`` over [from_date, to_date], one run at a time in date order; its id
    and its runs' ids, oldest first. Dates are ISO dates or date-times (UTC when naive)."""
    from_date, to_date = (value if "T" in value else f"{value}T00:00:00Z" for value in (from_date, to_date))
    created = client.request("POST", "/backfills", {
        "dag_id": dag_id, "from_date": from_date, "to_date": to_date, "dag_run_conf": conf,
        "reprocess_behavior": reprocess, "max_active_runs": 1, "run_backwards": False})
    query = urllib.parse.urlencode({"run_type": "backfill", "logical_date_gte": from_date,
                                    "logical_date_lte": to_date, "order_by": "logical_date", "limit": 1000})
    runs = client.request("GET", f"/dags/{dag_id}/dagRuns?{query}")["dag_runs"]
    if not runs:
        raise RuntimeError(f"the backfill of {dag_id} over {from_date}..{to_date} created no run")
    return created["id"], [run["dag_run_id"] for run in runs]


def wait_for_backfill(client: AirflowClient, backfill_id: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not client.request("GET", f"/backfills/{backfill_id}").get("completed_at"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"backfill {backfill_id} still not finished after {timeout:.0f} s")
        time.sleep(5)


def start_scheduled(client: AirflowClient, dag_id: str, conf: dict) -> str:
    """The demo's run of a scheduled workflow: a one-run backfill on ``demo_tick``, then unpause."""
    tick = demo_tick(client, dag_id)
    _, runs = backfill(client, dag_id, tick, tick, conf)
    client.unpause(dag_id)
    return runs[-1]


def start_tick(client: AirflowClient, dag_id: str, conf: dict, timeout: float) -> str:
    """The tick workflow over the trade days just seeded, in date order (each day's champion is
    the previous day's): the first day on ``demo_tick`` (it builds features only: the conf names
    its trade date), then the other days on their own dates. Returns the last day's run id."""
    days = SEEDED_TICK_DAYS
    tick = demo_tick(client, dag_id)
    first, _ = backfill(client, dag_id, tick, tick, {**conf, "trade_date": days[0].isoformat()})
    client.unpause(dag_id)
    wait_for_backfill(client, first, timeout)  # one backfill of a DAG at a time
    each_own_day = {key: value for key, value in conf.items() if key != "trade_date"}
    _, runs = backfill(client, dag_id, days[1].isoformat(), (days[-1] + timedelta(days=1)).isoformat(),
                       each_own_day, reprocess="completed")  # a second demo redoes the days it did before
    return runs[-1]


def blocking_run(client: AirflowClient, cfg: config.WorkflowConfig) -> dict | None:
    """An active run of ``cfg``'s DAG that a triggered run would queue behind, if any."""
    for state in ("running", "queued"):
        records = client.request("GET", f"/dags/{cfg.dag_id}/dagRuns?state={state}")["dag_runs"]
        if records:
            return records[0]
    return None


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
    # Defaults from the environment too, so that `make demo VTM_DEMO_TICK_DAYS=2` works.
    parser.add_argument("--tick-days", type=int, default=int(os.environ.get("VTM_DEMO_TICK_DAYS", "4")),
                        help="simulated trading days for the tick workflow when DATA_MIRROR has no trades "
                             "(at least 2: the last trains on the days before it; env VTM_DEMO_TICK_DAYS)")
    parser.add_argument("--workflows", default=os.environ.get("VTM_DEMO_WORKFLOWS", ""),
                        help="comma-separated dag_ids to run (default: all; env VTM_DEMO_WORKFLOWS)")
    args = parser.parse_args(argv)
    os.umask(0o077)  # it writes under VTM_HOME (the tick lake): private, like everything the stack writes
    airflow_home = Path(os.environ["AIRFLOW_HOME"])
    base_url = os.environ.get("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8080")
    client = AirflowClient(base_url, "admin", admin_password(airflow_home))
    workflows = present_workflows()
    if args.workflows:
        wanted = {name.strip() for name in args.workflows.split(",") if name.strip()}
        if unknown := wanted - {cfg.dag_id for cfg in workflows}:
            parser.error(f"--workflows: no such workflow {sorted(unknown)}")
        workflows = [cfg for cfg in workflows if cfg.dag_id in wanted]
    client.wait_for_dags([cfg.dag_id for cfg in workflows])
    if args.tick_days < 2:
        parser.error("--tick-days must be at least 2 (the last day trains on the days before it)")
    confs = prepare_inputs(workflows, args.tick_days)
    runs: dict[str, str] = {}
    not_run: dict[str, str] = {}
    # The tick workflow last: its first day has to finish before its other days are created.
    for cfg in sorted(workflows, key=lambda cfg: cfg.dag_id == "tick_model_training"):
        conf = confs[cfg.dag_id]
        if cfg.dag_id == "tick_model_training":
            runs[cfg.dag_id] = start_tick(client, cfg.dag_id, conf, args.timeout)
        elif client.request("GET", f"/dags/{cfg.dag_id}").get("timetable_summary"):  # None: manual only
            runs[cfg.dag_id] = start_scheduled(client, cfg.dag_id, conf)
        elif (blocking := blocking_run(client, cfg)) is not None:
            not_run[cfg.dag_id] = (f"not run by the demo: {blocking['dag_run_id']} holds the DAG's one "
                                   f"active run ({why_waiting(client, cfg, blocking)})")
            print(f"{cfg.dag_id}: {not_run[cfg.dag_id]}", flush=True)
            continue
        else:
            runs[cfg.dag_id] = client.trigger(cfg.dag_id, conf)
            client.unpause(cfg.dag_id)
        print(f"started {cfg.dag_id}: {runs[cfg.dag_id]}", flush=True)
    print(f"waiting for {len(runs)} run(s) (up to {args.timeout:.0f} s) ...", flush=True)
    final = client.wait_for_runs(runs, args.timeout)
    rows = []
    for cfg in workflows:
        if cfg.dag_id in not_run:
            rows.append({"dag_id": cfg.dag_id, "state": "not run", "duration": "-", "metric": "-",
                         "model": "-", "alias": "-", "champion": "-", "mlflow_run": "-",
                         "note": not_run[cfg.dag_id]})
        else:
            rows.append({**describe(client, cfg, final[cfg.dag_id]),
                         "note": "auto_promote=true (demo conf): no approval step"
                         if confs[cfg.dag_id].get("auto_promote") else "-"})
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
