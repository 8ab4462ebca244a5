"""The compose file's PostgreSQL init script, run for real against PostgreSQL on 127.0.0.1: it
creates the Airflow and MLflow roles and their separate databases, with the passwords from .env."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.deploy import compose as dc
from tools import deploy_env
from tools.cluster import Cluster, pg_bin_dir

pytestmark = pytest.mark.e2e


def test_postgres_init_script_creates_each_role_and_database(model, env_file, tmp_path):
    import psycopg2

    script = dc.unescape(model["configs"]["postgres-init"]["content"])
    env = deploy_env.parse_env(env_file.read_text())
    cluster = Cluster(tmp_path, workers=[])
    try:
        cluster.start_postgres(databases=())
        run = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=60, env={
            "PATH": f"{pg_bin_dir()}{os.pathsep}{os.environ['PATH']}", "POSTGRES_USER": "vtm",
            "POSTGRES_DB": "postgres", "PGHOST": "127.0.0.1", "PGPORT": str(cluster.pg_port),
            "PGPASSWORD": cluster.db_password, "AIRFLOW_DB_PASSWORD": env["AIRFLOW_DB_PASSWORD"],
            "MLFLOW_DB_PASSWORD": env["MLFLOW_DB_PASSWORD"]})
        assert run.returncode == 0, run.stderr

        def connect(user: str, password: str, database: str):
            return psycopg2.connect(host="127.0.0.1", port=cluster.pg_port, user=user, password=password,
                                    dbname=database)

        for user, database in (("airflow", "airflow"), ("mlflow", "mlflow"), ("mlflow", "mlflow_auth")):
            conn = connect(user, env[f"{user.upper()}_DB_PASSWORD"], database)
            with conn.cursor() as cur:
                cur.execute("SELECT pg_catalog.pg_get_userbyid(datdba) FROM pg_database WHERE datname = %s",
                            (database,))
                assert cur.fetchone() == (user,)
                cur.execute("CREATE TABLE probe (x int)")  # the owner can build its schema
            conn.rollback()
            conn.close()
        with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
            connect("airflow", env["MLFLOW_DB_PASSWORD"], "airflow")
    finally:
        cluster.stop()
