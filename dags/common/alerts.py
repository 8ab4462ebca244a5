"""Airflow notifiers for the project's alert channels, the callbacks every DAG uses (failure,
retry, success), the workflows' deadline callback, and which failures are worth a retry.

Channels are Airflow connections, so credentials live in the secrets backend, never in code. Each
is read when a notifier fires, not when a DAG is parsed:

* ``alerts_slack``   - Slack incoming webhook; URL in extra ``url`` (or host/schema/port/extra
  ``path``). Posts ``{"text": ...}``.
* ``alerts_smtp``    - e-mail through the smtp provider's ``SmtpNotifier`` (an Airflow SMTP
  connection: host, port, login, password, extras ``from_email``, ``disable_ssl``,
  ``disable_tls``, ``timeout``, ``retry_limit``) plus extra ``to`` (comma list) for the recipients.
* ``alerts_webhook`` - generic webhook; receives the whole alert as JSON (``event``, ``dag_id``,
  ``run_id``, ``task_id``, ``text``, ...).

``notifiers()`` gives one ``BaseNotifier`` per channel. They serve as task callbacks (through
``on_failure`` / ``on_retry``, which also close the MLflow run), as the approval step's
``notifiers=`` (the message then says a decision waits, with the link to the form), and as the
deadline callback (``deadline_missed``, awaited in the triggerer). ``notify_message`` sends a
free-form message from code that is not a callback. A notifier whose connection does not exist
does nothing but log one line; a channel that fails to send logs the error and never raises: a
broken alert must not hide the task's real outcome.

A task that fails for good also closes its MLflow run: ``mark_mlflow_run_failed`` finds the run by
its Airflow tags and ends it FAILED with a ``failure_reason`` tag. ``mlflow_utils.task_run`` already
ends a run FAILED when the task raises, but a task killed (SIGKILL, OOM, lost heartbeat: Airflow
then runs this callback in the DAG processor) or timed out mid-request leaves it RUNNING forever,
and neither path said why the run failed.

Standard library only at import: DAG files import this module at parse time (through
``common.config``), so Airflow's notifier base, the smtp provider and MLflow are imported only when
a notifier is built or a callback runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html
import json
import logging
import os
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import Any

from scripts.core.errors import DataValidationError, ParameterError, TrainingError

log = logging.getLogger(__name__)

SLACK_CONN_ID, SMTP_CONN_ID, WEBHOOK_CONN_ID = "alerts_slack", "alerts_smtp", "alerts_webhook"
CHANNELS = (SLACK_CONN_ID, SMTP_CONN_ID, WEBHOOK_CONN_ID)

# What an alert is about (its ``event``, the webhook's ``event`` field).
FAILED, UP_FOR_RETRY, SUCCESS = "failed", "up_for_retry", "success"
APPROVAL_NEEDED, DEADLINE_MISSED, MESSAGE = "approval_needed", "deadline_missed", "message"


@dataclass(frozen=True)
class Alert:
    state: str  # one of the events above
    dag_id: str
    task_id: str
    run_id: str
    try_number: int
    message: str
    log_url: str = ""
    subject: str = ""  # a headline of its own (free-form messages); else one is built
    extra: dict[str, Any] = field(default_factory=dict)

    def headline(self) -> str:
        if self.subject:
            return self.subject
        what = f"{self.dag_id}.{self.task_id}" if self.task_id else self.dag_id
        where = [f"run {self.run_id}"] if self.run_id else []
        if self.try_number:
            where.append(f"try {self.try_number}")
        return f"[{self.state.upper()}] {what}" + (f" ({', '.join(where)})" if where else "")

    def text(self) -> str:
        line = self.headline()
        if self.message:
            line += f"\n{self.message}" if self.subject else f": {self.message}"
        if self.log_url:
            line += f"\n{self.log_url}"
        return line

    def payload(self) -> dict[str, Any]:
        """The webhook's JSON body."""
        body = asdict(self)
        body["event"] = body.pop("state")
        return {**body, "state": self.state, "text": self.text()}


def alert_from_context(state: str, context: Mapping[str, Any]) -> Alert:
    ti = context.get("ti") or context.get("task_instance")
    dag_run = context.get("dag_run")
    exception = context.get("exception")
    return Alert(
        state=state,
        dag_id=getattr(ti, "dag_id", None) or getattr(dag_run, "dag_id", ""),
        task_id=getattr(ti, "task_id", "") or "",
        run_id=getattr(ti, "run_id", None) or getattr(dag_run, "run_id", ""),
        try_number=int(getattr(ti, "try_number", 0) or 0),
        message=f"{type(exception).__name__}: {exception}" if exception else str(context.get("reason", "")),
        log_url=str(getattr(ti, "log_url", "") or ""),
    )


def _base_url() -> str:
    try:
        from airflow.sdk.configuration import conf

        return str(conf.get("api", "base_url", fallback="") or "").rstrip("/")
    except Exception:  # noqa: BLE001 - a link is a nicety
        return ""


def _approval_alert(context: Mapping[str, Any]) -> Alert:
    """A human-in-the-loop task (the approval step) waits for a person: what, and where to answer."""
    task = context["task"]
    alert = alert_from_context(APPROVAL_NEEDED, context)
    ti = context.get("task_instance") or context.get("ti")
    try:
        link = task.generate_link_to_ui(task_instance=ti)
    except Exception:  # noqa: BLE001 - no base_url configured: the log link will do
        link = alert.log_url
    timeout = getattr(task, "response_timeout", None)
    lines = [f"A decision waits: {getattr(task, 'subject', '') or 'approval'}"]
    if timeout:
        defaults = getattr(task, "defaults", None) or []
        lines.append(f"No answer within {timeout}: " + (f"counts as {', '.join(map(str, defaults))}."
                                                        if defaults else "the step times out."))
    body = str(getattr(task, "body", "") or "")
    if body:
        lines.append(body[:3000])
    return Alert(APPROVAL_NEEDED, alert.dag_id, alert.task_id, alert.run_id, 0, "\n".join(lines), link,
                 extra={"options": list(getattr(task, "options", []) or [])})


def _deadline_alert(context: Mapping[str, Any], due: str = "") -> Alert:
    """Context of a deadline callback (``Deadline.handle_miss``): the run as the REST API shows it
    (``dag_run``) and the deadline (``deadline``: id, deadline_time)."""
    run = context.get("dag_run") or {}
    deadline = context.get("deadline") or {}
    dag_id, run_id = str(run.get("dag_id", "")), str(run.get("dag_run_id", run.get("run_id", "")))
    message = f"not finished by {deadline.get('deadline_time', '?')}"
    if due:
        message += f" (due {due})"
    message += f"; state {run.get('state', '?')}"
    base = _base_url()
    link = f"{base}/dags/{dag_id}/runs/{run_id}" if base and dag_id and run_id else ""
    return Alert(DEADLINE_MISSED, dag_id, "", run_id, 0, message, link,
                 extra={"deadline_time": str(deadline.get("deadline_time", "")),
                        "logical_date": str(run.get("logical_date") or ""),
                        "queued_at": str(run.get("queued_at") or "")})


def describe(context: Mapping[str, Any], event: str | None = None, subject: str | None = None,
             text: str | None = None, extra: Mapping[str, Any] | None = None) -> Alert:
    """The alert a notifier sends for ``context``: a free-form message when given ``subject``/
    ``text``, else by the kind of context (a missed deadline, an approval step waiting, a task's
    failure, retry or success)."""
    if subject is not None or text is not None:
        dag_run = context.get("dag_run")
        return Alert(event or MESSAGE, str(getattr(dag_run, "dag_id", "") or ""), "",
                     str(getattr(dag_run, "run_id", "") or ""), 0, text or "",
                     subject=subject or "", extra=dict(extra or {}))
    if event == DEADLINE_MISSED or (event is None and "deadline" in context):
        return _deadline_alert(context, str((extra or {}).get("due", "")))
    task = context.get("task")
    if event == APPROVAL_NEEDED or (event is None and hasattr(task, "generate_link_to_ui")):
        return _approval_alert(context)
    if event is None:
        ti = context.get("ti") or context.get("task_instance")
        state = str(getattr(ti, "state", "") or "")
        event = UP_FOR_RETRY if state.endswith(UP_FOR_RETRY) else FAILED if context.get("exception") else (
            state.rsplit(".", 1)[-1] or MESSAGE)
    return alert_from_context(event, context)


# --- the channels -------------------------------------------------------------------------------


def _connection(conn_id: str) -> Any | None:
    """The Airflow connection, or None when it is not defined. Inside Airflow (task, triggerer,
    DAG processor) through the Task SDK; from a shell (e.g. ``python -m common.registry``) the SDK
    sees only environment variables and secrets backends, so the metastore of ``AIRFLOW_HOME``
    (``eval "$(tools/stack.sh env)"``) is read too."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        pass
    if _inside_airflow_process() or not os.environ.get("AIRFLOW_HOME"):
        return None  # in a task the SDK asked the API server; no AIRFLOW_HOME: no metastore here
    try:
        from airflow.models.connection import Connection

        return Connection.get_connection_from_secrets(conn_id)
    except Exception:  # noqa: BLE001 - not defined, or no metastore reachable from here
        return None


async def _aconnection(conn_id: str) -> Any | None:
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return await BaseHook.aget_connection(conn_id)
    except AirflowNotFoundException:
        return None


def _inside_airflow_process() -> bool:
    try:
        from airflow.sdk.execution_time import task_runner

        return getattr(task_runner, "SUPERVISOR_COMMS", None) is not None
    except Exception:  # noqa: BLE001
        return False


def _url(conn: Any) -> str:
    extra = conn.extra_dejson or {}
    if extra.get("url"):
        return str(extra["url"])
    scheme = conn.schema or "https"
    port = f":{conn.port}" if conn.port else ""
    return f"{scheme}://{conn.host}{port}{extra.get('path', '')}"


def _post_json(url: str, payload: Mapping[str, Any]) -> None:
    request = urllib.request.Request(url, data=json.dumps(payload, default=str).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        response.read()


def _recipients(conn: Any) -> list[str]:
    extra = conn.extra_dejson or {}
    recipients = [r.strip() for r in str(extra.get("to", "")).split(",") if r.strip()]
    if not recipients:
        raise ValueError(f"connection {SMTP_CONN_ID} has no extra 'to'")
    return recipients


def _html(alert: Alert) -> str:
    body = html.escape(alert.text())
    return f"<pre style=\"font-family: monospace\">{body}</pre>"


class _Channel:
    """What the three notifiers share (mixed into each ``BaseNotifier`` subclass): what to say,
    read the connection when firing, log one line when it is absent, never raise."""

    conn_id: str

    def _setup(self, event: str | None, subject: str | None, text: str | None,
               extra: Mapping[str, Any] | None) -> None:
        self.event, self.alert_subject, self.alert_text = event, subject, text
        self.alert_extra = dict(extra or {})

    def _alert(self, context: Mapping[str, Any]) -> Alert:
        return describe(context, self.event, self.alert_subject, self.alert_text, self.alert_extra)

    def _absent(self, alert: Alert) -> bool:
        log.info("alert not sent via %s (no such Airflow connection): %s", self.conn_id, alert.headline())
        return False

    def _failed(self, exc: Exception) -> bool:
        log.error("alert via %s failed: %s: %s", self.conn_id, type(exc).__name__, exc)
        return False

    def send(self, conn: Any, alert: Alert, context: Mapping[str, Any]) -> None:
        raise NotImplementedError

    async def asend(self, conn: Any, alert: Alert, context: Mapping[str, Any]) -> None:
        await asyncio.to_thread(self.send, conn, alert, context)

    def notify(self, context: Mapping[str, Any]) -> bool:  # type: ignore[override]
        """Send now (task process, DAG processor, a shell); True when the channel accepted it."""
        try:
            alert = self._alert(context)
            conn = _connection(self.conn_id)
            if conn is None:
                return self._absent(alert)
            self.send(conn, alert, context)
            return True
        except Exception as exc:  # noqa: BLE001 - an alert must never raise
            return self._failed(exc)

    async def async_notify(self, context: Mapping[str, Any]) -> bool:  # type: ignore[override]
        """Send from the triggerer's event loop (deadline callbacks)."""
        try:
            alert = self._alert(context)
            conn = await _aconnection(self.conn_id)
            if conn is None:
                return self._absent(alert)
            await self.asend(conn, alert, context)
            return True
        except Exception as exc:  # noqa: BLE001 - an alert must never raise
            return self._failed(exc)


@functools.cache
def _notifier_classes() -> tuple[type, ...]:
    """The notifier classes, built on first use (Airflow and the smtp provider are imported here,
    not when a DAG file imports this module)."""
    from airflow.providers.smtp.notifications.smtp import SmtpNotifier
    from airflow.sdk import BaseNotifier

    class SlackNotifier(_Channel, BaseNotifier):
        """Slack incoming webhook (connection ``alerts_slack``)."""

        conn_id = SLACK_CONN_ID

        def __init__(self, event: str | None = None, subject: str | None = None, text: str | None = None,
                     extra: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._setup(event, subject, text, extra)

        def send(self, conn: Any, alert: Alert, context: Mapping[str, Any]) -> None:
            _post_json(_url(conn), {"text": alert.text()})

    class WebhookNotifier(_Channel, BaseNotifier):
        """Generic webhook (connection ``alerts_webhook``): the whole alert as JSON."""

        conn_id = WEBHOOK_CONN_ID

        def __init__(self, event: str | None = None, subject: str | None = None, text: str | None = None,
                     extra: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self._setup(event, subject, text, extra)

        def send(self, conn: Any, alert: Alert, context: Mapping[str, Any]) -> None:
            _post_json(_url(conn), alert.payload())

    class EmailNotifier(_Channel, SmtpNotifier):
        """E-mail (connection ``alerts_smtp``) sent by the smtp provider's ``SmtpNotifier``; the
        recipients come from the connection's extra ``to`` when it fires."""

        conn_id = SMTP_CONN_ID
        template_fields = ()  # the message is built when firing, never rendered as a template

        def __init__(self, event: str | None = None, subject: str | None = None, text: str | None = None,
                     extra: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
            super().__init__(to=[], smtp_conn_id=SMTP_CONN_ID, **kwargs)
            self._setup(event, subject, text, extra)

        def _address(self, conn: Any, alert: Alert) -> None:
            extra = conn.extra_dejson or {}
            self.to = _recipients(conn)
            self.from_email = extra.get("from_email") or extra.get("from") or conn.login or "airflow@localhost"
            self.subject = alert.headline()[:200]
            self.html_content = _html(alert)

        def send(self, conn: Any, alert: Alert, context: Mapping[str, Any]) -> None:
            self._address(conn, alert)
            SmtpNotifier.notify(self, context)

        async def asend(self, conn: Any, alert: Alert, context: Mapping[str, Any]) -> None:
            self._address(conn, alert)
            await SmtpNotifier.async_notify(self, context)

    for cls in (SlackNotifier, EmailNotifier, WebhookNotifier):
        cls.__module__, cls.__qualname__ = __name__, cls.__name__
    return SlackNotifier, EmailNotifier, WebhookNotifier


def notifiers(*, event: str | None = None, subject: str | None = None, text: str | None = None,
              extra: Mapping[str, Any] | None = None) -> list[Any]:
    """The project's notifiers, one per channel (Slack, e-mail, webhook): ``BaseNotifier``
    instances for any ``notifiers=``, ``on_*_callback`` or for awaiting in a deadline callback.
    Each reads its connection when it fires; what it says follows from the context it gets (or
    ``event``/``subject``/``text`` when given)."""
    return [cls(event=event, subject=subject, text=text, extra=extra) for cls in _notifier_classes()]


def _sent(results: list[tuple[str, bool]], alert: Alert) -> list[str]:
    sent = [conn_id for conn_id, ok in results if ok]
    if not sent:
        log.warning("ALERT (no channel configured among %s): %s", ", ".join(CHANNELS), alert.text())
    return sent


def notify(context: Mapping[str, Any], event: str | None = None, **kw: Any) -> list[str]:
    """Send what ``context`` calls for (``describe``) to every channel now; returns the channels
    that accepted it. One warning line with the whole alert when none did."""
    results = [(n.conn_id, n.notify(context)) for n in notifiers(event=event, **kw)]
    return _sent(results, describe(context, event, **kw))


def notify_message(subject: str, text: str, **extra: Any) -> list[str]:
    """A free-form message (champion health, rollback: code that is not an Airflow callback) to
    every configured channel now; returns the channels that accepted it. ``extra`` travels in
    the webhook's JSON."""
    return notify({}, subject=subject, text=text, extra=extra)


async def deadline_missed(context: Mapping[str, Any] | None = None, due: str = "") -> list[str]:
    """Deadline callback (``AsyncCallback``: the scheduler queues it when a run misses its
    deadline, the triggerer awaits it): every notifier, awaited with the deadline's context."""
    context = dict(context or {})
    extra = {"due": due} if due else {}
    results = []
    for notifier in notifiers(event=DEADLINE_MISSED, extra=extra):
        notifier.context = context
        results.append((notifier.conn_id, bool(await notifier)))
    return _sent(results, describe(context, DEADLINE_MISSED, extra=extra))


DEADLINE_REFERENCES = {"logical_date": "DAGRUN_LOGICAL_DATE", "queued_at": "DAGRUN_QUEUED_AT"}


def deadline_alert(interval: timedelta | None, reference: str) -> Any | None:
    """Airflow's ``DeadlineAlert`` for a workflow: a run not finished ``interval`` after its
    ``reference`` (``logical_date``: the scheduled time; ``queued_at``) fires ``deadline_missed``
    in the triggerer. None when the workflow has no deadline."""
    if interval is None:
        return None
    from airflow.sdk import AsyncCallback, DeadlineAlert, DeadlineReference

    if reference not in DEADLINE_REFERENCES:
        raise ValueError(f"deadline_reference {reference!r}: expected one of {sorted(DEADLINE_REFERENCES)}")
    due = f"{_duration(interval)} after the run's {reference.replace('_', ' ')}"
    return DeadlineAlert(reference=getattr(DeadlineReference, DEADLINE_REFERENCES[reference]),
                         interval=interval, callback=AsyncCallback(deadline_missed, kwargs={"due": due}),
                         name="decision deadline")


def _duration(interval: timedelta) -> str:
    seconds = int(interval.total_seconds())
    if seconds % 3600 == 0:
        return f"{seconds // 3600} h"
    if seconds % 60 == 0:
        return f"{seconds // 60} min"
    return f"{seconds} s"


# MLflow's own limit on a tag value (mlflow.utils.validation.MAX_TAG_VAL_LENGTH, 8000 in 3.17).
MAX_TAG_VALUE = 8000
FAILURE_REASON_TAG = "failure_reason"


@contextlib.contextmanager
def _bounded_mlflow_requests() -> Any:
    """A dead tracking server must not hold a failure callback for minutes (MLflow's default is 7
    retries with backoff): one retry, 15 s, unless the environment says otherwise."""
    saved = {name: os.environ.get(name) for name in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES",
                                                     "MLFLOW_HTTP_REQUEST_TIMEOUT")}
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def mark_mlflow_run_failed(context: Mapping[str, Any]) -> str | None:
    """End this task's MLflow run FAILED, tagged ``failure_reason``; returns its id, or None when
    the task opened no run (or MLflow cannot be reached). Never raises: it runs in a callback."""
    try:
        alert = alert_from_context("failed", context)
        ti = context.get("ti") or context.get("task_instance")
        if str(getattr(ti, "state", "") or "").endswith("up_for_retry"):
            return None  # a retry continues the same run (mlflow_utils.task_run resumes it)
        if not alert.task_id:
            return None
        with _bounded_mlflow_requests():
            from common import mlflow_utils

            client = mlflow_utils.configure()
            # Every experiment is searched (there is one per workflow): the run's Airflow tags
            # identify it, and this module stays below common.config, which wires its callbacks.
            experiments = [e.experiment_id for e in client.search_experiments()]
            who = mlflow_utils.AirflowIdentity(alert.dag_id, alert.run_id, alert.task_id)
            run_id = mlflow_utils.find_task_run(experiments, who) if experiments else None
            if run_id is None:
                return None
            reason = alert.message or "task failed (killed, timed out or lost; see the task log)"
            client.set_tag(run_id, FAILURE_REASON_TAG, reason[:MAX_TAG_VALUE])
            # FAILED even when the run itself had ended FINISHED: its task, which the run
            # stands for, did not succeed (e.g. the model logged, then the task was killed).
            # A run task_run already ended FAILED keeps its end time.
            if client.get_run(run_id).info.status != "FAILED":
                client.set_terminated(run_id, status="FAILED")
            log.info("MLflow run %s of %s.%s marked FAILED: %s", run_id, alert.dag_id, alert.task_id,
                     reason[:200])
            return run_id
    except Exception as exc:  # noqa: BLE001 - a callback must never raise
        log.error("could not mark the MLflow run of the failed task FAILED: %s", exc)
        return None


def on_failure(context: Mapping[str, Any]) -> None:
    """The task failed for good (Airflow calls ``on_retry`` instead while retries remain): every
    notifier, then its MLflow run ends FAILED."""
    notify(context, FAILED)
    mark_mlflow_run_failed(context)


def on_retry(context: Mapping[str, Any]) -> None:
    notify(context, UP_FOR_RETRY)


def on_success(context: Mapping[str, Any]) -> None:
    notify(context, SUCCESS)


def task_callbacks() -> dict[str, Callable[[Mapping[str, Any]], None]]:
    """For ``default_args``: every task alerts on failure and on retry."""
    return {"on_failure_callback": on_failure, "on_retry_callback": on_retry}


# Which failures are worth a retry: bad input data, a bad parameter or an untrainable data set
# fail the same way on every try, so retrying only delays the alert.
PERMANENT = (DataValidationError, ParameterError, TrainingError)


@contextlib.contextmanager
def permanent_errors_fail_fast() -> Iterator[None]:
    """Inside a task: turn a permanent error into Airflow's ``AirflowFailException`` (fail now, no
    retries, callbacks still fire); everything else (network, a killed worker, a busy server) is
    left to the task's retries."""
    try:
        yield
    except PERMANENT as exc:
        from airflow.sdk.exceptions import AirflowFailException

        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
