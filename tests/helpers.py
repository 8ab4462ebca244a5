"""Process and port helpers for tests that start real servers (no side effects on import)."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator, Mapping
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited ({proc.returncode}): {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"{url} not up after {timeout}s: {log.read_text()[-3000:]}")


def stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """A real HTTP server on 127.0.0.1 serving ``directory`` (stands in for an official download
    site); yields its base URL and stops it afterwards."""
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a: None
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()


@contextlib.contextmanager
def http_receiver(path: str = "/hook") -> Iterator[tuple[str, list[dict]]]:
    """A real HTTP receiver on 127.0.0.1 (a webhook's far end): yields its URL and the JSON bodies
    POSTed to it, in order."""
    received: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 - http.server API
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_port}{path}", received
    finally:
        server.shutdown()


STACK = str(ROOT / "tools" / "stack.sh")


def stack_env(home: Path, **overrides: str) -> dict[str, str]:
    """The environment a test hands ``tools/stack.sh``: ours without the developer's MLflow,
    Airflow and mirror settings (the stack must not reach them), a private ``VTM_HOME``, free
    ports, this checkout's venv and a 5 s DAG refresh; ``overrides`` win."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "AIRFLOW", "DATA_MIRROR"))}
    env.update({"VTM_HOME": str(home), "MLFLOW_PORT": str(free_port()), "AIRFLOW_PORT": str(free_port()),
                "VENV": str(ROOT / ".venv"), "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5"})
    env.update(overrides)
    return env


def stack_shell(env: Mapping[str, str]) -> dict[str, str]:
    """What ``eval "$(tools/stack.sh env)"`` gives a person's shell on the stack ``env`` started."""
    out = subprocess.run(["bash", "-c", f'eval "$({STACK} env)" && env -0'], env=dict(env), capture_output=True,
                         check=True, timeout=60).stdout.decode()
    return dict(item.split("=", 1) for item in out.split("\0") if "=" in item)


@contextlib.contextmanager
def embedded_stack(env: Mapping[str, str]) -> Iterator[dict[str, str]]:
    """``tools/stack.sh up`` with ``env`` (from :func:`stack_env`); yields :func:`stack_shell`'s
    environment and always runs ``down`` afterwards."""
    try:
        subprocess.run([STACK, "up"], env=dict(env), check=True, timeout=600, capture_output=True, text=True)
        yield stack_shell(env)
    finally:
        subprocess.run([STACK, "down"], env=dict(env), timeout=300)


def dags_for_dag_test():
    """The repository's DAGs, for ``dag.test()``, deadlines kept: the guard that
    ``airflow dags test`` gets from dags/airflow_local_settings.py (Airflow 3.3.2's ``dag.test()``
    otherwise fails a successful run of a DAG with a ``DeadlineAlert``; common/airflow_guard.py)
    is installed in this process too. A fresh DagBag per call: a dag.test() conf sticks to the DAG
    object's Params in Airflow 3.3.
    """
    from airflow.dag_processing.dagbag import DagBag

    from common.airflow_guard import install_dag_test_guard

    install_dag_test_guard()
    return DagBag(str(ROOT / "dags"))
