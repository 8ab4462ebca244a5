"""The README's path for real, on one embedded stack (tools/stack.sh: PostgreSQL, MLflow, Airflow's
api-server, scheduler, dag-processor and triggerer; LocalExecutor), in order:

1. ``make demo DATA_MIRROR=...`` on a fresh ``VTM_HOME``: every workflow runs and promotes
   unattended, no scheduled run appears behind the demo's, both UIs ask for the generated logins.
2. Every command of README.md and docs/operations.md (tests/e2e/documented.py reads them from the
   files), run as written in a shell that did ``eval "$(tools/stack.sh env)"``, exit 0, with the
   placeholders (MODEL, VERSION, FILE.csv.gz, ``$RUN`` ...) filled in; ``PLAN`` says where each is
   run, so a new documented command fails this module until it is.
3. ``make demo`` a second time while a person's power run waits for approval and their MNIST run
   is queued: it never waits on either, and answers nothing.

Step 2 also carries the backfill checks (one feature partition per day, a reprocessed day rebuilt
byte-identically) on the real trades of ``../shared/data/ticks``.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from scripts.tick import lake as tick_lake
from tests.e2e.documented import Command, all_commands
from tests.helpers import SHARED_DATA, STACK, stack_env, stack_shell
from tests.image_synth import write_cifar_mirror, write_mnist_mirror
from tests.uci_synth import write_uci_file
from tools.airflow_api import AirflowClient

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]
POWER, TICK, MNIST, CIFAR = "power_lgbm_training", "tick_model_training", "mnist_cnn_training", "cifar10_cnn_training"
REAL_TRADES = SHARED_DATA / "ticks" / "us_equity_trades_2013-10-07_09.csv.gz"
HERE = "here"
# Where each documented command runs. HERE: in this module, as written (placeholders filled in).
PLAN: dict[str, str] = {
    "make demo": "not here: it downloads the official data sets and CI has no internet; the download "
                 "path is tests/test_power_data.py and tests/test_image_data.py::test_download_when_no_mirror",
    "make demo DATA_MIRROR=../shared/data": HERE,
    "make test": "CI: .ci/run ends with `exec make test`; this suite is what it runs",
    'eval "$(tools/stack.sh env)"': HERE,
    "airflow dags trigger power_lgbm_training": HERE,
    "airflow dags trigger power_lgbm_training -c '{\"num_boost_round\": 300}'": HERE,
    "airflow dags test power_lgbm_training": HERE,
    "python -m common.registry pending": HERE,
    "python -m common.registry approve MODEL VERSION --by NAME": HERE,
    "python -m common.registry rollback MODEL --by NAME --reason TEXT": HERE,
    "python -m scripts.power.cli --param seed=3": HERE,
    "airflow dags trigger mnist_cnn_training -c '{\"profile\": \"fast\", \"framework\": \"tensorflow\"}'": HERE,
    "python -m scripts.image.cli --dataset cifar10 --profile smoke": HERE,
    "airflow dags test mnist_cnn_training -c '{\"profile\": \"smoke\"}'": HERE,
    "airflow dags test cifar10_cnn_training -c '{\"profile\": \"smoke\"}'": HERE,
    "airflow dags test tick_model_training 2013-10-09": HERE,
    "airflow backfill create --dag-id tick_model_training --from-date 2013-10-07 --to-date 2013-10-10 "
    "--max-active-runs 1": HERE,
    "python -m scripts.tick.importer import FILE.csv.gz": HERE,
    "python -m scripts.tick.cli --day 2013-10-09": HERE,
    "make bench": HERE,
    "export AIRFLOW_CONN_ALERTS_SLACK=": HERE,  # a prefix: the JSON follows
    "export AIRFLOW_CONN_ALERTS_SMTP=": HERE,
    "export AIRFLOW_CONN_ALERTS_WEBHOOK=": HERE,
    'curl -X PATCH "$AIRFLOW__API__BASE_URL/api/v2/dags/power_lgbm_training/dagRuns/$RUN/': HERE,
    "python -m common.registry pending [MODEL]": HERE,
    "python -m common.registry approve power_lgbm 7 --by alice [--reason TEXT]": HERE,
    "python -m common.registry reject power_lgbm 7 --by alice [--reason TEXT]": HERE,
    'cd dags && python -m common.registry rollback power_lgbm --by alice --reason "bad forecasts since Monday"': HERE,
    'cd dags && python -m common.registry rollback power_lgbm --to 6 --by alice --reason "..."': HERE,
}
RAN: set[str] = set()


def plan_key(command: Command) -> str:
    keys = [key for key in PLAN if command.text == key or (key.endswith(("=", "/")) and command.text.startswith(key))]
    assert len(keys) == 1, f"{command.document}: no single PLAN entry for {command.text!r}: {keys}"
    return keys[0]


def test_every_documented_command_has_a_plan():
    """Every command the two documents show is in PLAN, and PLAN names nothing they no longer show."""
    keys = {plan_key(command) for command in all_commands()}
    assert keys == set(PLAN), f"PLAN entries no document shows: {sorted(set(PLAN) - keys)}"
    assert "exec make test" in (ROOT / ".ci/run").read_text()


def documented(key: str) -> Command:
    matches = {c.text: c for c in all_commands() if plan_key(c) == key}
    assert matches, f"no documented command for {key!r}"
    return next(iter(matches.values()))


def shell_script(command: str, cwd: Path) -> list[str]:
    """A person's new shell: the stack's environment, then ``command`` as written, in ``cwd``."""
    return ["bash", "-c", f'eval "$({STACK} env)" || exit 97\ncd "{cwd}" || exit 98\n{command}']


def run(stack: SimpleNamespace, key: str, fill: dict[str, str] | None = None, *, then: str = "",
        env: dict[str, str] | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the documented command ``key`` (PLAN) as written, with ``fill``'s placeholders replaced
    (each must occur), and ``then`` after it in the same shell; it must exit 0."""
    command = documented(key)
    text = command.text
    for placeholder, value in (fill or {}).items():
        assert placeholder in text, f"{placeholder!r} is not in {text!r}"
        text = text.replace(placeholder, value)
    cwd = ROOT / "dags" if command.from_dags else ROOT
    done = subprocess.run(shell_script(f"{text}\n{then}" if then else text, cwd),
                          env={**stack.env, **(env or {})}, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{text!r} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    RAN.add(key)
    step(text.splitlines()[0][:100])
    return done


STARTED = time.monotonic()


def step(what: str) -> None:
    """Where the commands test is, with the seconds since the module started (shown with -s)."""
    print(f"[{time.monotonic() - STARTED:6.0f} s] {what}", flush=True)


def wait_for(check: Callable[[], object], timeout: float, what: str, every: float = 3) -> object:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f} s")
        time.sleep(every)
    return result


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[SimpleNamespace]:
    """A fresh VTM_HOME and a synthetic mirror (UCI power, MNIST, CIFAR-10; no trades: the demo
    simulates two days); the stack itself is started by ``make demo`` in the first test."""
    base = tmp_path_factory.mktemp("readme")
    mirror = base / "mirror"
    write_uci_file(mirror / "household_power" / "household_power_consumption.zip", days=200, seed=9)
    write_mnist_mirror(mirror)
    write_cifar_mirror(mirror)
    env = stack_env(base / "home", VTM_DEMO_TICK_DAYS="2", VTM_BENCH_REPEATS="1")
    ns = SimpleNamespace(base=base, mirror=mirror, env=env, home=base / "home", client=None, first_demo="")
    try:
        yield ns
    finally:
        subprocess.run([STACK, "down"], env=env, timeout=300)
    status = subprocess.run([STACK, "status"], env=env, capture_output=True, text=True).stdout
    assert "running" not in status


def client_of(stack: SimpleNamespace) -> AirflowClient:
    if stack.client is None:
        password = json.loads((stack.home / "airflow/simple_auth_manager_passwords.json.generated").read_text())["admin"]
        stack.client = AirflowClient(f"http://127.0.0.1:{stack.env['AIRFLOW_PORT']}", "admin", password)
    return stack.client


def post_json(url: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def row(stdout: str, dag_id: str) -> str:
    return next(line for line in stdout.splitlines() if line.startswith(dag_id + " "))


# The stack's start (<= 600 s) and the demo's runs on a busy 2-core machine.
@pytest.mark.reliability(case="8.9 make demo and the scheduled runs", fault="unpausing creates a run of the latest "
                         "tick without the demo's conf, which waits for a person or for trades",
                         survives="the demo's runs take those ticks: no scheduled run appears")
@pytest.mark.timeout(1800)
def test_demo_runs_every_workflow_and_leaves_both_uis_up(stack):
    demo = run(stack, "make demo DATA_MIRROR=../shared/data", {"../shared/data": str(stack.mirror)}, timeout=1500)
    stack.first_demo = demo.stdout
    mlflow_port, airflow_port = stack.env["MLFLOW_PORT"], stack.env["AIRFLOW_PORT"]
    power = row(demo.stdout, POWER)
    assert " success " in power and "mae=" in power and "baseline_mae=" in power
    assert re.search(r"power_lgbm v(\d+) .*champion.* v\1 ", power), power  # promoted unattended
    assert "auto_promote=true (demo conf)" in power
    assert f"http://127.0.0.1:{mlflow_port}/#/experiments/" in power
    # No ticks in this mirror: two simulated days (the fewest that train: the second on the first),
    # flagged synthetic.
    tick = row(demo.stdout, TICK)
    assert " success " in tick and "rmse_log_rv=" in tick and "har_rmse_log_rv=" in tick and "tick_model v" in tick
    assert "trade days ['2026-01-05', '2026-01-06']" in demo.stdout
    for dag_id in (MNIST, CIFAR):
        cnn = row(demo.stdout, dag_id)
        assert " success " in cnn and "test_accuracy=" in cnn and "smoke profile" in cnn
    # The demo's runs took the ticks unpausing would have given scheduled runs: none was created,
    # so nothing waits for a person or for trades, and the table has no other row.
    client = client_of(stack)
    for dag_id in (POWER, TICK):
        scheduled = client.request("GET", f"/dags/{dag_id}/dagRuns?run_type=scheduled")["total_entries"]
        assert scheduled == 0, f"{dag_id}: {scheduled} scheduled run(s) beside the demo's"
        assert not client.request("GET", f"/dags/{dag_id}")["is_paused"]
    assert len([line for line in demo.stdout.splitlines() if line.startswith(("power_", "tick_", "mnist_", "cifar10_"))]) == 4

    password_file = stack.home / "airflow/simple_auth_manager_passwords.json.generated"
    password = json.loads(password_file.read_text())["admin"]
    mlflow_password = (stack.home / "secrets/mlflow_admin_password").read_text().strip()
    # Where the passwords are, never the passwords themselves (stdout ends up in CI logs).
    assert password != "admin" and password not in demo.stdout + demo.stderr
    assert mlflow_password not in demo.stdout + demo.stderr
    assert str(password_file) in demo.stdout
    token_url = f"http://127.0.0.1:{airflow_port}/auth/token"
    assert post_json(token_url, {"username": "admin", "password": password}) in (200, 201)
    assert post_json(token_url, {"username": "admin", "password": "admin"}) in (401, 403)
    # The MLflow UI asks for the login too (basic auth); with it, it opens.
    ui = f"http://127.0.0.1:{mlflow_port}/"
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(ui, timeout=30)
    assert anonymous.value.code == 401
    login = base64.b64encode(f"admin:{mlflow_password}".encode()).decode()
    request = urllib.request.Request(ui, headers={"Authorization": f"Basic {login}"})
    with urllib.request.urlopen(request, timeout=30) as page:
        assert page.status == 200


# --- step 2: the documented commands ------------------------------------------------------------


def runs_of(client: AirflowClient, dag_id: str, **query: str) -> list[dict]:
    params = urllib.parse.urlencode({"limit": 100, "order_by": "run_after", **query})
    return client.request("GET", f"/dags/{dag_id}/dagRuns?{params}")["dag_runs"]


def waiting_forms(client: AirflowClient, dag_id: str) -> list[str]:
    """Run ids of ``dag_id`` whose ``approve`` waits for an answer."""
    tis = client.request("GET", f"/dags/{dag_id}/dagRuns/~/taskInstances?state=awaiting_input")["task_instances"]
    return [ti["dag_run_id"] for ti in tis if ti["task_id"] == "approve"]


def answer(client: AirflowClient, dag_id: str, run_id: str, option: str, reason: str) -> dict:
    path = f"/dags/{dag_id}/dagRuns/{urllib.parse.quote(run_id)}/taskInstances/approve/-1/hitlDetails"
    return client.request("PATCH", path, {"chosen_options": [option], "params_input": {"reason": reason}})


def decision(client: AirflowClient, dag_id: str, run_id: str) -> dict:
    return client.xcom(dag_id, run_id, "register")


def new_run(client: AirflowClient, dag_id: str, before: set[str]) -> str:
    return wait_for(lambda: next((r["dag_run_id"] for r in runs_of(client, dag_id) if r["dag_run_id"] not in before),
                                 None), 120, f"a new run of {dag_id}")


def finished(client: AirflowClient, dag_id: str, run_id: str, timeout: float = 900) -> dict:
    return wait_for(lambda: (r := client.dag_run(dag_id, run_id))["state"] in ("success", "failed") and r,
                    timeout, f"{dag_id} {run_id} finished")


def dags_test(stack: SimpleNamespace, key: str, dag_id: str, known: set[str], timeout: float = 900,
              on_waiting: Callable[[str], None] = lambda run_id: None) -> tuple[str, str]:
    """``airflow dags test`` runs in this shell (no scheduler); when its run waits for approval,
    ``on_waiting(run_id)`` runs, then the person answers Reject in the UI (the REST call the form
    makes). Returns (run id, output)."""
    client = client_of(stack)
    command = documented(key)
    # With the stack's scheduler running, an unpaused DAG's test run is the scheduler's to run too:
    # both would start its tasks (seen: "TI was not in a state where it could be marked as running").
    # As the README says, pause the DAG first.
    client.request("PATCH", f"/dags/{dag_id}", {"is_paused": True})
    proc = subprocess.Popen(shell_script(command.text, ROOT), env=stack.env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    run_id = new_run(client, dag_id, known)
    deadline = time.monotonic() + timeout
    while proc.poll() is None:
        if run_id in waiting_forms(client, dag_id):
            on_waiting(run_id)
            answer(client, dag_id, run_id, "Reject", "airflow dags test: not this one")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{command.text} still running after {timeout} s")
        time.sleep(3)
    output = proc.stdout.read()
    client.request("PATCH", f"/dags/{dag_id}", {"is_paused": False})
    assert proc.returncode == 0, f"{command.text} exited {proc.returncode}:\n{output[-4000:]}"
    assert "Traceback" not in output, output[-4000:]
    assert client.dag_run(dag_id, run_id)["state"] == "success"
    RAN.add(key)
    step(command.text)
    return run_id, output


def champion(stack: SimpleNamespace, model: str) -> str | None:
    done = subprocess.run(shell_script(
        "python -c 'import sys; from mlflow import MlflowClient; "
        "print(MlflowClient().get_model_version_by_alias(sys.argv[1], \"champion\").version)' " + model, ROOT),
        env=stack.env, capture_output=True, text=True, timeout=120)
    return done.stdout.strip() or None


def feature_bytes(lake: Path, day: str) -> bytes:
    return (lake / "features" / f"date={day}" / tick_lake.PART_FILE).read_bytes()


@pytest.mark.reliability(case="1.5 every documented command", fault="a command of README.md or docs/operations.md "
                         "fails as written (airflow dags test crashed on the DeadlineAlert)",
                         survives="each runs as written against the stack, exit 0; airflow dags test of all four DAGs")
@pytest.mark.timeout(3000)
def test_every_documented_command_runs_as_written(stack):
    if not REAL_TRADES.is_file():
        pytest.skip(f"real trades not present at {REAL_TRADES} (see ../shared/data/README.md)")
    client = client_of(stack)
    shell = stack_shell(stack.env)
    run(stack, 'eval "$(tools/stack.sh env)"')

    # Alerts: the three connections as documented; Airflow reads each back from the environment.
    for key in ("export AIRFLOW_CONN_ALERTS_SLACK=", "export AIRFLOW_CONN_ALERTS_SMTP=", "export AIRFLOW_CONN_ALERTS_WEBHOOK="):
        conn_id = key.split("AIRFLOW_CONN_")[1].rstrip("=").lower()
        got = run(stack, key, then=f"airflow connections get {conn_id} -o json")
        assert json.loads(got.stdout[got.stdout.index("["):])[0]["conn_type"] in ("http", "smtp")

    # A run with the defaults beats the demo's quick model and waits for a person (approve it in
    # the UI); the second, with 300 rounds, queues behind it (one active run per DAG).
    known = {r["dag_run_id"] for r in runs_of(client, POWER)}
    run(stack, "airflow dags trigger power_lgbm_training")
    first = new_run(client, POWER, known)
    run(stack, "airflow dags trigger power_lgbm_training -c '{\"num_boost_round\": 300}'")
    second = new_run(client, POWER, known | {first})
    wait_for(lambda: first in waiting_forms(client, POWER) or client.dag_run(POWER, first)["state"] != "running"
             and client.dag_run(POWER, first)["state"] != "queued", 900, "the defaults' run waiting for approval")
    assert first in waiting_forms(client, POWER), decision(client, POWER, first)
    version = str(decision(client, POWER, first)["version"])
    demo_champion = champion(stack, "power_lgbm")
    listed = run(stack, "python -m common.registry pending").stdout
    assert re.search(rf"power_lgbm\D+{version}\b", listed), listed
    assert version in run(stack, "python -m common.registry pending [MODEL]", {"[MODEL]": "power_lgbm"}).stdout
    # Approved from the command line: it becomes champion; the form, answered after it, leaves it.
    run(stack, "python -m common.registry approve MODEL VERSION --by NAME",
        {"MODEL": "power_lgbm", "VERSION": version, "NAME": "ci"})
    assert champion(stack, "power_lgbm") == version
    token = client.login()
    curl = run(stack, 'curl -X PATCH "$AIRFLOW__API__BASE_URL/api/v2/dags/power_lgbm_training/dagRuns/$RUN/',
               env={"RUN": first, "TOKEN": token})
    assert json.loads(curl.stdout)["chosen_options"] == ["Approve"], curl.stdout
    assert finished(client, POWER, first)["state"] == "success"
    assert champion(stack, "power_lgbm") == version
    # Rollback: to the champion before (the demo's), then forward to this version again with
    # --to, then back once more.
    run(stack, "python -m common.registry rollback MODEL --by NAME --reason TEXT",
        {"MODEL": "power_lgbm", "NAME": "ci", "TEXT": "'documented command'"})
    assert champion(stack, "power_lgbm") == demo_champion
    run(stack, 'cd dags && python -m common.registry rollback power_lgbm --to 6 --by alice --reason "..."',
        {"--to 6": f"--to {version}"})
    assert champion(stack, "power_lgbm") == version
    run(stack, 'cd dags && python -m common.registry rollback power_lgbm --by alice --reason "bad forecasts since Monday"')
    assert champion(stack, "power_lgbm") == demo_champion

    # airflow dags test: the whole run in this shell. Its version beats the demo's champion and
    # waits: rejected from the command line while the form waits, then in the form (which leaves it).
    def reject_from_the_command_line(run_id: str) -> None:
        run(stack, "python -m common.registry reject power_lgbm 7 --by alice [--reason TEXT]",
            {" 7 ": f" {decision(client, POWER, run_id)['version']} ", "[--reason TEXT]": "--reason 'not this one'"})

    known = {r["dag_run_id"] for r in runs_of(client, POWER)}
    _, output = dags_test(stack, "airflow dags test power_lgbm_training", POWER, known,
                          on_waiting=reject_from_the_command_line)
    assert "DagRun Finished" in output
    assert "python -m common.registry reject power_lgbm 7 --by alice [--reason TEXT]" in RAN

    # The CLI run (no Airflow, no approval step) registers a version that waits; approved here.
    out = run(stack, "python -m scripts.power.cli --param seed=3").stdout
    pending = re.findall(r"power_lgbm\D+(\d+)", run(stack, "python -m common.registry pending [MODEL]",
                                                     {"[MODEL]": "power_lgbm"}).stdout)
    assert pending, out[-2000:]
    run(stack, "python -m common.registry approve power_lgbm 7 --by alice [--reason TEXT]",
        {" 7 ": f" {pending[-1]} ", "[--reason TEXT]": "--reason 'checked the CLI run'"})
    assert champion(stack, "power_lgbm") == pending[-1]

    # Image workflows: a run of the DAG (left to the scheduler) and the command-line trainer.
    run(stack, "airflow dags trigger mnist_cnn_training -c '{\"profile\": \"fast\", \"framework\": \"tensorflow\"}'")
    run(stack, "python -m scripts.image.cli --dataset cifar10 --profile smoke", timeout=1200)
    for dag_id in (MNIST, CIFAR):  # smoke models are never promoted: no approval to wait for
        known = {r["dag_run_id"] for r in runs_of(client, dag_id)}
        _, output = dags_test(stack, f"airflow dags test {dag_id} -c '{{\"profile\": \"smoke\"}}'", dag_id, known)
        assert "DagRun Finished" in output

    # Ticks: the real trades imported, the backfill of the README, then one day without the scheduler.
    lake = Path(shell.get("TICK_LAKE") or stack.home / "lake")  # scripts/core/paths.py's default
    run(stack, "python -m scripts.tick.importer import FILE.csv.gz", {"FILE.csv.gz": str(REAL_TRADES)})
    days = ["2013-10-07", "2013-10-08", "2013-10-09"]
    assert all(d in [str(x) for x in tick_lake.Lake.open(str(lake)).days(tick_lake.TRADES)] for d in days)
    run(stack, "airflow backfill create --dag-id tick_model_training --from-date 2013-10-07 --to-date 2013-10-10 "
               "--max-active-runs 1")
    backfill_id = max(b["id"] for b in client.request("GET", f"/backfills?dag_id={TICK}")["backfills"])

    def backfill_done() -> bool:
        for run_id in waiting_forms(client, TICK):  # the first real-data model: a person approves it
            answer(client, TICK, run_id, "Approve", "checked the backfill")
        return bool(client.request("GET", f"/backfills/{backfill_id}")["completed_at"])

    wait_for(backfill_done, 1500, "the README's tick backfill", every=5)
    by_day = {r["logical_date"][:10]: r for r in runs_of(client, TICK, run_type="backfill")
              if r["logical_date"][:10] in days}
    assert sorted(by_day) == days and all(r["state"] == "success" for r in by_day.values()), by_day
    assert client.xcom(TICK, by_day["2013-10-09"]["dag_run_id"], "train")["train_days"] == days[:2]
    assert sorted(p.name for p in (lake / "features").iterdir() if p.name.startswith("date=2013")) == \
        [f"date={d}" for d in days]  # one feature partition per day
    # Reprocessing a day rebuilds the same partition, byte for byte.
    before = feature_bytes(lake, "2013-10-08")
    again = client.request("POST", "/backfills", {
        "dag_id": TICK, "from_date": "2013-10-08T00:00:00Z", "to_date": "2013-10-08T23:59:00Z",
        "reprocess_behavior": "completed", "max_active_runs": 1, "dag_run_conf": {}})
    wait_for(lambda: client.request("GET", f"/backfills/{again['id']}")["completed_at"], 900, "the reprocessing")
    tries = {t["task_id"]: t["try_number"] for t in client.task_instances(TICK, by_day["2013-10-08"]["dag_run_id"])}
    assert tries["build_features"] >= 2 and feature_bytes(lake, "2013-10-08") == before, tries
    known = {r["dag_run_id"] for r in runs_of(client, TICK)}
    dags_test(stack, "airflow dags test tick_model_training 2013-10-09", TICK, known)
    run(stack, "python -m scripts.tick.cli --day 2013-10-09")

    # The benchmarks, on this mirror (with the real trades) and one repeat each (VTM_BENCH_REPEATS):
    # the command is checked here, its figures are docs/performance.md's.
    (stack.mirror / "ticks").mkdir(exist_ok=True)
    shutil.copy(REAL_TRADES, stack.mirror / "ticks")
    run(stack, "make bench", env={"DATA_MIRROR": str(stack.mirror)}, timeout=1200)
    # The 300-round run went through the gate after the first; if it waits for a person, rejected.
    def second_done() -> bool:
        if second in waiting_forms(client, POWER):
            answer(client, POWER, second, "Reject", "the defaults' run is better")
        return client.dag_run(POWER, second)["state"] in ("success", "failed")

    wait_for(second_done, 900, "the 300-round run")
    assert client.dag_run(POWER, second)["state"] == "success"

    # Everything PLAN runs here ran (the demo in the test before).
    assert sorted(key for key, where in PLAN.items() if where == HERE and key not in RAN) == []


@pytest.mark.reliability(case="8.8 make demo beside waiting runs", fault="a second make demo while a person's power run "
                         "waits for approval and their MNIST run is queued (the first demo once hung on such a run)",
                         survives="the demo's power run goes beside it, MNIST is reported 'not run'; it answers nothing")
@pytest.mark.timeout(1200)
def test_a_second_demo_never_waits_on_an_approval(stack):
    """A person's runs hold two DAGs: a power run waiting for approval (the champion set back to the
    demo's quick model first, so that a run with the defaults beats it), and an MNIST run queued
    on the DAG they paused. The demo runs power beside the waiting run (a backfill) and does not
    trigger MNIST, saying why; it answers and unpauses nothing."""
    client = client_of(stack)
    demo_version = re.search(r"power_lgbm v(\d+)", row(stack.first_demo, POWER)).group(1)
    subprocess.run(shell_script(f"python -m common.registry rollback power_lgbm --to {demo_version} --by ci "
                                "--reason 'the demo model back, for a run that beats it'", ROOT / "dags"),
                   env=stack.env, check=True, capture_output=True, timeout=300)
    waiting = client.trigger(POWER, {})
    wait_for(lambda: waiting in waiting_forms(client, POWER), 900, "the person's power run waiting for approval")
    client.request("PATCH", f"/dags/{MNIST}", {"is_paused": True})
    queued = client.trigger(MNIST, {"profile": "smoke"})
    started = time.monotonic()
    demo = run(stack, "make demo DATA_MIRROR=../shared/data", {"../shared/data": str(stack.mirror)},
               env={"VTM_DEMO_WORKFLOWS": f"{POWER},{MNIST}"}, timeout=900)
    print(f"second demo: {time.monotonic() - started:.0f} s")
    assert " success " in row(demo.stdout, POWER)
    mnist = row(demo.stdout, MNIST)
    assert "not run" in mnist and queued in mnist, mnist
    assert waiting in waiting_forms(client, POWER)  # still the person's to answer
    assert client.dag_run(MNIST, queued)["state"] == "queued" and client.request("GET", f"/dags/{MNIST}")["is_paused"]
    answer(client, POWER, waiting, "Reject", "done looking")
