"""`make demo`'s path for real: tools/stack.sh starts PostgreSQL, MLflow and Airflow (api-server,
scheduler, dag-processor, triggerer; LocalExecutor) on free 127.0.0.1 ports, tools/demo.py unpauses
and triggers every workflow through the REST API and prints the table, login works with the
generated password only (printed nowhere: the demo says where it is), MLflow asks for its
login, and `down` stops everything it started."""

from __future__ import annotations

import base64
import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import stack_env
from tests.image_synth import write_cifar_mirror, write_mnist_mirror
from tests.uci_synth import write_uci_file

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[2]


def post_json(url: str, body: dict) -> int:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


# The stack's start (<= 600 s) and the demo (<= 900 s of waiting, plus its own start) bound it.
@pytest.mark.timeout(1800)
def test_demo_runs_every_workflow_and_leaves_both_uis_up(tmp_path):
    mirror = tmp_path / "mirror"
    write_uci_file(mirror / "household_power" / "household_power_consumption.zip", days=200, seed=9)
    write_mnist_mirror(mirror)
    write_cifar_mirror(mirror)
    env = stack_env(tmp_path / "home", DATA_MIRROR=str(mirror))
    mlflow_port, airflow_port = env["MLFLOW_PORT"], env["AIRFLOW_PORT"]
    stack = str(ROOT / "tools/stack.sh")
    try:
        subprocess.run([stack, "up"], env=env, check=True, timeout=600, capture_output=True, text=True)
        demo = subprocess.run(["bash", "-c", f'eval "$({stack} env)" && python tools/demo.py --timeout 900 --tick-days 2'],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
        assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
        row = next(line for line in demo.stdout.splitlines() if line.startswith("power_lgbm_training"))
        assert " success " in row and "mae=" in row and "baseline_mae=" in row
        # Unpausing adds the latest scheduled run, so ours is v1 or v2. Ours promotes unattended (the
        # demo's conf, and its note says so); the scheduled one has no auto_promote: the second run
        # on the same data cannot beat the champion, or, if it ran first, its approval waiting in
        # the UI is rejected by the demo. Either way ours is the champion.
        assert re.search(r"power_lgbm v(\d+) .*champion.* v\1 ", row), row
        assert "auto_promote=true (demo conf)" in row
        assert f"http://127.0.0.1:{mlflow_port}/#/experiments/" in row
        # No ticks in this mirror: the demo fills the lake with simulated days (two here, the
        # fewest that train: the second on the first), flagged synthetic, and runs them.
        tick = next(line for line in demo.stdout.splitlines() if line.startswith("tick_model_training"))
        assert " success " in tick and "rmse_log_rv=" in tick and "har_rmse_log_rv=" in tick
        assert "tick_model v" in tick
        assert "tick lake " in demo.stdout and "trade days ['2026-01-05', '2026-01-06']" in demo.stdout
        for dag_id in ("mnist_cnn_training", "cifar10_cnn_training"):
            cnn = next(line for line in demo.stdout.splitlines() if line.startswith(dag_id))
            assert " success " in cnn and "test_accuracy=" in cnn and "smoke profile" in cnn

        # The scheduled tick run that unpausing creates waits for trades no importer brings: the
        # table says so and until when, instead of leaving it silently holding the DAG's one slot.
        for line in demo.stdout.splitlines():
            if line.startswith("tick_model_training") and "(scheduled)" in line:
                assert "wait_for_trades waits for the trades of" in line and "data_wait 6 h" in line

        password_file = tmp_path / "home/airflow/simple_auth_manager_passwords.json.generated"
        password = json.loads(password_file.read_text())["admin"]
        mlflow_password = (tmp_path / "home/secrets/mlflow_admin_password").read_text().strip()
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
    finally:
        subprocess.run([stack, "down"], env=env, timeout=120)
    status = subprocess.run([stack, "status"], env=env, capture_output=True, text=True).stdout
    assert "running" not in status
