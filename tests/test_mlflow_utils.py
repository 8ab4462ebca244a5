"""Where the tracking server is, and what a run is tagged with (no server needed)."""

from __future__ import annotations

import json

from common import mlflow_utils
from common.mlflow_utils import AirflowIdentity


def test_environment_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5999")
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps({"conn_type": "http", "host": "other"}))
    assert mlflow_utils.tracking_uri() == "http://127.0.0.1:5999"


def test_airflow_connection_with_basic_auth(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps(
        {"conn_type": "http", "host": "mlflow", "port": 5000, "login": "ml", "password": "s3cret"}))
    assert mlflow_utils.tracking_uri() == "http://mlflow:5000"
    import os

    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "ml"
    monkeypatch.setenv("AIRFLOW_CONN_MLFLOW_DEFAULT", json.dumps(
        {"conn_type": "http", "extra": {"tracking_uri": "https://mlflow.example.org"}}))
    assert mlflow_utils.tracking_uri() == "https://mlflow.example.org"


def test_default_is_local(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("AIRFLOW_CONN_MLFLOW_DEFAULT", raising=False)
    assert mlflow_utils.tracking_uri() == "http://127.0.0.1:5000"


def test_identity_tags_link_back_to_airflow(monkeypatch):
    monkeypatch.setenv("AIRFLOW__API__BASE_URL", "http://127.0.0.1:8080/")
    who = AirflowIdentity("power_lgbm_training", "manual__1", "train", 3, "2026-11-22T00:00:00+00:00")
    tags = who.tags()
    assert tags["airflow.try_number"] == "3"
    assert tags["airflow.url"] == "http://127.0.0.1:8080/dags/power_lgbm_training/runs/manual__1"


def test_git_commit_names_the_code(monkeypatch):
    monkeypatch.setenv("VTM_GIT_COMMIT", "abc123")
    assert mlflow_utils.git_commit() == "abc123"
    monkeypatch.delenv("VTM_GIT_COMMIT")
    commit = mlflow_utils.git_commit()
    assert commit == "unknown" or len(commit.split("-")[0]) == 40
