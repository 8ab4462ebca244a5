"""Model registry: register a challenger, then move ``champion`` only through the gate.

The protocol, per registered model:

1. ``register_challenger`` registers the run's model as a new version (or finds the version this
   run already registered: re-running the task creates nothing twice), tags it with its lineage
   and points the ``challenger`` alias at it. Its metrics are not tags: ``log_evaluation`` logged
   them on the logged model (MLflow 3 model metrics), linked to the evaluation data as an MLflow
   dataset whose digest is the data version; the version page shows them from there.
2. ``decide`` applies the workflow's :class:`~common.config.PromotionGate` and records the outcome
   as version tags ``decision`` (promoted | rejected | pending_approval) and ``decision_reason``.
   A decided version (promoted or rejected) no longer carries ``challenger``: the alias marks only
   a version whose decision is open, so MLflow's registered model list, which shows the alias of
   the newest aliased version first, shows ``champion`` there except while a version waits.
   A challenger that passes waits for a person (``pending_approval``) unless the run promotes
   unattended (``auto_promote``, config switch and run parameter).
3. The DAG's ``approve`` step (Airflow's human-in-the-loop operator) asks; ``resolve_approval``
   applies the answer: :func:`approve` (through the same compare-and-set gate) or :func:`reject`
   (also what no answer within the approval timeout means). Decision, reason and who decided
   (``decided_by``: a user, ``gate`` for an unattended decision, ``timeout``) are version tags.
4. Every move of ``champion`` (unattended promotion, approved promotion, :func:`rollback`) is
   announced as an event of the Airflow Asset :func:`model_asset_name` (extra:
   :func:`champion_event`), so a user's DAG can be scheduled on "a new champion".

Evaluation scored the challenger and the then-champion on the same data. ``decide`` re-reads the
champion under an exclusive lock and refuses to promote when the champion is no longer the one the
challenger was compared with (compare-and-set). So of two runs finishing at once, at most one wins:
the second sees a champion it never beat. The lock is a file lock (one host); on a cluster every
register task also runs in the one-slot ``model_registry`` pool.

CLI (from dags/):

    python -m common.registry pending [MODEL]            # versions waiting for approval, with metrics
    python -m common.registry approve MODEL VERSION --by NAME [--reason TEXT]
    python -m common.registry reject MODEL VERSION --by NAME [--reason TEXT]
    python -m common.registry rollback MODEL [--to VERSION [--force]] --by NAME --reason TEXT

A mistake of the person at the keyboard (no such version, a version not waiting for approval) is
one line ``error: ...`` on stderr and exit code 2; anything unexpected keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import sys
import tempfile
import time
import urllib.parse
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Any, TypedDict

import mlflow
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Metric
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from common import alerts, config, mlflow_auth, mlflow_utils
from common.config import PromotionGate, WorkflowConfig
from common.mlflow_utils import configure
from scripts.core import paths

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
PROMOTED, REJECTED, PENDING = "promoted", "rejected", "pending_approval"
FORCED_CHAMPION = "forced_champion"  # a version the gate rejected, made champion by rollback --force
NO_CHAMPION = "none"
TAG_DECISION, TAG_REASON = "decision", "decision_reason"
TAG_EVALUATED_AGAINST = "evaluated_against_champion"
TAG_GATE_METRIC, TAG_GATE_THRESHOLD_METRIC = "gate_metric", "gate_threshold_metric"
EVALUATION_CONTEXT = "evaluation"  # the input dataset's context on the evaluate step's run
TAG_HEALTH, TAG_HEALTH_DETAIL = "champion_health", "champion_health_detail"
HEALTH_OK, HEALTH_DEGRADED = "ok", "degraded"
HEALTH_DEGRADATION = "champion_health_degradation"  # relative, > 0: worse than when promoted
TAG_DECIDED_BY, TAG_GATE_REASON = "decided_by", "gate_reason"
TAG_PREVIOUS_CHAMPION, TAG_PROMOTED_AT = "previous_champion", "promoted_at"
ROLLED_BACK = "rolled_back"
BY_GATE, BY_TIMEOUT = "gate", "timeout"  # decided_by for an unattended decision, an unanswered approval
APPROVE, REJECT = "Approve", "Reject"  # the approval step's options (its default: REJECT)
WAITING = "; waiting for approval"  # how a pending decision's reason ends


def model_asset_name(model_name: str) -> str:
    """The Airflow Asset whose events announce a new ``champion`` of ``model_name``: a user's
    DAG with ``schedule=Asset(model_asset_name("power_lgbm"))`` runs after every promotion."""
    return f"{model_name}_champion"


def model_alias_name(model_name: str) -> str:
    """The AssetAlias the promoting tasks declare as outlet: an event of the model's Asset is
    added to it only when the champion really moved (the DAG files spell it out at parse time,
    where this module is too heavy to import; tests/test_registry_approval.py checks they agree)."""
    return f"{model_name}_champion_events"


class RegistryUserError(ValueError):
    """A permanent mistake in what a person asked for: the CLI prints it as one line, exit 2."""


class VersionNotFound(RegistryUserError):
    pass


class NotPending(RegistryUserError):
    pass


@dataclass(frozen=True)
class Decision:
    model_name: str
    version: str
    decision: str
    reason: str
    champion_before: str | None
    champion_after: str | None

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


@contextlib.contextmanager
def promotion_lock(model_name: str) -> Iterator[None]:
    """Exclusive, blocking, released even if the process dies (the kernel drops flocks)."""
    path = paths.locks_dir() / f"registry-{model_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def alias_version(client: MlflowClient, model_name: str, alias: str) -> ModelVersion | None:
    try:
        return client.get_model_version_by_alias(model_name, alias)
    except MlflowException:
        return None


def _wait_ready(client: MlflowClient, name: str, version: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while client.get_model_version(name, version).status == "PENDING_REGISTRATION":
        if time.monotonic() > deadline:
            raise TimeoutError(f"model {name} version {version} still pending after {timeout}s")
        time.sleep(1)


def register_challenger(model_name: str, model_uri: str, run_id: str, tags: Mapping[str, str]) -> str:
    """Register (once per run) and alias the version ``challenger``; returns the version. Its
    metrics are the logged model's (``log_evaluation``), never copied into tags."""
    client = configure()
    existing = client.search_model_versions(f"name = '{model_name}' AND run_id = '{run_id}'")
    if existing:
        version = str(max(int(v.version) for v in existing))
        log.info("run %s already registered as %s v%s", run_id, model_name, version)
    else:
        version = _create_version(client, model_name, model_uri, run_id)
        _wait_ready(client, model_name, version)
    for key, value in {**tags, "mlflow_run_id": run_id}.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    # A retry after the decision finds the version decided: it challenges nobody any more.
    if client.get_model_version(model_name, version).tags.get(TAG_DECISION) not in (PROMOTED, REJECTED):
        client.set_registered_model_alias(model_name, CHALLENGER, version)
    return version


def versions_tagged(model_name: str, tags: Mapping[str, str]) -> list[ModelVersion]:
    """The versions of ``model_name`` that carry every tag of ``tags`` (e.g. one trade day's)."""
    return list(configure().search_model_versions(f"name = '{model_name}' AND {mlflow_utils.tags_filter(tags)}"))


def _create_version(client: MlflowClient, model_name: str, model_uri: str, run_id: str) -> str:
    """A new version of ``model_name`` (created first if new) from the logged model.

    What ``mlflow.register_model`` does, without its messages: it prints "Registered model 'x'
    already exists. Creating a new version..." and "Created version ..." to stderr, which Airflow's
    task runner logs at ERROR level, so every successful register task showed three ERROR lines.
    """
    if not client.search_registered_models(filter_string=f"name = '{model_name}'", max_results=1):
        try:
            client.create_registered_model(model_name)
        except MlflowException as exc:  # created meanwhile by a run registering at the same moment
            if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
    mlflow_auth.require_owned(mlflow_auth.REGISTERED_MODEL, model_name)  # the service user's, or refused
    model_id = logged_model_id(model_uri)
    mv = client.create_model_version(model_name, source=model_uri, run_id=run_id, model_id=model_id)
    if model_id:  # the logged model's link to its registered versions, as register_model keeps it
        with contextlib.suppress(MlflowException):
            from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

            links = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
            links.append({"name": mv.name, "version": mv.version})
            client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})
    log.info("registered %s as %s v%s", model_uri, model_name, mv.version)
    return str(mv.version)


def logged_model_id(model_uri: str | None) -> str | None:
    """The MLflow 3 logged model a URI names (``models:/m-...``, what ``log_model`` returns, and
    the ``source`` of every version registered here); None for any other URI."""
    return model_uri.removeprefix("models:/") if model_uri and model_uri.startswith("models:/m-") else None


def _version_model_id(mv: ModelVersion) -> str | None:
    # The REST API does not carry a version's model_id (MLflow 3.17): its source names the model.
    return getattr(mv, "model_id", None) or logged_model_id(mv.source)


def _latest(entries: list[Metric] | None) -> dict[str, float]:
    """Key -> the value logged last (a retried step may have logged a key twice)."""
    latest: dict[str, Metric] = {}
    for m in entries or []:
        if m.key not in latest or (m.timestamp, m.step) >= (latest[m.key].timestamp, latest[m.key].step):
            latest[m.key] = m
    return {k: float(m.value) for k, m in latest.items()}


def version_metrics(client: MlflowClient, mv: ModelVersion) -> dict[str, float]:
    """A version's evaluation metrics: its logged model's metrics, else (a version registered
    from a run URI, or before metrics moved to the model) its run's."""
    model_id = _version_model_id(mv)
    if model_id:
        with contextlib.suppress(MlflowException):  # the logged model was deleted
            if found := _latest(client.get_logged_model(model_id).metrics):
                return found
    return dict(client.get_run(mv.run_id).data.metrics) if mv.run_id else {}


def decide(model_name: str, version: str, gate: PromotionGate, metrics: Mapping[str, float],
           champion_score: float | None, evaluated_against: str | None,
           ineligible_reason: str | None = None) -> Decision:
    """Apply the gate and record why; move ``champion`` only if every condition holds.

    ``metrics`` are the challenger's metrics; ``champion_score`` is the champion's ``gate.metric``
    on the same evaluation data and ``evaluated_against`` that champion's version (None: there was
    no champion at evaluation time). ``ineligible_reason`` (e.g. "smoke profile") rejects outright.
    """
    client = configure()
    with promotion_lock(model_name):
        champion = alias_version(client, model_name, CHAMPION)
        before = champion.version if champion else None
        recorded = client.get_model_version(model_name, version).tags
        if recorded.get(TAG_DECISION) in (PROMOTED, REJECTED) or (
                champion is not None and champion.version == version):
            # Already decided by an earlier try of this task: report, change nothing.
            return Decision(model_name, version, recorded.get(TAG_DECISION, PROMOTED),
                            recorded.get(TAG_REASON, "already champion"), before, before)
        if ineligible_reason:
            decision, reason = REJECTED, f"not eligible for promotion: {ineligible_reason}"
        else:
            decision, reason = _judge(gate, metrics, champion_score, evaluated_against, before)
        after = before
        if decision == PROMOTED:
            _promote(client, model_name, version, before)
            after = version
        _record(client, model_name, version, decision, reason, evaluated_against,
                by=None if decision == PENDING else BY_GATE)
        if decision == PENDING:
            client.set_model_version_tag(model_name, version, TAG_GATE_REASON, reason)
        client.set_model_version_tag(model_name, version, TAG_GATE_METRIC, gate.metric)
        client.set_model_version_tag(model_name, version, TAG_GATE_THRESHOLD_METRIC, gate.threshold_metric)
    log.info("%s v%s: %s (%s)", model_name, version, decision, reason)
    return Decision(model_name, version, decision, reason, before, after)


class Evaluated(TypedDict):
    """What every workflow's evaluate step returns (its XCom): the challenger's metrics on the
    evaluation data, and the champion scored on that same data (``champion_version`` None: there
    was none; ``champion_score`` None: it could not be scored)."""

    metrics: dict[str, float]
    champion_version: str | None
    champion_score: float | None


@dataclass(frozen=True)
class ChampionScore:
    """The champion at evaluation time and its gate metric on the challenger's evaluation data."""

    version: str | None  # None: there is no champion
    score: float | None  # None: there is one, but it could not be scored (e.g. older features)


def score_champion(workflow: WorkflowConfig, scorer: Callable[[str], Mapping[str, float]]) -> ChampionScore:
    """The registry's half of the champion comparison: find the champion and hand its model URI
    (the version pinned, so a promotion meanwhile cannot swap the model under us) to the
    pipeline's ``scorer``, which returns metrics computed exactly as for the challenger. The
    gate's metric is read from the workflow's config alone; a scorer that fails or lacks it
    leaves the champion unscored, which ``decide`` treats as "keep the champion"."""
    client = configure()
    champion = alias_version(client, workflow.model_name, CHAMPION)
    if champion is None:
        return ChampionScore(None, None)
    metric = workflow.gate.metric
    try:
        scored = scorer(f"models:/{workflow.model_name}/{champion.version}")
        return ChampionScore(champion.version, float(scored[metric]))
    except Exception as exc:  # noqa: BLE001 - e.g. a feature set from older code, a missing metric
        log.warning("champion %s v%s cannot be scored on %s: %s", workflow.model_name,
                    champion.version, metric, exc)
        return ChampionScore(champion.version, None)


@dataclass(frozen=True)
class EvaluationData:
    """The data an evaluation scored on, as MLflow shows it: an MLflow dataset (context
    ``evaluation``) named ``name`` whose digest is the data version, so the metrics of every model
    scored on the same data carry the same dataset and can be compared in the MLflow UI."""

    name: str  # what the data is, e.g. "household_power-eval-2010-10-02" (with the window it covers)
    version: str  # the data version (the snapshot's content hash): the dataset's digest
    source: str  # where it lies: a snapshot folder, a lake partition (local path or s3:// URI)
    # The newest day the data holds (power: the snapshot's last day, tick: the trade day): the step
    # of the champion's health series. None (the image test sets have no date): the day evaluated.
    day: date | None = None
    profile: Mapping[str, Any] = field(default_factory=dict)  # a summary: rows, window, subset

    def dataset(self) -> _EvaluationDataset:
        with warnings.catch_warnings():  # MLflow 3.17 registers its local source twice and says so
            warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
            source = resolve_dataset_source(self.source)
        return _EvaluationDataset(source, self.name, self.version, dict(self.profile))

    def step(self) -> int:
        """The day as a number (days since 1970-01-01): the x of the champion's health series."""
        return ((self.day or datetime.now(UTC).date()) - date(1970, 1, 1)).days


class _EvaluationDataset(MetaDataset):
    """An MLflow dataset of metadata only (the data stays in its snapshot), with a profile."""

    def __init__(self, source: Any, name: str, digest: str, profile: dict[str, Any]) -> None:
        super().__init__(source, name=name, digest=digest)
        self._profile = profile

    @property
    def profile(self) -> dict[str, Any] | None:
        return self._profile or None

    def to_dict(self) -> dict[str, str]:
        config = super().to_dict()
        if self._profile:
            config["profile"] = json.dumps(self._profile, default=str)
        return config


def log_evaluation(workflow: WorkflowConfig, run_id: str, metrics: Mapping[str, float],
                   champion: ChampionScore, write_artifacts: Callable[[str], None] | None = None, *,
                   model_uri: str | None = None, data: EvaluationData | None = None) -> Evaluated:
    """The evaluate step's MLflow side, shared by every workflow.

    On the run ``run_id``: the evaluation data as an input dataset (context ``evaluation``, digest
    = the data version); the challenger's ``metrics`` as model metrics of the logged model
    ``model_uri``, linked to that dataset (also the run's metrics); the champion's score beside
    them as ``champion_<gate metric>`` (a run metric only: it is not this model's); the champion
    they were compared with (what ``decide`` re-checks); files ``write_artifacts(folder)`` writes,
    under ``evaluation/``. Then the champion's health (:func:`record_champion_health`). Returns
    the step's XCom. Every workflow passes ``model_uri`` and ``data``; without them the metrics go
    to the model the run logged (MLflow's own link), with no dataset."""
    logged = {k: float(v) for k, v in metrics.items()}
    dataset = data.dataset() if data is not None else None
    client = configure()
    with mlflow_utils.reopen_run(run_id):
        if dataset is not None:
            mlflow.log_input(dataset, context=EVALUATION_CONTEXT)
        # model_id None (a model logged under a runs:/ URI): MLflow links the run's own model.
        mlflow.log_metrics(logged, model_id=logged_model_id(model_uri), dataset=dataset, run_id=run_id)
        if champion.score is not None:
            logged[CHAMPION + "_" + workflow.gate.metric] = champion.score
            client.log_batch(run_id, metrics=[Metric(CHAMPION + "_" + workflow.gate.metric, champion.score,
                                                     int(time.time() * 1000), 0)])
        mlflow.set_tag(TAG_EVALUATED_AGAINST, champion.version or NO_CHAMPION)
        if write_artifacts is not None:
            with tempfile.TemporaryDirectory() as folder:
                write_artifacts(folder)
                mlflow.log_artifacts(folder, artifact_path="evaluation")
    record_champion_health(workflow, champion, data)
    return Evaluated(metrics=logged, champion_version=champion.version, champion_score=champion.score)


@dataclass(frozen=True)
class Health:
    """The champion scored on the newest evaluation data, against its score when promoted."""

    model_name: str
    version: str
    metric: str  # the gate's metric
    score: float  # now, on the newest evaluation data
    promoted_score: float | None  # on its own evaluation data when it was promoted; None: unknown
    degradation: float | None  # relative change for the worse (0.25 = 25 % worse); None: unknown
    tolerance: float
    step: int  # the day number of the data (EvaluationData.step)
    notified: tuple[str, ...] = ()  # the channels that accepted the degradation notice

    @property
    def degraded(self) -> bool:
        return self.degradation is not None and self.degradation > self.tolerance


def health_metric(workflow: WorkflowConfig) -> str:
    """The champion's health series on its logged model: ``champion_health_<gate metric>``."""
    return f"champion_health_{workflow.gate.metric}"


def degradation(gate: PromotionGate, promoted: float, now: float) -> float:
    """How much worse ``now`` is than ``promoted``, relative to it (negative: better)."""
    worse = (promoted - now) if gate.greater_is_better else (now - promoted)
    if promoted == 0:
        return math.inf if worse > 0 else 0.0
    return worse / abs(promoted)


def record_champion_health(workflow: WorkflowConfig, champion: ChampionScore,
                           data: EvaluationData | None) -> Health | None:
    """Champion health: log the champion's score on the newest evaluation data as one point of a
    time series on its logged model (``champion_health_<gate metric>``, step = the data's day
    number, linked to the evaluation dataset; in the champion's own run, so the run's charts
    show it over the days), with ``champion_health_degradation`` (relative to the score it was
    promoted with). Worse by more than ``workflow.health_tolerance``: a warning, version tags
    ``champion_health=degraded`` and ``champion_health_detail``, and a notice to every configured
    alert channel. None when there is no champion or it could not be scored. ``data`` None (no
    evaluation dataset): the point has no dataset and the day is today's."""
    if champion.version is None or champion.score is None:
        return None
    data = data or EvaluationData(name="", version="", source="")
    client = configure()
    name, gate = workflow.model_name, workflow.gate
    mv = client.get_model_version(name, champion.version)
    promoted = version_metrics(client, mv).get(gate.metric)
    change = degradation(gate, promoted, champion.score) if promoted is not None else None
    health = Health(name, champion.version, gate.metric, champion.score, promoted, change,
                    workflow.health_tolerance, data.step())
    now_ms, model_id = int(time.time() * 1000), _version_model_id(mv)
    on_data = {"dataset_name": data.name or None, "dataset_digest": data.version or None}
    points = [Metric(health_metric(workflow), champion.score, now_ms, health.step, model_id=model_id, **on_data)]
    if change is not None and math.isfinite(change):
        points.append(Metric(HEALTH_DEGRADATION, change, now_ms, health.step, model_id=model_id, **on_data))
    if mv.run_id:
        client.log_batch(mv.run_id, metrics=points)
    detail = _health_detail(health, data)
    client.set_model_version_tag(name, champion.version, TAG_HEALTH,
                                 HEALTH_DEGRADED if health.degraded else HEALTH_OK)
    client.set_model_version_tag(name, champion.version, TAG_HEALTH_DETAIL, detail)
    if not health.degraded:
        log.info("%s champion v%s healthy: %s", name, champion.version, detail)
        return health
    log.warning("%s champion v%s degraded: %s", name, champion.version, detail)
    link = _without_credentials(mlflow_utils.run_url(mv.run_id)) if mv.run_id else ""
    sent = alerts.notify_message(
        f"{name} champion v{champion.version} degraded: {gate.metric} {champion.score:.4g} "
        f"(was {promoted:.4g} when promoted)",
        f"{detail}\nThe champion's run (its health series): {link}\nRetrain it, or roll it back "
        f"(python -m common.registry rollback {name}; docs/operations.md).",
        model_name=name, version=champion.version, metric=gate.metric, score=champion.score,
        promoted_score=promoted, degradation=change, tolerance=workflow.health_tolerance,
        data_name=data.name, data_version=data.version, step=health.step)
    return dataclasses.replace(health, notified=tuple(sent))


def _health_detail(health: Health, data: EvaluationData) -> str:
    day = (date(1970, 1, 1) + timedelta(days=health.step)).isoformat()
    on = f"on {data.name} (data version {data.version}, day {day})" if data.name else f"on {day}"
    if health.promoted_score is None:
        return f"{health.metric}={health.score:.4g} {on}; its score when promoted is unknown"
    change = health.degradation or 0.0
    trend = (f"{change:.1%} worse than" if change > 0 else f"{-change:.1%} better than" if change < 0
             else "the same as")
    verdict = "over" if health.degraded else "within"
    return (f"{health.metric}={health.score:.4g} {on}, {trend} when promoted "
            f"({health.promoted_score:.4g}); {verdict} the tolerance of {health.tolerance:.0%}")


def _without_credentials(url: str) -> str:
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def wants_auto_promote(workflow: WorkflowConfig, values: Mapping[str, Any] | None) -> bool:
    """The run parameter ``auto_promote`` when set (true/false, also as the CLI's strings), else
    the workflow's config; a value that is no boolean is a ParameterError."""
    from scripts.core.params import parse

    name = config.AUTO_PROMOTE.name
    given = {name: (values or {})[name]} if (values or {}).get(name) is not None else {}
    chosen = parse([config.AUTO_PROMOTE], given, workflow.dag_id).get(name)
    return workflow.auto_promote if chosen is None else chosen


def register_and_decide(workflow: WorkflowConfig, trained: Mapping[str, Any], evaluated: Evaluated,
                        tags: Mapping[str, str], ineligible_reason: str | None = None,
                        auto_promote: bool | None = None) -> Decision:
    """The register step every workflow shares: register the trained model as challenger (with
    its lineage tags and the git commit), then apply the workflow's gate against the champion
    that evaluation scored on the same data. A passing challenger is promoted now only with
    ``auto_promote`` (None: the workflow's config); else it waits for approval."""
    metrics = evaluated["metrics"]
    version = register_challenger(workflow.model_name, trained["model_uri"], trained["run_id"],
                                  tags={**tags, "git_commit": mlflow_utils.git_commit()})
    unattended = workflow.auto_promote if auto_promote is None else auto_promote
    gate = dataclasses.replace(workflow.gate, require_approval=workflow.gate.require_approval or not unattended)
    return decide(workflow.model_name, version, gate, metrics,
                  champion_score=evaluated["champion_score"],
                  evaluated_against=evaluated["champion_version"], ineligible_reason=ineligible_reason)


def register_result(workflow: WorkflowConfig, trained: Mapping[str, Any], evaluated: Evaluated,
                    decision: Decision, data_version: str) -> dict[str, Any]:
    """The register step's XCom: the decision, with the approval form's text when it waits for a
    person (``approval_body``), or the model Asset event's extra when it moved the champion now
    (``champion_event``)."""
    return {**decision.to_dict(),
            "champion_event": champion_event(workflow.model_name, decision) if decision.decision == PROMOTED else None,
            "approval_body": (approval_body(workflow, trained, evaluated, decision, data_version)
                              if decision.decision == PENDING else None)}


def _judge(gate: PromotionGate, metrics: Mapping[str, float], champion_score: float | None,
           evaluated_against: str | None, champion_now: str | None) -> tuple[str, str]:
    if (evaluated_against or None) != champion_now:
        return REJECTED, (f"champion changed from {evaluated_against or NO_CHAMPION} to "
                          f"{champion_now or NO_CHAMPION} since this version was evaluated")
    if gate.threshold_metric not in metrics or gate.metric not in metrics:
        missing = {gate.threshold_metric, gate.metric} - set(metrics)
        return REJECTED, f"metrics missing: {sorted(missing)}"
    value = float(metrics[gate.threshold_metric])
    op = ">=" if gate.threshold_greater_is_better else "<="
    if not gate.passes_threshold(value):
        return REJECTED, f"{gate.threshold_metric}={value:.4g} fails the gate {op} {gate.threshold}"
    reason = f"{gate.threshold_metric}={value:.4g} passes {op} {gate.threshold}"
    challenger = float(metrics[gate.metric])
    if champion_now is not None:
        if champion_score is None:
            return REJECTED, f"champion v{champion_now} could not be scored; keeping it"
        if not gate.better(challenger, champion_score):
            return REJECTED, (f"{gate.metric}={challenger:.4g} does not beat champion "
                              f"v{champion_now} ({champion_score:.4g}) by {gate.min_improvement:.1%}")
        reason += f"; {gate.metric}={challenger:.4g} beats champion v{champion_now} ({champion_score:.4g})"
    else:
        reason += "; no champion yet"
    if gate.require_approval:
        return PENDING, reason + WAITING
    return PROMOTED, reason


def _record(client: MlflowClient, name: str, version: str, decision: str, reason: str,
            evaluated_against: str | None, by: str | None = None) -> None:
    if by is not None:
        client.set_model_version_tag(name, version, TAG_DECIDED_BY, by)
    client.set_model_version_tag(name, version, TAG_DECISION, decision)
    client.set_model_version_tag(name, version, TAG_REASON, reason)
    client.set_model_version_tag(name, version, TAG_EVALUATED_AGAINST, evaluated_against or NO_CHAMPION)
    client.set_model_version_tag(name, version, "decided_at", datetime.now(UTC).isoformat())
    if decision in (PROMOTED, REJECTED):
        _close_challenge(client, name, version)


def _close_challenge(client: MlflowClient, name: str, version: str) -> None:
    """Take ``challenger`` off a decided version (the decision is in its tags). Why: the MLflow UI's
    model list shows first the alias on the highest version, and a decided challenger (always the
    newest version) would stand before ``champion`` there; a newer challenger keeps its alias."""
    current = alias_version(client, name, CHALLENGER)
    if current is not None and current.version == str(version):
        client.delete_registered_model_alias(name, CHALLENGER)


def _promote(client: MlflowClient, name: str, version: str, before: str | None) -> None:
    """Point ``champion`` at ``version`` and remember the one it replaces (what rollback restores)."""
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, TAG_PREVIOUS_CHAMPION, before or NO_CHAMPION)
    client.set_model_version_tag(name, version, TAG_PROMOTED_AT, datetime.now(UTC).isoformat())


def _pending_tags(client: MlflowClient, model_name: str, version: str, verb: str) -> dict[str, str]:
    tags = dict(_version(client, model_name, version).tags)
    if tags.get(TAG_DECISION) != PENDING:
        raise NotPending(f"{model_name} v{version} is {tags.get(TAG_DECISION, 'undecided')!r}, "
                         f"not {PENDING!r}: only a version waiting for approval can be {verb}")
    return tags


def _said(by: str, note: str) -> str:
    return f"{by}" + (f": {note.strip()}" if note and note.strip() else "")


def approve(model_name: str, version: str, approver: str, note: str = "") -> Decision:
    """A person's approval: promote a ``pending_approval`` version if the champion is still the
    one it was evaluated against (compare-and-set, under the lock); else it is rejected."""
    client = configure()
    with promotion_lock(model_name):
        tags = _pending_tags(client, model_name, version, "approved")
        champion = alias_version(client, model_name, CHAMPION)
        before = champion.version if champion else None
        against = tags.get(TAG_EVALUATED_AGAINST, NO_CHAMPION)
        if (before or NO_CHAMPION) != against:
            reason = (f"approved by {_said(approver, note)}, but the champion changed from {against} to "
                      f"{before or NO_CHAMPION} since evaluation; keeping it")
            _record(client, model_name, version, REJECTED, reason, against, by=approver)
            return Decision(model_name, version, REJECTED, reason, before, before)
        _promote(client, model_name, version, before)
        gate = (tags.get(TAG_GATE_REASON) or tags.get(TAG_REASON, "")).removesuffix(WAITING)
        reason = f"approved by {_said(approver, note)}; gate: {gate}"
        _record(client, model_name, version, PROMOTED, reason, against, by=approver)
    log.info("%s v%s: promoted (%s)", model_name, version, reason)
    return Decision(model_name, version, PROMOTED, reason, before, version)


def reject(model_name: str, version: str, by: str, note: str = "") -> Decision:
    """A person's rejection (``by`` = ``timeout``: nobody answered in time): ``champion`` unchanged."""
    client = configure()
    with promotion_lock(model_name):
        tags = _pending_tags(client, model_name, version, "rejected")
        champion = alias_version(client, model_name, CHAMPION)
        before = champion.version if champion else None
        reason = ("no answer within the approval timeout" if by == BY_TIMEOUT
                  else f"rejected by {_said(by, note)}")
        _record(client, model_name, version, REJECTED, reason, tags.get(TAG_EVALUATED_AGAINST), by=by)
    log.info("%s v%s: rejected (%s)", model_name, version, reason)
    return Decision(model_name, version, REJECTED, reason, before, before)


def resolve_approval(model_name: str, version: str, answer: Mapping[str, Any] | None) -> Decision:
    """Apply the approval step's result (the HITL operator's XCom: ``chosen_options``,
    ``params_input``, ``responded_by_user``; None or no user: the timeout's default, Reject).
    A version no longer waiting (approved or rejected meanwhile from the CLI) is left as it is."""
    answer = answer or {}
    chosen = list(answer.get("chosen_options") or [REJECT])
    user = answer.get("responded_by_user") or {}
    by = str(user.get("name") or user.get("id") or "") or BY_TIMEOUT
    note = str((answer.get("params_input") or {}).get("reason") or "")
    try:
        if chosen == [APPROVE]:
            return approve(model_name, version, by, note)
        return reject(model_name, version, by, note)
    except NotPending as exc:
        log.warning("%s; nothing changed", exc)
        client = configure()
        tags = client.get_model_version(model_name, version).tags
        champion = alias_version(client, model_name, CHAMPION)
        now = champion.version if champion else None
        return Decision(model_name, version, tags.get(TAG_DECISION, ""), tags.get(TAG_REASON, ""), now, now)


def champion_event(model_name: str, decision: Mapping[str, Any] | Decision) -> dict[str, Any] | None:
    """The model Asset event's extra when ``decision`` moved ``champion`` (else None): name,
    version, the version it replaced, the gate metric and the new champion's value of it."""
    d = decision.to_dict() if isinstance(decision, Decision) else dict(decision)
    after, before = d.get("champion_after"), d.get("champion_before")
    if not after or after == before:
        return None
    client = configure()
    mv = client.get_model_version(model_name, str(after))
    gate_metrics = _gate_metrics(model_name, mv.tags or {})
    metric = gate_metrics[0] if gate_metrics else None
    value = None
    if metric and mv.run_id:
        with contextlib.suppress(MlflowException):
            value = client.get_run(mv.run_id).data.metrics.get(metric)
    return {"model_name": model_name, "version": str(after), "previous_version": before or NO_CHAMPION,
            "metric": metric, "value": value, "decision": d.get("decision"),
            "model_uri": f"models:/{model_name}/{after}"}


def announce_champion(context: Mapping[str, Any], model_name: str, event: Mapping[str, Any] | None) -> None:
    """In a task whose outlets hold ``AssetAlias(model_alias_name(model_name))``: add the model
    Asset's event (``event``: :func:`champion_event`'s extra; None: the champion did not move,
    and no event is emitted)."""
    if not event:
        return
    from airflow.sdk import Asset, AssetAlias

    context["outlet_events"][AssetAlias(model_alias_name(model_name))].add(
        Asset(model_asset_name(model_name)), extra=dict(event))
    log.info("announced %s v%s as Asset %s", model_name, event.get("version"), model_asset_name(model_name))


def approval_body(workflow: WorkflowConfig, trained: Mapping[str, Any], evaluated: Evaluated,
                  decision: Decision, data_version: str) -> str:
    """The approval form's text (markdown): the challenger's and the champion's gate scores on
    the same evaluation data, the baselines, the data version, links to the MLflow run and plots."""
    gate, metrics = workflow.gate, evaluated["metrics"]
    champion = evaluated["champion_version"]
    score = evaluated["champion_score"]
    lines = [f"**{workflow.model_name} v{decision.version}** passed the automatic gate and waits for "
             f"your decision to become `champion`.", "",
             f"- gate: {decision.reason.removesuffix(WAITING)}",
             f"- data version: `{data_version}`", "",
             f"| metric | challenger v{decision.version} | "
             f"{'champion v' + champion if champion else 'no champion'} |", "|---|---|---|"]

    def fmt(value: float | None) -> str:
        return "-" if value is None else f"{value:.6g}"

    shown = [gate.metric] + [m for m in (gate.threshold_metric,) if m != gate.metric]
    for name in shown:
        lines.append(f"| {name} | {fmt(metrics.get(name))} | {fmt(score) if name == gate.metric else '-'} |")
    for name in sorted(metrics):  # the baselines, scored on the same data
        if name not in shown and ("baseline" in name or name.startswith(("har_", "naive"))):
            lines.append(f"| {name} (baseline) | {fmt(metrics[name])} | |")
    run_id = trained["run_id"]
    try:
        url = mlflow_utils.run_url(run_id)
        lines += ["", f"MLflow run: [{run_id}]({url})"]
        plots = [a.path for a in configure().list_artifacts(run_id, "evaluation")
                 if a.path.endswith((".png", ".svg", ".html"))]
        base = mlflow_utils.tracking_uri().rstrip("/")
        lines += [f"- [{p.rsplit('/', 1)[-1]}]({base}/get-artifact?path={p}&run_uuid={run_id})" for p in plots]
        lines.append(f"- [all evaluation artifacts]({url}/artifacts)")
    except MlflowException as exc:  # the form still shows the scores
        lines += ["", f"MLflow run {run_id} (links unavailable: {exc.message[:200]})"]
    lines += ["", "Approve: promoted through the same compare-and-set gate (only if the champion is "
              "still the one compared with). Reject, or no answer in time: the champion stays."]
    return "\n".join(lines)


def _previous_champion(client: MlflowClient, model_name: str, current: ModelVersion) -> str | None:
    recorded = (current.tags or {}).get(TAG_PREVIOUS_CHAMPION)
    if recorded and recorded != NO_CHAMPION:
        return recorded
    earlier = [mv for mv in client.search_model_versions(f"name = '{model_name}'")
               if int(mv.version) < int(current.version) and (mv.tags or {}).get(TAG_PROMOTED_AT)]
    return str(max(int(mv.version) for mv in earlier)) if earlier else None


def rollback(model_name: str, by: str, reason: str, to: str | None = None, force: bool = False) -> Decision:
    """Move ``champion`` back to the champion before the current one (or to version ``to``),
    under the promotion lock; who and why are written on both versions. A version the gate
    rejected is refused unless ``force``; a forced rollback is recorded on it as a decision
    (``decision=forced_champion``, who, why and the gate's reason)."""
    if not by.strip() or not reason.strip():
        raise RegistryUserError("a rollback needs who (--by) and why (--reason)")
    client = configure()
    with promotion_lock(model_name):
        champion = alias_version(client, model_name, CHAMPION)
        if champion is None:
            raise RegistryUserError(f"{model_name} has no champion to roll back")
        target = str(to) if to else _previous_champion(client, model_name, champion)
        if target is None:
            raise RegistryUserError(f"{model_name} v{champion.version} replaced no earlier champion; "
                                    "name the version with --to")
        restored = _version(client, model_name, target)
        if restored.version == champion.version:
            raise RegistryUserError(f"{model_name} v{target} is already the champion")
        restored_tags = restored.tags or {}
        gate_rejected = (restored_tags.get(TAG_DECISION) == REJECTED
                         and restored_tags.get(TAG_DECIDED_BY) == BY_GATE)
        if gate_rejected and not force:
            raise RegistryUserError(
                f"{model_name} v{target} was rejected by the gate ({restored_tags.get(TAG_GATE_REASON, '?')}); "
                "pass --force to make it champion anyway (recorded on the version)")
        now = datetime.now(UTC).isoformat()
        note = f"rolled back to v{target} by {by}: {reason.strip()}"
        client.set_registered_model_alias(model_name, CHAMPION, target)
        if gate_rejected:
            forced = (f"forced rollback to v{target} by {by} past the gate's rejection "
                      f"({restored_tags.get(TAG_GATE_REASON, '?')}): {reason.strip()}")
            for key, value in {TAG_DECISION: FORCED_CHAMPION, TAG_REASON: forced, TAG_DECIDED_BY: by}.items():
                client.set_model_version_tag(model_name, target, key, value)
        for key, value in {TAG_DECISION: ROLLED_BACK, TAG_REASON: note, TAG_DECIDED_BY: by,
                           "rolled_back_at": now}.items():
            client.set_model_version_tag(model_name, champion.version, key, value)
        for key, value in {"restored_by": by, "restored_reason": reason.strip(), "restored_at": now,
                           "restored_from": champion.version}.items():
            client.set_model_version_tag(model_name, target, key, value)
    log.info("%s: champion v%s -> v%s (%s)", model_name, champion.version, target, note)
    return Decision(model_name, target, ROLLED_BACK, note, champion.version, target)


def emit_asset_event(model_name: str, extra: Mapping[str, Any],
                     env: Mapping[str, str] | None = None) -> str:
    """Post the model Asset event through Airflow's REST API (``POST /api/v2/assets/events``) for
    code outside a task (rollback). Needs ``AIRFLOW_API_URL`` (or ``AIRFLOW__API__BASE_URL``),
    ``AIRFLOW_API_USERNAME`` and ``AIRFLOW_API_PASSWORD`` (``eval "$(tools/stack.sh env)"`` sets
    them). Returns what happened, in one line; never raises."""
    import os
    import urllib.parse
    import urllib.request

    env = os.environ if env is None else env
    base = (env.get("AIRFLOW_API_URL") or env.get("AIRFLOW__API__BASE_URL") or "").rstrip("/")
    user, password = env.get("AIRFLOW_API_USERNAME"), env.get("AIRFLOW_API_PASSWORD")
    name = model_asset_name(model_name)
    if not (base and user and password):
        return (f"asset event NOT emitted: no Airflow API credentials (AIRFLOW_API_URL, AIRFLOW_API_USERNAME, "
                f"AIRFLOW_API_PASSWORD); DAGs scheduled on {name!r} will not run for this change")

    def call(method: str, path: str, body: Any = None, token: str | None = None) -> Any:
        request = urllib.request.Request(
            base + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": "application/json",
                     **({"Authorization": f"Bearer {token}"} if token else {})})
        with urllib.request.urlopen(request, timeout=30) as response:
            payload = response.read()
            return json.loads(payload) if payload else None

    try:
        token = call("POST", "/auth/token", {"username": user, "password": password})["access_token"]
        query = urllib.parse.urlencode({"name_pattern": name, "only_active": "false", "limit": 100})
        assets = [a for a in call("GET", f"/api/v2/assets?{query}", token=token)["assets"] if a["name"] == name]
        if not assets:
            return f"asset event NOT emitted: Airflow knows no asset {name!r} (no DAG produces or consumes it yet)"
        call("POST", "/api/v2/assets/events", {"asset_id": assets[0]["id"], "extra": dict(extra)}, token=token)
    except Exception as exc:  # noqa: BLE001 - the rollback itself is done; say what did not happen
        return f"asset event NOT emitted: {type(exc).__name__}: {str(exc)[:300]}"
    return f"asset event emitted: {name} v{extra.get('version')}"


def _version(client: MlflowClient, model_name: str, version: str) -> ModelVersion:
    try:
        return client.get_model_version(model_name, str(version))
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "INVALID_PARAMETER_VALUE"):
            raise VersionNotFound(f"{model_name} v{version} does not exist in the model registry "
                                  f"at {mlflow_utils.tracking_uri()}") from None
        raise


@dataclass(frozen=True)
class PendingVersion:
    model_name: str
    version: str
    created: str  # ISO 8601, UTC
    metrics: dict[str, float]  # the gate's metric and threshold metric (every metric if unknown),
    # from the version's logged model (its model metrics), else from its run
    evaluated_against: str  # the champion it was compared with ("none": there was none)
    reason: str


def _gate_metrics(model_name: str, tags: Mapping[str, str]) -> list[str] | None:
    if tags.get(TAG_GATE_METRIC):
        return [tags[TAG_GATE_METRIC], tags.get(TAG_GATE_THRESHOLD_METRIC, tags[TAG_GATE_METRIC])]
    for workflow in config.WORKFLOWS.values():  # versions decided before the gate was tagged
        if workflow.model_name == model_name:
            return [workflow.gate.metric, workflow.gate.threshold_metric]
    return None


def pending(model_name: str | None = None) -> list[PendingVersion]:
    """Versions waiting for approval (of ``model_name``, or of every registered model)."""
    client = configure()
    names = [model_name] if model_name else sorted(m.name for m in client.search_registered_models())
    found = []
    for name in names:
        for mv in client.search_model_versions(f"name = '{name}'"):
            tags = mv.tags or {}
            if tags.get(TAG_DECISION) != PENDING:
                continue
            recorded = version_metrics(client, mv)  # the logged model's metrics, else the run's
            wanted = _gate_metrics(name, tags)
            metrics = {k: recorded[k] for k in dict.fromkeys(wanted or []) if k in recorded} or recorded
            created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC).isoformat(timespec="seconds")
            found.append(PendingVersion(name, str(mv.version), created, metrics,
                                        tags.get(TAG_EVALUATED_AGAINST, NO_CHAMPION), tags.get(TAG_REASON, "")))
    return sorted(found, key=lambda p: (p.model_name, int(p.version)))


def _print_pending(rows: list[PendingVersion]) -> None:
    if not rows:
        print("no version is waiting for approval")
        return
    table = [("model", "version", "created (UTC)", "metrics", "evaluated against", "reason")]
    for r in rows:
        table.append((r.model_name, r.version, r.created.replace("T", " ").removesuffix("+00:00"),
                      " ".join(f"{k}={v:.6g}" for k, v in r.metrics.items()),
                      r.evaluated_against if r.evaluated_against == NO_CHAMPION else f"v{r.evaluated_against}",
                      r.reason))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]) - 1)]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Challengers that wait for a person's approval; rollback")
    sub = parser.add_subparsers(dest="command", required=True)
    pending_cmd = sub.add_parser("pending", help="list versions waiting for approval, with their metrics")
    pending_cmd.add_argument("model", nargs="?", help="only this registered model")
    for verb, text in (("approve", "promote a version waiting for approval (if the champion is unchanged)"),
                       ("reject", "reject a version waiting for approval (champion unchanged)")):
        cmd = sub.add_parser(verb, help=text)
        cmd.add_argument("model")
        cmd.add_argument("version")
        cmd.add_argument("--by", default="cli", help="who decides (tag decided_by)")
        cmd.add_argument("--reason", default="", help="why (in the tag decision_reason)")
    back = sub.add_parser("rollback", help="move champion back to the previous champion (or --to VERSION)")
    back.add_argument("model")
    back.add_argument("--to", help="this version instead of the champion before the current one")
    back.add_argument("--by", required=True, help="who rolls back (recorded on both versions)")
    back.add_argument("--reason", required=True, help="why (recorded on both versions)")
    back.add_argument("--force", action="store_true",
                      help="allow a --to version the gate rejected (recorded on it as a decision)")
    args = parser.parse_args(argv)
    try:
        if args.command == "pending":
            _print_pending(pending(args.model))
            return 0
        if args.command == "rollback":
            decision = rollback(args.model, args.by, args.reason, to=args.to, force=args.force)
            print(decision.to_dict())
            extra = champion_event(args.model, decision) or {}
            print(emit_asset_event(args.model, {**extra, "decided_by": args.by, "reason": args.reason}))
            from common import alerts

            told = alerts.notify_message(f"{args.model}: champion rolled back to v{decision.version}",
                                         decision.reason, **extra)
            print(f"notified: {', '.join(told) or 'no channel configured'}")
            return 0
        if args.command == "reject":
            decision = reject(args.model, args.version, args.by, args.reason)
        else:
            decision = approve(args.model, args.version, args.by, args.reason)
    except RegistryUserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(decision.to_dict())
    if args.command == "approve" and decision.decision == PROMOTED:
        print(emit_asset_event(args.model, champion_event(args.model, decision) or {}))
    return 0 if decision.decision == (PROMOTED if args.command == "approve" else REJECTED) else 1


if __name__ == "__main__":
    raise SystemExit(main())
