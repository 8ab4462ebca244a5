"""Who may write the workflows' MLflow experiments and registered models (MLflow's basic-auth app).

Three kinds of MLflow identity (docs/operations.md, "MLflow identities"):

* the workflows' **service user** (``VTM_MLFLOW_SERVICE_USER``, default ``vtm-workflows``): what
  Airflow tasks log in with. It creates every workflow's experiment and registered model before
  anyone else can (``common.mlflow_identity``), and MLflow grants a creator ``MANAGE``;
* the **admin**: the stack's and the operator's login; MLflow lets it do everything;
* **people**: users the admin creates. The server's ``default_permission`` is ``READ``, so they
  read the workflows' experiments and models but cannot log into their runs, register versions,
  set or delete aliases (``champion``, ``challenger``) or tags (``decision``, ``decided_by``...).

:func:`require_owned` is the workflow's side: before a task logs into an experiment or registers
into a model it checks, once per task process, that the service user owns it, and refuses with a
permanent error otherwise. A server without basic auth (the tests' plain MLflow) has no owners:
the check passes there.

This module speaks MLflow's REST API directly, with explicit credentials (``Login``), so that one
process can act as the admin and as the service user (the bootstrap); the workflow's own login is
the one MLflow's client reads (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``). It imports nothing of
Airflow except, lazily, the exception that fails a task without retries.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any

from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import MlflowHostCreds, http_request

from scripts.core.errors import PipelineError

log = logging.getLogger(__name__)

SERVICE_USER_ENV = "VTM_MLFLOW_SERVICE_USER"
DEFAULT_SERVICE_USER = "vtm-workflows"
EXPERIMENT, REGISTERED_MODEL = "experiment", "registered_model"
# Permissions that let a user change a resource (log into an experiment's runs; register versions,
# set aliases and tags on a model). OWNER is what MLflow grants the creator.
WRITE_PERMISSIONS = frozenset({"EDIT", "MANAGE"})
OWNER = "MANAGE"

_USERS_CURRENT = "/api/2.0/mlflow/users/current"
_USERS_LIST = "/api/2.0/mlflow/users/list"
_USER_PERMISSION = "/api/3.0/mlflow/users/permissions/get"


class OwnershipError(PipelineError):
    """A workflow's experiment or registered model is not the service user's, or the login a
    workflow runs under may not write it. Permanent: another try meets the same owner."""


class AuthRequestError(RuntimeError):
    """An MLflow auth request failed (status and MLflow's message); not a verdict on ownership."""

    def __init__(self, what: str, status: int, body: str) -> None:
        self.status = status
        super().__init__(f"{what}: HTTP {status}: {body[:300]}")


@dataclass(frozen=True)
class Login:
    """An MLflow server and who to log in to it as (password never in ``repr``)."""

    uri: str
    username: str | None = None
    password: str | None = None

    def __repr__(self) -> str:
        return f"Login({self.uri!r}, {self.username!r})"

    @classmethod
    def from_environment(cls, uri: str) -> Login:
        """What MLflow's own client logs in with (``MLFLOW_TRACKING_USERNAME``/``PASSWORD``)."""
        creds = get_default_host_creds(uri)
        return cls(uri.rstrip("/"), creds.username, creds.password)

    def request(self, method: str, endpoint: str, **kwargs: Any) -> tuple[int, dict[str, Any]]:
        """(status, JSON body); transient failures are retried by MLflow's HTTP layer."""
        creds = MlflowHostCreds(self.uri.rstrip("/"), username=self.username, password=self.password)
        resp = http_request(creds, endpoint, method, max_retries=3, backoff_factor=1, timeout=30,
                            raise_on_status=False, **kwargs)
        try:
            body = resp.json() if resp.content else {}
        except ValueError:
            body = {"message": resp.text[:300]}
        return resp.status_code, body if isinstance(body, dict) else {}

    def call(self, method: str, endpoint: str, what: str, **kwargs: Any) -> dict[str, Any]:
        status, body = self.request(method, endpoint, **kwargs)
        if status != 200:
            raise AuthRequestError(what, status, str(body.get("message") or body))
        return body


def service_user() -> str:
    return os.environ.get(SERVICE_USER_ENV) or DEFAULT_SERVICE_USER


@dataclass(frozen=True)
class Identity:
    username: str
    is_admin: bool


def current_user(login: Login) -> Identity | None:
    """Who ``login`` is; None when the server has no basic auth (no such endpoint)."""
    status, body = login.request("GET", _USERS_CURRENT)
    if status == 404 and "user" not in body:
        return None
    if status != 200:
        raise AuthRequestError(f"who is {login.username!r} on {login.uri}", status, str(body.get("message") or body))
    user = body["user"]
    return Identity(user["username"], bool(user.get("is_admin")))


def permission(login: Login, username: str, resource_type: str, resource_id: str) -> str:
    """``username``'s effective permission on one resource, as the server resolves it for a real
    request (READ, EDIT, MANAGE, ...). ``login`` must be that user or an admin."""
    body = login.call("GET", _USER_PERMISSION, f"{username}'s permission on {resource_type} {resource_id}",
                      params={"username": username, "resource_type": resource_type, "resource_id": resource_id})
    return str(body.get("permission") or "")


def users(admin: Login) -> list[Identity]:
    """Every user of the server (admin only)."""
    body = admin.call("GET", _USERS_LIST, "list MLflow users")
    return [Identity(u["username"], bool(u.get("is_admin"))) for u in body.get("users") or []]


def foreign_writers(admin: Login, resource_type: str, resource_id: str, service: str) -> dict[str, str]:
    """Users other than ``service`` and the admins who may write the resource: {user: permission}.

    An admin's view (MLflow keeps no owner field on an experiment or model: the owner is whoever
    holds MANAGE on it, which the creator gets)."""
    found = {}
    for user in users(admin):
        if user.is_admin or user.username == service:
            continue
        perm = permission(admin, user.username, resource_type, resource_id)
        if perm in WRITE_PERMISSIONS:
            found[user.username] = perm
    return found


def describe(writers: dict[str, str]) -> str:
    return ", ".join(f"{user} ({perm}{', its owner' if perm == OWNER else ''})"
                     for user, perm in sorted(writers.items()))


def _label(resource_type: str, name: str, resource_id: str) -> str:
    kind = "experiment" if resource_type == EXPERIMENT else "registered model"
    return f"{kind} {name!r}" + (f" (id {resource_id})" if resource_id != name else "")


def ownership_problem(login: Login, resource_type: str, resource_id: str, name: str) -> str | None:
    """Why the workflow logged in as ``login`` must not write this resource, or None when it may.

    * as the service user: it must hold MANAGE (it created the resource, or the stack's bootstrap
      adopted it). Who else owns it cannot be said from here: MLflow shows a user's permissions
      and the user list only to that user and to admins, and a task never holds the admin's
      password. The message says so and how an admin finds out; the stack's bootstrap (run with
      the admin login) names the owner;
    * as an admin (an operator's shell: ``airflow dags test``, the CLIs): no user other than the
      service user and the admins may write it; the message names who does;
    * as anyone else: refused (a person's login is not the workflows' identity).
    """
    me = current_user(login)
    if me is None:  # no basic auth on this server: no identities, nothing to check
        return None
    service = service_user()
    what = _label(resource_type, name, resource_id)
    if me.username == service:
        perm = permission(login, service, resource_type, resource_id)
        if perm == OWNER:
            return None
        return (f"{what} is not owned by the workflows' MLflow user {service!r} (its permission there: "
                f"{perm or 'none'}): another user created it. MLflow names users' permissions only to "
                f"admins, so the owner cannot be read with {service!r}'s login; an admin can: "
                f"python -m common.mlflow_identity owners {resource_type} {name!r}. The workflow writes "
                f"only into its own experiment and model: delete or rename that one, then let "
                f"tools/stack.sh up (or the compose init) create it again")
    if me.is_admin:
        writers = foreign_writers(login, resource_type, resource_id, service)
        if not writers:
            return None
        return (f"{what} may be written by MLflow users other than the workflows' {service!r}: "
                f"{describe(writers)}. The workflow writes only into an experiment or model that no "
                f"person owns: revoke their permission, or delete or rename it and let "
                f"tools/stack.sh up (or the compose init) create it again")
    return (f"logged in to MLflow as {me.username!r}, neither the workflows' user {service!r} nor an "
            f"admin: the workflows write {what} as {service!r} only ({SERVICE_USER_ENV})")


_verified: set[tuple[str, str | None, str, str]] = set()


def require_owned(resource_type: str, resource_id: str, name: str | None = None,
                  login: Login | None = None) -> None:
    """Refuse (``OwnershipError``; inside Airflow, a task failure without retries) unless the
    workflow may write this experiment (``resource_id``: its id) or registered model (its name).

    Checked once per process and resource: a task asks once, whatever it logs afterwards.
    """
    if login is None:
        import mlflow

        login = Login.from_environment(mlflow.get_tracking_uri())
    if not login.uri.startswith(("http://", "https://")):
        return  # a local file or database store: no server, no users
    key = (login.uri, login.username, resource_type, resource_id)
    if key in _verified:
        return
    problem = ownership_problem(login, resource_type, resource_id, name or resource_id)
    if problem is None:
        _verified.add(key)
        return
    error = OwnershipError(problem)
    if "airflow.sdk" in sys.modules:  # inside Airflow (a task, dag.test): fail now, no retries
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"{type(error).__name__}: {error}") from error
    raise error


def forget_verified() -> None:
    """Drop the per-process cache (tests)."""
    _verified.clear()
