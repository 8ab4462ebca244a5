"""The workflows' MLflow identity: their service user, and their experiments and models, owned by it.

    python -m common.mlflow_identity bootstrap [--tracking-uri URI] [--admin-user admin]
        [--admin-password-file FILE] [--service-user vtm-workflows] [--service-password-file FILE]
    python -m common.mlflow_identity owners experiment|registered_model NAME

``bootstrap`` is what ``tools/stack.sh up``, ``tools/cluster.py`` and the compose deployment's
``airflow-init`` run once MLflow is up and before any Airflow part starts (idempotent):

1. with the admin login, creates the service user, or sets its password to the given one;
2. with the service user's login, creates every workflow's experiment and registered model
   (``common.config.WORKFLOWS``) that does not exist yet: MLflow makes the creator their owner
   (MANAGE), and the server's ``default_permission = READ`` leaves everyone else reading;
3. one that exists already must be writable by nobody but the service user and the admins (who
   may have created it: the workflows logged in as the admin before this module existed; the
   service user then gets MANAGE on it). Otherwise it exits 1 with one line naming the users who
   may write it.

Passwords come from files (``--*-password-file``, the embedded stack's ``$VTM_HOME/secrets``) or
from the environment (``MLFLOW_ADMIN_PASSWORD``, ``MLFLOW_SERVICE_PASSWORD``: compose's .env),
never from the command line, and are printed nowhere. The admin user name comes from
``--admin-user`` or ``MLFLOW_ADMIN_USERNAME``, the service user's from ``--service-user`` or
``VTM_MLFLOW_SERVICE_USER``, the server from ``--tracking-uri`` or ``MLFLOW_TRACKING_URI``.

``owners`` (admin login from the environment, as ``tools/stack.sh env`` sets it) names the users
other than the admins who may write an experiment or model: what a task's refusal cannot name.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from common import config
from common.mlflow_auth import (
    EXPERIMENT,
    OWNER,
    REGISTERED_MODEL,
    AuthRequestError,
    Login,
    current_user,
    describe,
    foreign_writers,
    permission,
    service_user,
)

ADMIN_USER_ENV, ADMIN_PASSWORD_ENV = "MLFLOW_ADMIN_USERNAME", "MLFLOW_ADMIN_PASSWORD"
SERVICE_PASSWORD_ENV = "MLFLOW_SERVICE_PASSWORD"

_USERS_CREATE = "/api/2.0/mlflow/users/create"
_USERS_GET = "/api/2.0/mlflow/users/get"
_USERS_PASSWORD = "/api/2.0/mlflow/users/update-password"
_GRANT = "/api/3.0/mlflow/users/permissions/grant"
_EXPERIMENT_BY_NAME = "/api/2.0/mlflow/experiments/get-by-name"
_EXPERIMENT_CREATE = "/api/2.0/mlflow/experiments/create"
_EXPERIMENT_RESTORE = "/api/2.0/mlflow/experiments/restore"
_MODEL_GET = "/api/2.0/mlflow/registered-models/get"
_MODEL_CREATE = "/api/2.0/mlflow/registered-models/create"


class BootstrapError(RuntimeError):
    """One line: what is wrong and with which experiment, model or user."""


@dataclass(frozen=True)
class Resource:
    resource_type: str  # mlflow_auth.EXPERIMENT or REGISTERED_MODEL
    name: str

    @property
    def label(self) -> str:
        return f"{'experiment' if self.resource_type == EXPERIMENT else 'registered model'} {self.name!r}"


def workflow_resources() -> list[Resource]:
    """Every workflow's experiment and registered model, from config.WORKFLOWS."""
    found: list[Resource] = []
    for cfg in config.WORKFLOWS.values():
        for resource in (Resource(EXPERIMENT, cfg.experiment), Resource(REGISTERED_MODEL, cfg.model_name)):
            if resource not in found:
                found.append(resource)
    return found


def ensure_user(admin: Login, username: str, password: str) -> str:
    """The user exists and logs in with ``password``; returns what was done."""
    status, _ = Login(admin.uri, username, password).request("GET", "/api/2.0/mlflow/users/current")
    if status == 200:
        return "exists"
    status, body = admin.request("GET", _USERS_GET, params={"username": username})
    if status == 200:
        admin.call("PATCH", _USERS_PASSWORD, f"set the password of MLflow user {username!r}",
                   json={"username": username, "password": password})
        return "password set"
    if status != 404:
        raise AuthRequestError(f"look up MLflow user {username!r}", status, str(body.get("message") or body))
    admin.call("POST", _USERS_CREATE, f"create MLflow user {username!r}",
               json={"username": username, "password": password})
    return "created"


def _find(login: Login, resource: Resource) -> tuple[str, bool] | None:
    """(id, deleted) of the experiment or model named ``resource.name``; None when there is none."""
    if resource.resource_type == EXPERIMENT:
        status, body = login.request("GET", _EXPERIMENT_BY_NAME, params={"experiment_name": resource.name})
        if status == 200:
            experiment = body["experiment"]
            return experiment["experiment_id"], experiment.get("lifecycle_stage") == "deleted"
    else:
        status, body = login.request("GET", _MODEL_GET, params={"name": resource.name})
        if status == 200:
            return resource.name, False
    if status == 404:
        return None
    raise AuthRequestError(f"look up {resource.label}", status, str(body.get("message") or body))


def _create(service: Login, resource: Resource) -> bool:
    """Create as the service user; False when someone created it meanwhile."""
    if resource.resource_type == EXPERIMENT:
        status, body = service.request("POST", _EXPERIMENT_CREATE, json={"name": resource.name})
    else:
        status, body = service.request("POST", _MODEL_CREATE, json={"name": resource.name})
    if status == 200:
        return True
    if body.get("error_code") == "RESOURCE_ALREADY_EXISTS":
        return False
    raise AuthRequestError(f"create {resource.label} as {service.username!r}", status,
                           str(body.get("message") or body))


def ensure_resource(admin: Login, service: Login, resource: Resource) -> str:
    """The experiment or model exists and is the service user's; returns what was done."""
    found = _find(admin, resource)
    if found is None and _create(service, resource):
        return "created"
    found = found or _find(admin, resource)
    if found is None:
        raise BootstrapError(f"{resource.label} was created by someone else and is gone again: run bootstrap again")
    resource_id, deleted = found
    assert service.username is not None
    writers = foreign_writers(admin, resource.resource_type, resource_id, service.username)
    if writers:
        raise BootstrapError(
            f"{resource.label} already exists and other MLflow users may write it: {describe(writers)}; "
            f"the workflows write only into their own (delete or rename it, or revoke those permissions)")
    done = "kept"
    if permission(admin, service.username, resource.resource_type, resource_id) != OWNER:
        # Created by an admin (the workflows' login before they had their own user): adopted.
        admin.call("POST", _GRANT, f"grant {service.username!r} MANAGE on {resource.label}",
                   json={"username": service.username, "resource_type": resource.resource_type,
                         "resource_id": resource_id, "permission": OWNER})
        done = "adopted (created by an admin)"
    if deleted:
        service.call("POST", _EXPERIMENT_RESTORE, f"restore {resource.label}", json={"experiment_id": resource_id})
        done += ", restored"
    return done


def bootstrap(admin: Login, service: Login, resources: Iterable[Resource] | None = None) -> list[str]:
    """Service user, then every resource; returns one line per step. Raises BootstrapError."""
    if service.username is None or not service.password:
        raise BootstrapError("the service user needs a name and a password")
    me = current_user(admin)
    if me is None:
        raise BootstrapError(f"MLflow at {admin.uri} runs without basic auth: there are no users to set up")
    if not me.is_admin:
        raise BootstrapError(f"MLflow user {me.username!r} is not an admin: bootstrap needs the admin login")
    lines = [f"MLflow user {service.username}: {ensure_user(admin, service.username, service.password)}"]
    for resource in workflow_resources() if resources is None else resources:
        lines.append(f"{resource.label}: {ensure_resource(admin, service, resource)}")
    return lines


def owners(admin: Login, resource: Resource) -> dict[str, str]:
    """Users other than the admins who may write the resource: {user: permission} (admin login)."""
    found = _find(admin, resource)
    if found is None:
        raise BootstrapError(f"there is no {resource.label}")
    return foreign_writers(admin, resource.resource_type, found[0], service="")


def _password(file: str | None, variable: str) -> str:
    if file:
        return Path(file).read_text().strip()
    if value := os.environ.get(variable):
        return value
    raise BootstrapError(f"no password: give a file or set {variable}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.mlflow_identity",
                                     description=__doc__.split("\n", 1)[0])
    sub = parser.add_subparsers(dest="command", required=True)
    boot = sub.add_parser("bootstrap", help="service user, then every workflow's experiment and model")
    boot.add_argument("--tracking-uri", default=os.environ.get("MLFLOW_TRACKING_URI"))
    boot.add_argument("--admin-user", default=os.environ.get(ADMIN_USER_ENV, "admin"))
    boot.add_argument("--admin-password-file")
    boot.add_argument("--service-user", default=service_user())
    boot.add_argument("--service-password-file")
    own = sub.add_parser("owners", help="who other than the admins may write an experiment or model")
    own.add_argument("resource_type", choices=(EXPERIMENT, REGISTERED_MODEL))
    own.add_argument("name")
    args = parser.parse_args(argv)
    try:
        if args.command == "owners":
            uri = os.environ.get("MLFLOW_TRACKING_URI")
            if not uri:
                raise BootstrapError("set MLFLOW_TRACKING_URI and the admin login (eval \"$(tools/stack.sh env)\")")
            writers = owners(Login.from_environment(uri), Resource(args.resource_type, args.name))
            print(describe(writers) if writers else "nobody but the admins")
            return 0
        if not args.tracking_uri:
            raise BootstrapError("no MLflow server: give --tracking-uri or set MLFLOW_TRACKING_URI")
        uri = args.tracking_uri.rstrip("/")
        admin = Login(uri, args.admin_user, _password(args.admin_password_file, ADMIN_PASSWORD_ENV))
        service = Login(uri, args.service_user, _password(args.service_password_file, SERVICE_PASSWORD_ENV))
        for line in bootstrap(admin, service):
            print(line)
        return 0
    except (BootstrapError, AuthRequestError, OSError) as exc:
        print(f"mlflow_identity {args.command}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
