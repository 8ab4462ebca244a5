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

CLI: ``python -m common.registry approve MODEL VERSION`` promotes a version that waits for approval.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import mlflow
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from common import config, mlflow_utils
from common.config import PromotionGate, WorkflowConfig
from common.mlflow_utils import configure

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
PROMOTED, REJECTED, PENDING = "promoted", "rejected", "pending_approval"
NO_CHAMPION = "none"
TAG_DECISION, TAG_REASON = "decision", "decision_reason"
TAG_EVALUATED_AGAINST = "evaluated_against_champion"


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
    path = config.locks_dir() / f"registry-{model_name}.lock"
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
        with contextlib.suppress(MlflowException):  # exists already
            client.create_registered_model(model_name)
        mv = mlflow.register_model(model_uri, model_name)
        version = str(mv.version)
        _wait_ready(client, model_name, version)
    all_tags = {**tags, "mlflow_run_id": run_id,
                **{f"metric.{k}": f"{float(v):.6g}" for k, v in metrics.items()}}
    for key, value in all_tags.items():
        client.set_model_version_tag(model_name, version, key, str(value))
    client.set_registered_model_alias(model_name, CHALLENGER, version)
    return version


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
    log.info("%s v%s: %s (%s)", model_name, version, decision, reason)
    return Decision(model_name, version, decision, reason, before, after)


def log_evaluation(run_id: str, metrics: Mapping[str, float], champion_version: str | None,
                   write_artifacts: Callable[[str], None] | None = None) -> None:
    """The evaluate step's MLflow side, shared by every workflow: metrics, the champion they were
    compared with (what ``decide`` re-checks), and files ``write_artifacts(folder)`` writes,
    logged under ``evaluation/``."""
    with mlflow_utils.reopen_run(run_id):
        mlflow.log_metrics(dict(metrics))
        mlflow.set_tag(TAG_EVALUATED_AGAINST, champion_version or NO_CHAMPION)
        if write_artifacts is not None:
            with tempfile.TemporaryDirectory() as folder:
                write_artifacts(folder)
                mlflow.log_artifacts(folder, artifact_path="evaluation")


def register_and_decide(workflow: WorkflowConfig, trained: Mapping[str, Any], evaluated: Mapping[str, Any],
                        tags: Mapping[str, str], ineligible_reason: str | None = None) -> Decision:
    """The register step every workflow shares: register the trained model as challenger (with
    its lineage tags and the git commit), then apply the workflow's gate against the champion
    that evaluation scored on the same data."""
    metrics = evaluated["metrics"]
    version = register_challenger(workflow.model_name, trained["model_uri"], trained["run_id"], metrics,
                                  tags={**tags, "git_commit": mlflow_utils.git_commit()})
    return decide(workflow.model_name, version, workflow.gate, metrics,
                  champion_score=metrics.get("champion_" + workflow.gate.metric),
                  evaluated_against=evaluated.get("champion_version"), ineligible_reason=ineligible_reason)


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
        tags = client.get_model_version(model_name, version).tags
        if tags.get(TAG_DECISION) != PENDING:
            raise ValueError(f"{model_name} v{version} is {tags.get(TAG_DECISION, 'undecided')!r}, "
                             f"not {PENDING!r}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Approve a challenger that waits for approval")
    sub = parser.add_subparsers(dest="command", required=True)
    approve_cmd = sub.add_parser("approve")
    approve_cmd.add_argument("model")
    approve_cmd.add_argument("version")
    approve_cmd.add_argument("--by", default="cli", help="who approves (recorded in the reason)")
    args = parser.parse_args(argv)
    decision = approve(args.model, args.version, args.by)
    print(decision.to_dict())
    return 0 if decision.decision == PROMOTED else 1


if __name__ == "__main__":
    raise SystemExit(main())
