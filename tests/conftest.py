"""Shared fixtures. Every server a test needs is started here on 127.0.0.1 and stopped after.

Airflow reads its configuration once, at import, so the environment that isolates the test run
(a throw-away AIRFLOW_HOME with its own SQLite DB, VTM_HOME for data and locks) is set at the top
of this module, before any test imports airflow.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="vtm-tests-"))
os.environ["AIRFLOW_HOME"] = str(_SESSION_DIR / "airflow")
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(ROOT / "dags")
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ["AIRFLOW__CORE__UNIT_TEST_MODE"] = "False"
os.environ["VTM_HOME"] = str(_SESSION_DIR / "vtm")
os.environ.pop("DATA_MIRROR", None)  # tests say which data they read
os.environ.pop("MLFLOW_TRACKING_URI", None)
os.environ["PATH"] = f"{VENV_BIN}{os.pathsep}{os.environ['PATH']}"
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")
sys.path[:0] = [str(ROOT / "dags"), str(ROOT)]

from tests.helpers import SHARED_DATA, free_port, stop_group, wait_http  # noqa: E402
from tests.uci_synth import write_uci_file  # noqa: E402


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> str:
    """A real MLflow tracking server (SQLite + local artifacts), one worker, 127.0.0.1 only."""
    store = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log = store / "server.log"
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
             "--artifacts-destination", str(store / "artifacts"), "--serve-artifacts"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 120, proc, log)
        os.environ["MLFLOW_TRACKING_URI"] = uri
        yield uri
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
        stop_group(proc)


@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated metadata DB (SQLite) in the session's AIRFLOW_HOME, with the project's pools."""
    home = Path(os.environ["AIRFLOW_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    subprocess.run([str(VENV_BIN / "airflow"), "db", "migrate"], check=True, capture_output=True)
    pools = home / "pools.json"
    pools.write_text(subprocess.run([sys.executable, str(ROOT / "dags/common/config.py"), "pools"],
                                    check=True, capture_output=True, text=True).stdout)
    subprocess.run([str(VENV_BIN / "airflow"), "pools", "import", str(pools)], check=True,
                   capture_output=True)
    return home


@pytest.fixture(scope="session")
def synthetic_uci(tmp_path_factory) -> Path:
    """A small UCI-format zip: 120 days of minutes with '?' gaps and one long outage."""
    path = tmp_path_factory.mktemp("uci") / "household_power_consumption.zip"
    write_uci_file(path, days=120, seed=1)
    return path


@pytest.fixture
def real_power_zip() -> Path:
    path = SHARED_DATA / "household_power" / "household_power_consumption.zip"
    if not path.is_file():
        pytest.skip(f"real data not present at {path} (see ../shared/data/README.md)")
    return path


# ---------------------------------------------------------------------------------------------
# The reliability suite's table: every test marked
#   @pytest.mark.reliability(case="...", fault="...", survives="...")
# is listed at the end of the run with its outcome (tests/reliability/README.md).
# ---------------------------------------------------------------------------------------------

_RELIABILITY_ROWS: dict[str, dict[str, str]] = {}


def _reliability_row(marker) -> dict[str, str]:
    return {**{k: str(v) for k, v in marker.kwargs.items()}, "outcome": "not run"}


# `make test` runs two pytest-xdist workers, each taking a whole module at a time in collection
# order (--dist loadfile --no-loadscope-reorder). The modules that start servers and run DAGs
# come first, the longest first, so that the two workers end together: a long module handed out
# last would leave the other worker idle (pytest --durations at the end of `make test` says how
# long each took; reorder when that changes). Every other module keeps its place after them.
HEAVIEST_FIRST = (
    "tests/e2e/test_embedded_stack.py",
    "tests/e2e/test_approval.py",
    "tests/e2e/test_celery_cluster.py",
    "tests/reliability/test_stack.py",
    "tests/e2e/test_power_dag.py",
    "tests/e2e/test_tick_assets.py",
    "tests/e2e/test_image_dags.py",
    "tests/e2e/test_deadlines.py",
    "tests/e2e/test_tick_dag.py",
)


def _module_rank(item) -> int:
    path = item.nodeid.split("::", 1)[0]
    return HEAVIEST_FIRST.index(path) if path in HEAVIEST_FIRST else len(HEAVIEST_FIRST)


def pytest_collection_modifyitems(items) -> None:
    items.sort(key=_module_rank)  # stable: a module's tests keep their order
    for item in items:
        marker = item.get_closest_marker("reliability")
        if marker is not None:
            _RELIABILITY_ROWS[item.nodeid] = _reliability_row(marker)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # Under pytest-xdist (make test) the workers collect and run the tests while the controller
    # prints the table: each report carries its case's columns to the controller.
    outcome = yield
    marker = item.get_closest_marker("reliability")
    if marker is not None:
        outcome.get_result().user_properties.append(("reliability", _reliability_row(marker)))


def pytest_runtest_logreport(report) -> None:
    row = _RELIABILITY_ROWS.get(report.nodeid)
    if row is None:
        carried = dict(report.user_properties).get("reliability")
        if carried is None:
            return
        row = _RELIABILITY_ROWS.setdefault(report.nodeid, dict(carried))
    if report.failed:
        row["outcome"] = f"FAILED ({report.when})"
    elif report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        row["outcome"] = f"skipped: {reason.removeprefix('Skipped: ')}"
    elif report.when == "call" and row["outcome"] == "not run":
        row["outcome"] = "held"


def pytest_terminal_summary(terminalreporter) -> None:
    if not _RELIABILITY_ROWS:
        return
    rows = sorted(_RELIABILITY_ROWS.values(), key=lambda r: r.get("case", ""))
    headers = ("case", "outcome", "fault", "survives")  # the last column is never cut
    widths = {h: max(len(h), *(len(r.get(h, "")) for r in rows)) for h in headers[:-1]}
    terminalreporter.section("reliability suite")
    for r in [dict(zip(headers, headers, strict=True)), *rows]:
        terminalreporter.write_line("  ".join([*(r.get(h, "").ljust(widths[h]) for h in headers[:-1]),
                                               r.get(headers[-1], "")]))
