"""A small client for the Airflow 3 REST API (``/api/v2``), standard library only.

Used by ``make demo`` and by the tests that drive a running stack the way a person or a CI job
would: log in, unpause, trigger, wait, read task results.
"""

from __future__ import annotations

import json
import secrets
import time
import urllib.error
import urllib.request
from datetime import UTC, datetime
from typing import Any

TERMINAL = {"success", "failed"}


class AirflowApiError(RuntimeError):
    pass


class AirflowClient:
    def __init__(self, base_url: str, username: str, password: str) -> None:
        self.base_url = base_url.rstrip("/")
        self.username, self.password = username, password
        self._token: str | None = None

    def login(self) -> str:
        """A fresh JWT for this user (what the UI's login page puts in its ``_token`` cookie)."""
        body = json.dumps({"username": self.username, "password": self.password}).encode()
        request = urllib.request.Request(f"{self.base_url}/auth/token", data=body, method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)["access_token"]

    # Reads and idempotent writes are retried when the server is slow or briefly failing: on the
    # busy 2-core machine the scheduler can hold the API server's request past the client timeout
    # (or fail it with a 5xx). A POST is
    # retried only when the caller made it idempotent (``retry=True``: e.g. a trigger with a run id
    # of its own, where a retry's 409 means an earlier try created the run).
    IDEMPOTENT = frozenset({"GET", "PATCH", "PUT", "DELETE"})
    ATTEMPTS = 4
    TIMEOUT = 60.0  # seconds for one request
    BACKOFF = 5.0  # seconds, times the attempt number

    def request(self, method: str, path: str, body: Any = None, ok_missing: bool = False,
                retry: bool | None = None) -> Any:
        retry = method in self.IDEMPOTENT if retry is None else retry
        attempts = self.ATTEMPTS if retry else 1
        login_retried = False
        attempt = 0
        while True:
            attempt += 1
            self._token = self._token or self.login()
            request = urllib.request.Request(
                f"{self.base_url}/api/v2{path}", method=method,
                data=None if body is None else json.dumps(body).encode(),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {self._token}"})
            try:
                with urllib.request.urlopen(request, timeout=self.TIMEOUT) as response:
                    payload = response.read()
                    return json.loads(payload) if payload else None
            except urllib.error.HTTPError as exc:
                if exc.code == 401 and not login_retried:  # token expired: log in again once
                    self._token, login_retried = None, True
                    attempt -= 1
                    continue
                if exc.code == 404 and ok_missing:
                    return None
                if exc.code == 409 and attempt > 1 and method == "POST":
                    return None  # an earlier, timed-out try of this same idempotent POST created it
                if exc.code >= 500 and attempt < attempts:
                    time.sleep(self.BACKOFF * attempt)
                    continue
                raise AirflowApiError(f"{method} {path}: HTTP {exc.code} {exc.read()[:500]!r}") from None
            # ConnectionError: a server that is starting may accept the connection and reset it.
            except (TimeoutError, ConnectionError, urllib.error.URLError) as exc:
                if attempt >= attempts:
                    raise AirflowApiError(f"{method} {path}: no answer after {attempt} tries: {exc}") from exc
                time.sleep(self.BACKOFF * attempt)

    def wait_for_dags(self, dag_ids: list[str], timeout: float = 300) -> None:
        """Until the dag-processor has parsed every DAG (or fail naming the missing ones)."""
        deadline = time.monotonic() + timeout
        while True:
            missing = [d for d in dag_ids if self.request("GET", f"/dags/{d}", ok_missing=True) is None]
            if not missing:
                return
            if time.monotonic() > deadline:
                errors = self.request("GET", "/importErrors")
                raise AirflowApiError(f"DAGs not loaded after {timeout}s: {missing}; import errors: {errors}")
            time.sleep(3)

    def unpause(self, dag_id: str) -> None:
        self.request("PATCH", f"/dags/{dag_id}", {"is_paused": False})

    def trigger(self, dag_id: str, conf: dict[str, Any] | None = None) -> str:
        """Start a run now; returns its id. The id is chosen here, so a POST that timed out on a
        busy server can be sent again without risking a second run."""
        run_id = f"manual__{datetime.now(UTC).isoformat()}_{secrets.token_hex(3)}"
        self.request("POST", f"/dags/{dag_id}/dagRuns",
                     {"dag_run_id": run_id, "logical_date": None, "conf": conf or {}}, retry=True)
        return run_id

    def dag_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}")

    def wait_for_runs(self, runs: dict[str, str], timeout: float) -> dict[str, dict[str, Any]]:
        """``runs`` maps dag_id -> run_id; returns each final run record."""
        deadline = time.monotonic() + timeout
        final: dict[str, dict[str, Any]] = {}
        while len(final) < len(runs):
            for dag_id, run_id in runs.items():
                if dag_id not in final:
                    record = self.dag_run(dag_id, run_id)
                    if record["state"] in TERMINAL:
                        final[dag_id] = record
            if len(final) < len(runs):
                if time.monotonic() > deadline:
                    pending = sorted(set(runs) - set(final))
                    raise AirflowApiError(f"runs still not finished after {timeout}s: {pending}")
                time.sleep(5)
        return final

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        return self.request("GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances")["task_instances"]

    def xcom(self, dag_id: str, run_id: str, task_id: str) -> Any:
        entry = self.request(
            "GET", f"/dags/{dag_id}/dagRuns/{run_id}/taskInstances/{task_id}/xcomEntries/return_value",
            ok_missing=True)
        if entry is None:
            return None
        value = entry.get("value")
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                import ast

                try:
                    return ast.literal_eval(value)
                except (ValueError, SyntaxError):
                    return value
        return value
