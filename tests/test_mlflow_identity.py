"""MLflow identities against a real MLflow server with basic auth (default_permission = READ).

The service user created by the bootstrap owns every workflow's experiment and registered model;
a person the admin creates (no grants) reads them but can neither squat their names nor write
them (aliases, version tags, metrics: 403); a workflow refuses an experiment or model that the
service user does not own (as the service user: its permission named; as the admin: the owner
named). One server for the module (~10 s); the bootstrap runs once more through its CLI.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time

import pytest

from common import config, mlflow_auth, mlflow_identity
from common.mlflow_auth import EXPERIMENT, REGISTERED_MODEL, Login, OwnershipError
from common.mlflow_identity import BootstrapError, Resource
from tests.helpers import ROOT, free_port, stop_group, wait_http

SERVICE = "vtm-workflows"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """MLflow's basic-auth app as tools/stack.sh configures it (SQLite stores here); yields
    (admin login, service login with a password not yet on the server)."""
    home = tmp_path_factory.mktemp("mlflow-auth")
    (home / "auth.ini").write_text(
        "[mlflow]\ndefault_permission = READ\n"
        f"database_uri = sqlite:///{home}/auth.db\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
        "auth_cache_ttl_seconds = 300\n")  # as tools/stack.sh: one password hash per user, not per request
    admin_password = secrets.token_urlsafe(16)
    env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(home / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": admin_password, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_urlsafe(16)}
    port = free_port()
    log = home / "server.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--backend-store-uri", f"sqlite:///{home}/mlflow.db",
             "--artifacts-destination", str(home / "artifacts"), "--serve-artifacts"],
            stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_http(f"{uri}/health", 120, proc, log)
        yield Login(uri, "admin", admin_password), Login(uri, SERVICE, secrets.token_urlsafe(16))
    finally:
        stop_group(proc)


@pytest.fixture(autouse=True)
def fresh_cache():
    mlflow_auth.forget_verified()
    yield
    mlflow_auth.forget_verified()


def person(admin: Login, name: str) -> Login:
    """A user the admin creates, as a team would: no grants of its own."""
    password = secrets.token_urlsafe(16)
    admin.call("POST", "/api/2.0/mlflow/users/create", "create user", json={"username": name, "password": password})
    return Login(admin.uri, name, password)


def as_login(monkeypatch, login: Login) -> None:
    """MLflow's client (and so the workflow code) logs in as ``login`` from here on."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", login.uri)
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", login.username or "")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", login.password or "")


def refusal(excinfo) -> str:
    """The OwnershipError's text, whether raised as is or as Airflow's no-retry failure."""
    exc = excinfo.value
    cause = exc if isinstance(exc, OwnershipError) else exc.__cause__
    assert isinstance(cause, OwnershipError), repr(exc)
    if not isinstance(exc, OwnershipError):
        from airflow.sdk.exceptions import AirflowFailException

        assert isinstance(exc, AirflowFailException)  # fails the task now: no retries
    return str(cause)


def test_bootstrap_then_people_read_only(server, monkeypatch):
    admin, service = server
    first = mlflow_identity.bootstrap(admin, service)
    resources = mlflow_identity.workflow_resources()
    assert {r.name for r in resources} == ({c.experiment for c in config.WORKFLOWS.values()}
                                           | {c.model_name for c in config.WORKFLOWS.values()})
    assert first[0] == f"MLflow user {SERVICE}: created"
    assert all(line.endswith(": created") for line in first[1:]) and len(first) == len(resources) + 1
    again = mlflow_identity.bootstrap(admin, service)  # idempotent
    assert again[0] == f"MLflow user {SERVICE}: exists" and all(line.endswith(": kept") for line in again[1:])

    alice = person(admin, "alice")
    # Squatting a workflow's name after the bootstrap: it exists.
    status, body = alice.request("POST", "/api/2.0/mlflow/experiments/create", json={"name": "mnist-cnn"})
    assert status == 400 and body["error_code"] == "RESOURCE_ALREADY_EXISTS"
    status, body = alice.request("POST", "/api/2.0/mlflow/registered-models/create", json={"name": "mnist_cnn"})
    assert status == 400 and body["error_code"] == "RESOURCE_ALREADY_EXISTS"

    # The workflow, as the service user, logs a run and registers a version into its own.
    import mlflow
    from mlflow import MlflowClient

    from common import mlflow_utils

    as_login(monkeypatch, service)
    experiment_id = mlflow_utils.ensure_experiment("mnist-cnn")
    mlflow_auth.require_owned(REGISTERED_MODEL, "mnist_cnn")
    client = MlflowClient(service.uri)
    run = client.create_run(experiment_id)
    client.log_metric(run.info.run_id, "test_accuracy", 0.5)
    version = client.create_model_version("mnist_cnn", f"runs:/{run.info.run_id}/model", run.info.run_id).version
    assert mlflow.get_tracking_uri() == service.uri

    # alice reads, and cannot write: the background's alias, governance tag and metric -> 403.
    run_id = run.info.run_id
    assert alice.request("GET", "/api/2.0/mlflow/runs/get", params={"run_id": run_id})[0] == 200
    assert alice.request("GET", "/api/2.0/mlflow/registered-models/get", params={"name": "mnist_cnn"})[0] == 200
    writes = [
        ("POST", "/api/2.0/mlflow/registered-models/alias",
         {"json": {"name": "mnist_cnn", "alias": "champion", "version": version}}),
        ("POST", "/api/2.0/mlflow/model-versions/set-tag",
         {"json": {"name": "mnist_cnn", "version": version, "key": "decision", "value": "promoted"}}),
        ("POST", "/api/2.0/mlflow/runs/log-metric",
         {"json": {"run_id": run_id, "key": "test_accuracy", "value": 0.99, "timestamp": int(time.time() * 1000),
                   "step": 0}}),
    ]
    for method, endpoint, kwargs in writes:
        assert alice.request(method, endpoint, **kwargs)[0] == 403, endpoint
    for value, login in ((0.6, service), (0.7, admin)):
        writes[2][2]["json"]["value"] = value
        for method, endpoint, kwargs in writes:
            assert login.request(method, endpoint, **kwargs)[0] == 200, (login.username, endpoint)
    deletes = [("/api/2.0/mlflow/registered-models/alias", {"name": "mnist_cnn", "alias": "champion"}),
               ("/api/2.0/mlflow/model-versions/delete-tag", {"name": "mnist_cnn", "version": version,
                                                              "key": "decision"})]
    for endpoint, params in deletes:  # nor may she delete what the service user set
        assert alice.request("DELETE", endpoint, json=params)[0] == 403, endpoint
        assert service.request("DELETE", endpoint, json=params)[0] == 200, endpoint
    history = client.get_metric_history(run_id, "test_accuracy")
    assert sorted(m.value for m in history) == [0.5, 0.6, 0.7]  # not alice's 0.99


def test_the_workflow_refuses_what_a_person_owns(server, monkeypatch):
    admin, service = server
    mlflow_identity.bootstrap(admin, service, resources=[])  # the service user only
    bob = person(admin, "bob")
    # bob creates a workflow's experiment and model before the bootstrap knows them (a new workflow).
    status, body = bob.request("POST", "/api/2.0/mlflow/experiments/create", json={"name": "new-wf"})
    assert status == 200
    experiment_id = body["experiment_id"]
    assert bob.request("POST", "/api/2.0/mlflow/registered-models/create", json={"name": "new_wf"})[0] == 200
    squatted = [Resource(EXPERIMENT, "new-wf"), Resource(REGISTERED_MODEL, "new_wf")]
    for resource in squatted:
        with pytest.raises(BootstrapError, match=rf"{resource.name}'? already exists .*: bob \(MANAGE, its owner\)"):
            mlflow_identity.bootstrap(admin, service, resources=[resource])

    from common import mlflow_utils

    as_login(monkeypatch, service)  # a task: it cannot see who owns it, and says why
    with pytest.raises(Exception) as excinfo:
        mlflow_utils.ensure_experiment("new-wf")
    text = refusal(excinfo)
    assert f"experiment 'new-wf' (id {experiment_id}) is not owned by the workflows' MLflow user 'vtm-workflows'" in text
    assert "(its permission there: READ)" in text and "python -m common.mlflow_identity owners" in text
    with pytest.raises(Exception) as excinfo:
        mlflow_auth.require_owned(REGISTERED_MODEL, "new_wf")
    assert "registered model 'new_wf' is not owned by" in refusal(excinfo)

    as_login(monkeypatch, admin)  # an operator's shell: the admin can name the owner
    with pytest.raises(Exception) as excinfo:
        mlflow_utils.ensure_experiment("new-wf")
    assert "may be written by MLflow users other than the workflows' 'vtm-workflows': bob (MANAGE, its owner)" \
        in refusal(excinfo)
    assert mlflow_identity.owners(admin, Resource(REGISTERED_MODEL, "new_wf")) == {"bob": "MANAGE"}

    as_login(monkeypatch, bob)  # a person's own login is not the workflows'
    with pytest.raises(Exception) as excinfo:
        mlflow_auth.require_owned(REGISTERED_MODEL, "new_wf")
    assert "logged in to MLflow as 'bob', neither the workflows' user" in refusal(excinfo)


def test_bootstrap_cli_names_the_owner_and_adopts_what_an_admin_created(server, tmp_path):
    admin, service = server
    mlflow_identity.bootstrap(admin, service)
    # Created by the admin (how the workflows logged in before they had a user): adopted.
    assert admin.request("POST", "/api/2.0/mlflow/experiments/create", json={"name": "admin-made"})[0] == 200
    assert mlflow_identity.ensure_resource(admin, service, Resource(EXPERIMENT, "admin-made")) \
        == "adopted (created by an admin)"
    mlflow_auth.require_owned(EXPERIMENT, mlflow_identity._find(admin, Resource(EXPERIMENT, "admin-made"))[0],
                              login=service)
    # A workflow's model deleted, then taken by a person: the CLI (what stack.sh runs) says who.
    model = config.WORKFLOWS["tick_model_training"].model_name
    assert admin.request("DELETE", "/api/2.0/mlflow/registered-models/delete", json={"name": model})[0] == 200
    carol = person(admin, "carol")
    assert carol.request("POST", "/api/2.0/mlflow/registered-models/create", json={"name": model})[0] == 200
    for name, login in (("admin", admin), ("service", service)):
        (tmp_path / name).write_text(login.password or "")
        (tmp_path / name).chmod(0o600)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(ROOT / "dags")
    result = subprocess.run(
        [sys.executable, "-m", "common.mlflow_identity", "bootstrap", "--tracking-uri", admin.uri,
         "--admin-user", "admin", "--admin-password-file", str(tmp_path / "admin"),
         "--service-password-file", str(tmp_path / "service")],
        capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 1, result
    assert result.stderr.strip().count("\n") == 0  # one line
    assert f"registered model '{model}' already exists and other MLflow users may write it: carol (MANAGE" \
        in result.stderr
    assert admin.password not in result.stdout + result.stderr
    assert (service.password or "x") not in result.stdout + result.stderr
