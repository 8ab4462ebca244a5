"""Model registry: register a challenger, then move ``champion`` only through the gate.

The protocol, per registered model:

1. ``register_challenger`` registers the run's model as a new version (or finds the version this
   run already registered: re-running the task creates nothing twice), tags it with its metrics
   and lineage, and points the ``challenger`` alias at it.
2. ``decide`` applies the workflow's :class:`~common.config.PromotionGate` and records the outcome
   as version tags ``decision`` (promoted | rejected | pending_approval) and ``decision_reason``.

Evaluation scored the challenger and the then-champion on the same data. ``decide`` re-reads the
champion under an exclusive lock and refuses to promote when the champion is no longer the one the
challenger was compared with (compare-and-set). So of two runs finishing at once, at most one wins:
the second sees a champion it never beat. The lock is a file lock (one host); on a cluster every
register task also runs in the one-slot ``model_registry`` pool.

CLI (from dags/):

    python -m common.registry pending [MODEL]            # versions waiting for approval, with metrics
    python -m common.registry approve MODEL VERSION --by NAME

A mistake of the person at the keyboard (no such version, a version not waiting for approval) is
one line ``error: ...`` on stderr and exit code 2; anything unexpected keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from common import config, mlflow_utils
from common.config import PromotionGate, WorkflowConfig
from common.mlflow_utils import configure
from scripts.core import paths

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
PROMOTED, REJECTED, PENDING = "promoted", "rejected", "pending_approval"
NO_CHAMPION = "none"
TAG_DECISION, TAG_REASON = "decision", "decision_reason"
TAG_EVALUATED_AGAINST = "evaluated_against_champion"
TAG_GATE_METRIC, TAG_GATE_THRESHOLD_METRIC = "gate_metric", "gate_threshold_metric"


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


def register_challenger(model_name: str, model_uri: str, run_id: str,
                        metrics: Mapping[str, float], tags: Mapping[str, str]) -> str:
    """Register (once per run) and alias the version ``challenger``; returns the version."""
    client = configure()
    existing = client.search_model_versions(f"name = '{model_name}' AND run_id = '{run_id}'")
    if existing:
        version = str(max(int(v.version) for v in existing))
        log.info("run %s already registered as %s v%s", run_id, model_name, version)
    else:
        version = _create_version(client, model_name, model_uri, run_id)
        _wait_ready(client, model_name, version)
    all_tags = {**tags, "mlflow_run_id": run_id,
                **{f"metric.{k}": f"{float(v):.6g}" for k, v in metrics.items()}}
    for key, value in all_tags.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return version


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
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    mv = client.create_model_version(model_name, source=model_uri, run_id=run_id, model_id=model_id)
    if model_id:  # the logged model's link to its registered versions, as register_model keeps it
        with contextlib.suppress(MlflowException):
            from mlflow.utils.mlflow_tags import MLFLOW_MODEL_VERSIONS

            links = json.loads(client.get_logged_model(model_id).tags.get(MLFLOW_MODEL_VERSIONS) or "[]")
            links.append({"name": mv.name, "version": mv.version})
            client.set_logged_model_tags(model_id, {MLFLOW_MODEL_VERSIONS: json.dumps(links)})
    log.info("registered %s as %s v%s", model_uri, model_name, mv.version)
    return str(mv.version)


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
            client.set_registered_model_alias(model_name, CHAMPION, version)
            after = version
        _record(client, model_name, version, decision, reason, evaluated_against)
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


def log_evaluation(workflow: WorkflowConfig, run_id: str, metrics: Mapping[str, float],
                   champion: ChampionScore,
                   write_artifacts: Callable[[str], None] | None = None) -> Evaluated:
    """The evaluate step's MLflow side, shared by every workflow: the challenger's metrics, the
    champion's score beside them as ``champion_<gate metric>``, the champion they were compared
    with (what ``decide`` re-checks), and files ``write_artifacts(folder)`` writes, logged under
    ``evaluation/``. Returns the step's XCom."""
    logged = {k: float(v) for k, v in metrics.items()}
    if champion.score is not None:
        logged[CHAMPION + "_" + workflow.gate.metric] = champion.score
    with mlflow_utils.reopen_run(run_id):
        mlflow.log_metrics(logged)
        mlflow.set_tag(TAG_EVALUATED_AGAINST, champion.version or NO_CHAMPION)
        if write_artifacts is not None:
            with tempfile.TemporaryDirectory() as folder:
                write_artifacts(folder)
                mlflow.log_artifacts(folder, artifact_path="evaluation")
    return Evaluated(metrics=logged, champion_version=champion.version, champion_score=champion.score)


def register_and_decide(workflow: WorkflowConfig, trained: Mapping[str, Any], evaluated: Evaluated,
                        tags: Mapping[str, str], ineligible_reason: str | None = None) -> Decision:
    """The register step every workflow shares: register the trained model as challenger (with
    its lineage tags and the git commit), then apply the workflow's gate against the champion
    that evaluation scored on the same data."""
    metrics = evaluated["metrics"]
    version = register_challenger(workflow.model_name, trained["model_uri"], trained["run_id"], metrics,
                                  tags={**tags, "git_commit": mlflow_utils.git_commit()})
    return decide(workflow.model_name, version, workflow.gate, metrics,
                  champion_score=evaluated["champion_score"],
                  evaluated_against=evaluated["champion_version"], ineligible_reason=ineligible_reason)


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
        return PENDING, reason + "; waiting for approval"
    return PROMOTED, reason


def _record(client: MlflowClient, name: str, version: str, decision: str, reason: str,
            evaluated_against: str | None) -> None:
    client.set_model_version_tag(name, version, TAG_DECISION, decision)
    client.set_model_version_tag(name, version, TAG_REASON, reason)
    client.set_model_version_tag(name, version, TAG_EVALUATED_AGAINST, evaluated_against or NO_CHAMPION)
    client.set_model_version_tag(name, version, "decided_at", datetime.now(UTC).isoformat())


def approve(model_name: str, version: str, approver: str) -> Decision:
    """A person's approval: promote a ``pending_approval`` version if the champion is unchanged."""
    client = configure()
    with promotion_lock(model_name):
        tags = _version(client, model_name, version).tags
        if tags.get(TAG_DECISION) != PENDING:
            raise NotPending(f"{model_name} v{version} is {tags.get(TAG_DECISION, 'undecided')!r}, "
                             f"not {PENDING!r}: only a version waiting for approval can be approved")
        champion = alias_version(client, model_name, CHAMPION)
        before = champion.version if champion else None
        against = tags.get(TAG_EVALUATED_AGAINST, NO_CHAMPION)
        if (before or NO_CHAMPION) != against:
            reason = f"champion changed from {against} to {before} since evaluation"
            _record(client, model_name, version, REJECTED, reason, against)
            return Decision(model_name, version, REJECTED, reason, before, before)
        client.set_registered_model_alias(model_name, CHAMPION, version)
        reason = tags.get(TAG_REASON, "") + f"; approved by {approver}"
        _record(client, model_name, version, PROMOTED, reason, against)
        return Decision(model_name, version, PROMOTED, reason, before, version)


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
    metrics: dict[str, float]  # the gate's metric and threshold metric (every metric if unknown)
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
            recorded = {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")}
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
    parser = argparse.ArgumentParser(description="Challengers that wait for a person's approval")
    sub = parser.add_subparsers(dest="command", required=True)
    pending_cmd = sub.add_parser("pending", help="list versions waiting for approval, with their metrics")
    pending_cmd.add_argument("model", nargs="?", help="only this registered model")
    approve_cmd = sub.add_parser("approve", help="promote a version waiting for approval")
    approve_cmd.add_argument("model")
    approve_cmd.add_argument("version")
    approve_cmd.add_argument("--by", default="cli", help="who approves (recorded in the reason)")
    args = parser.parse_args(argv)
    try:
        if args.command == "pending":
            _print_pending(pending(args.model))
            return 0
        decision = approve(args.model, args.version, args.by)
    except RegistryUserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(decision.to_dict())
    return 0 if decision.decision == PROMOTED else 1


if __name__ == "__main__":
    raise SystemExit(main())
