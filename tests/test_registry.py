"""Registry gate, evaluation metrics on the logged model, champion health and MLflow run handling
against a real MLflow server (and, for the health notice, a real HTTP receiver on 127.0.0.1)."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import uuid
from datetime import date
from pathlib import Path

import mlflow
import pytest

from common import alerts, mlflow_utils, registry
from common.config import PromotionGate
from common.mlflow_utils import AirflowIdentity
from tests.helpers import http_receiver

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]

GATE = PromotionGate(metric="mae", greater_is_better=False, threshold_metric="skill_mae",
                     threshold=0.1, min_improvement=0.02)


class Constant(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input, params=None):
        return [0.0] * len(model_input)


def logged_model(experiment: str) -> tuple[str, str]:
    mlflow_utils.configure()
    mlflow.set_experiment(experiment)
    with mlflow.start_run() as run:
        info = mlflow.pyfunc.log_model(name="model", python_model=Constant(), pip_requirements=[])
    return run.info.run_id, info.model_uri


DATA = registry.EvaluationData(name="reg-eval", version="d1", source="/tmp/reg-tests/d1")


def evaluated_model(name: str, experiment: str, metrics: dict,
                    data: registry.EvaluationData = DATA) -> tuple[str, str]:
    """A logged model whose evaluation ``metrics`` are logged as evaluate logs them (no champion)."""
    run_id, uri = logged_model(experiment)
    registry.log_evaluation(workflow_for(name, GATE), run_id, metrics, registry.ChampionScore(None, None),
                            model_uri=uri, data=data)
    return run_id, uri


def register(name: str, experiment: str, metrics: dict) -> tuple[str, str]:
    run_id, uri = evaluated_model(name, experiment, metrics)
    return registry.register_challenger(name, uri, run_id, {"data_version": "d1"}), run_id


@pytest.fixture
def model_name(mlflow_server) -> str:
    return f"test_model_{uuid.uuid4().hex[:8]}"


def champion(name: str) -> str | None:
    mv = registry.alias_version(mlflow_utils.configure(), name, registry.CHAMPION)
    return mv.version if mv else None


def test_first_passing_version_becomes_champion(model_name):
    v1, run_id = register(model_name, "reg-tests", {"mae": 0.5, "skill_mae": 0.2})
    decision = registry.decide(model_name, v1, GATE, {"mae": 0.5, "skill_mae": 0.2}, None, None)
    assert decision.decision == registry.PROMOTED and champion(model_name) == v1
    tags = mlflow_utils.configure().get_model_version(model_name, v1).tags
    assert tags["decision"] == "promoted" and "no champion yet" in tags["decision_reason"]
    assert tags["mlflow_run_id"] == run_id and not [k for k in tags if k.startswith("metric.")]
    # Registering the same run again creates no second version.
    again = registry.register_challenger(model_name, f"runs:/{run_id}/model", run_id, {})
    assert again == v1


def test_threshold_worse_and_marginal_challengers_leave_champion(model_name):
    v1, _ = register(model_name, "reg-tests", {"mae": 0.5, "skill_mae": 0.2})
    registry.decide(model_name, v1, GATE, {"mae": 0.5, "skill_mae": 0.2}, None, None)
    cases = [
        ({"mae": 0.3, "skill_mae": 0.05}, "fails the gate"),  # better, but under the threshold
        ({"mae": 0.6, "skill_mae": 0.15}, "does not beat"),  # worse than the champion
        ({"mae": 0.495, "skill_mae": 0.2}, "does not beat"),  # better by less than 2 %
    ]
    for metrics, why in cases:
        version, _ = register(model_name, "reg-tests", metrics)
        decision = registry.decide(model_name, version, GATE, metrics, 0.5, v1)
        assert decision.decision == registry.REJECTED and why in decision.reason
        assert champion(model_name) == v1
        client = mlflow_utils.configure()
        assert registry.alias_version(client, model_name, registry.CHALLENGER) is None  # decided
        assert client.get_model_version(model_name, version).tags["decision"] == "rejected"


def test_better_challenger_takes_over_and_decision_is_idempotent(model_name):
    v1, _ = register(model_name, "reg-tests", {"mae": 0.5, "skill_mae": 0.2})
    registry.decide(model_name, v1, GATE, {"mae": 0.5, "skill_mae": 0.2}, None, None)
    v2, _ = register(model_name, "reg-tests", {"mae": 0.4, "skill_mae": 0.3})
    first = registry.decide(model_name, v2, GATE, {"mae": 0.4, "skill_mae": 0.3}, 0.5, v1)
    assert first.decision == registry.PROMOTED and (first.champion_before, first.champion_after) == (v1, v2)
    again = registry.decide(model_name, v2, GATE, {"mae": 0.4, "skill_mae": 0.3}, 0.5, v1)
    assert again.decision == registry.PROMOTED and champion(model_name) == v2


def test_stale_evaluation_never_promotes(model_name):
    v1, _ = register(model_name, "reg-tests", {"mae": 0.5, "skill_mae": 0.2})
    registry.decide(model_name, v1, GATE, {"mae": 0.5, "skill_mae": 0.2}, None, None)
    v2, _ = register(model_name, "reg-tests", {"mae": 0.1, "skill_mae": 0.8})
    # Evaluated when there was no champion yet: the comparison no longer holds.
    decision = registry.decide(model_name, v2, GATE, {"mae": 0.1, "skill_mae": 0.8}, None, None)
    assert decision.decision == registry.REJECTED and "champion changed" in decision.reason
    assert champion(model_name) == v1


def test_approval_required_waits_then_promotes(model_name):
    gate = PromotionGate(**{**GATE.__dict__, "require_approval": True})
    v1, _ = register(model_name, "reg-tests", {"mae": 0.5, "skill_mae": 0.2})
    decision = registry.decide(model_name, v1, gate, {"mae": 0.5, "skill_mae": 0.2}, None, None)
    assert decision.decision == registry.PENDING and champion(model_name) is None
    approved = registry.approve(model_name, v1, "alice")
    assert approved.decision == registry.PROMOTED and champion(model_name) == v1
    assert "approved by alice" in approved.reason
    with pytest.raises(ValueError, match="not 'pending_approval'"):
        registry.approve(model_name, v1, "bob")


def _race(args):
    name, version, uri = args
    import os

    os.environ["MLFLOW_TRACKING_URI"] = uri
    return registry.decide(name, version, GATE, {"mae": 0.3, "skill_mae": 0.5}, None, None).decision


def test_two_runs_finishing_at_once_cannot_both_win(model_name, mlflow_server):
    versions = [register(model_name, "reg-tests", {"mae": 0.3, "skill_mae": 0.5})[0] for _ in range(2)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        outcomes = pool.map(_race, [(model_name, v, mlflow_server) for v in versions])
    assert sorted(outcomes) == [registry.PROMOTED, registry.REJECTED]
    assert champion(model_name) == versions[outcomes.index(registry.PROMOTED)]


def test_retried_task_continues_its_own_run(mlflow_server):
    who = AirflowIdentity("dag_x", f"manual__{uuid.uuid4().hex}", "train", try_number=1)
    with pytest.raises(RuntimeError):
        with mlflow_utils.task_run("resume-tests", who, "d1") as run:
            mlflow.log_metric("epoch_loss", 1.0, step=0)
            raise RuntimeError("worker killed")
    first_id = run.info.run_id
    retry = AirflowIdentity(who.dag_id, who.run_id, who.task_id, try_number=2)
    with mlflow_utils.task_run("resume-tests", retry, "d1") as run:
        mlflow.log_metric("epoch_loss", 0.5, step=1)
    assert run.info.run_id == first_id
    client = mlflow_utils.configure()
    finished = client.get_run(first_id)
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["airflow.try_number"] == "2"
    assert finished.data.tags["data_version"] == "d1" and finished.data.tags["git_commit"]
    assert [m.value for m in client.get_metric_history(first_id, "epoch_loss")] == [1.0, 0.5]
    runs = mlflow.search_runs(experiment_names=["resume-tests"], output_format="list",
                              filter_string=f"tags.`airflow.run_id` = '{who.run_id}'")
    assert len(runs) == 1


def registry_cli(*args: str, uri: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    return subprocess.run([sys.executable, "-m", "common.registry", *args], cwd=ROOT / "dags", env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_user_errors_are_one_line_and_exit_2(model_name, mlflow_server):
    v1, _ = register(model_name, "reg-tests", {"mae": 0.5, "skill_mae": 0.2})
    missing = registry_cli("approve", model_name, "99", uri=mlflow_server)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0, missing.stderr
    assert missing.stderr.startswith("error: ") and "v99 does not exist" in missing.stderr
    registry.decide(model_name, v1, GATE, {"mae": 0.5, "skill_mae": 0.2}, None, None)  # promoted
    not_pending = registry_cli("approve", model_name, v1, uri=mlflow_server)
    assert not_pending.returncode == 2 and not_pending.stderr.strip().count("\n") == 0, not_pending.stderr
    assert "'promoted', not 'pending_approval'" in not_pending.stderr


def test_cli_pending_lists_versions_awaiting_approval_with_metrics(model_name, mlflow_server):
    gate = PromotionGate(**{**GATE.__dict__, "require_approval": True})
    v1, _ = register(model_name, "reg-tests", {"mae": 0.5, "skill_mae": 0.2, "rmse": 0.7})
    registry.decide(model_name, v1, gate, {"mae": 0.5, "skill_mae": 0.2}, None, None)
    rows = registry.pending(model_name)
    assert [(r.version, r.metrics, r.evaluated_against) for r in rows] == [(v1, {"mae": 0.5, "skill_mae": 0.2}, "none")]
    # Read from the version's logged model (its model metrics): no metric.* tags any more.
    assert not [k for k in mlflow_utils.configure().get_model_version(model_name, v1).tags if k.startswith("metric.")]
    listed = registry_cli("pending", model_name, uri=mlflow_server)
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if line.startswith(model_name)]
    assert f" {v1} " in row and "mae=0.5" in row and "skill_mae=0.2" in row and "waiting for approval" in row
    assert registry_cli("approve", model_name, v1, "--by", "alice", uri=mlflow_server).returncode == 0
    assert registry.pending(model_name) == []


def workflow_for(model_name: str, gate: PromotionGate):
    from dataclasses import replace

    from common import config

    return replace(config.get("power_lgbm_training"), model_name=model_name, gate=gate)


def test_registry_scores_the_champion_on_the_gate_metric_from_config_alone(model_name):
    """The pipeline hands the registry a scorer; the registry picks the champion (its version
    pinned in the URI), reads the score under the gate's metric and records it as
    champion_<metric>. A gate whose metric is changed in config works without touching the
    pipeline; a scorer that fails leaves the champion unscored, and the gate keeps it."""
    v1, _ = register(model_name, "reg-tests", {"mae": 0.5, "skill_mae": 0.2})
    registry.decide(model_name, v1, GATE, {"mae": 0.5, "skill_mae": 0.2}, None, None)
    seen: list[str] = []

    def scorer(uri: str) -> dict[str, float]:
        seen.append(uri)
        return {"mae": 0.4, "rmse": 0.9}

    assert registry.score_champion(workflow_for(model_name, GATE), scorer) == registry.ChampionScore(v1, 0.4)
    assert seen == [f"models:/{model_name}/{v1}"]
    rmse_gate = PromotionGate(metric="rmse", greater_is_better=False, threshold_metric="skill_mae",
                              threshold=0.1)
    assert registry.score_champion(workflow_for(model_name, rmse_gate), scorer).score == 0.9

    def broken(uri: str) -> dict[str, float]:
        raise ValueError("feature set from older code")

    assert registry.score_champion(workflow_for(model_name, GATE), broken) == registry.ChampionScore(v1, None)
    assert registry.score_champion(workflow_for(model_name, GATE), lambda uri: {"rmse": 1.0}).score is None

    # Evaluated with the champion unscored: a passing challenger is still refused.
    run_id, uri = logged_model("reg-tests")
    evaluated = registry.log_evaluation(workflow_for(model_name, GATE), run_id,
                                        {"mae": 0.1, "skill_mae": 0.5}, registry.ChampionScore(v1, None))
    assert evaluated == {"metrics": {"mae": 0.1, "skill_mae": 0.5}, "champion_version": v1, "champion_score": None}
    decision = registry.register_and_decide(workflow_for(model_name, GATE), {"run_id": run_id, "model_uri": uri},
                                            evaluated, {"data_version": "d2"})
    assert decision.decision == registry.REJECTED and "could not be scored" in decision.reason
    assert champion(model_name) == v1
    # Scored: the champion's score is logged beside the challenger's, under the gate's metric.
    run_id, uri = logged_model("reg-tests")
    evaluated = registry.log_evaluation(workflow_for(model_name, GATE), run_id,
                                        {"mae": 0.1, "skill_mae": 0.5}, registry.ChampionScore(v1, 0.5))
    assert mlflow.get_run(run_id).data.metrics["champion_mae"] == 0.5
    decision = registry.register_and_decide(workflow_for(model_name, GATE), {"run_id": run_id, "model_uri": uri},
                                            evaluated, {"data_version": "d3"}, auto_promote=True)
    assert decision.decision == registry.PROMOTED and champion(model_name) == decision.version


def test_no_champion_means_nothing_to_score(model_name):
    called = []
    score = registry.score_champion(workflow_for(model_name, GATE), lambda uri: called.append(uri) or {"mae": 1})
    assert score == registry.ChampionScore(None, None) and called == []


# -- the registry as people see it in MLflow: metrics on the logged model, data as a dataset -------


def test_evaluation_metrics_live_on_the_logged_model_with_their_dataset(model_name, tmp_path):
    data = registry.EvaluationData(name="household_power-eval-2010-10-02", version="power-0123456789abcdef",
                                   source=str(tmp_path / "power-0123456789abcdef"), day=date(2010, 11, 26),
                                   profile={"hours": 1344})
    run_id, uri = logged_model("reg-tests")
    metrics = {"mae": 0.5, "skill_mae": 0.2, "baseline_mae": 0.62}
    for _ in range(2):  # a retried evaluate logs the same again: still one dataset, one value per key
        registry.log_evaluation(workflow_for(model_name, GATE), run_id, metrics,
                                registry.ChampionScore(None, None), model_uri=uri, data=data)
    client = mlflow_utils.configure()
    model = client.get_logged_model(registry.logged_model_id(uri))
    assert {m.key for m in model.metrics} == set(metrics)
    for m in model.metrics:
        assert m.value == metrics[m.key] and m.run_id == run_id
        assert (m.dataset_name, m.dataset_digest) == (data.name, data.version)
    run = client.get_run(run_id)
    (used,) = run.inputs.dataset_inputs
    assert (used.dataset.name, used.dataset.digest) == (data.name, data.version)
    assert {t.key: t.value for t in used.tags}["mlflow.data.context"] == "evaluation"
    assert json.loads(used.dataset.source) == {"uri": data.source}
    assert json.loads(used.dataset.profile) == {"hours": 1344}
    assert run.data.metrics == metrics  # the run shows them too

    version = registry.register_challenger(model_name, uri, run_id, {"data_version": data.version})
    mv = client.get_model_version(model_name, version)
    assert not [k for k in mv.tags if k.startswith("metric.")]
    assert mv.tags["data_version"] == data.version and mv.tags["mlflow_run_id"] == run_id
    assert registry.version_metrics(client, mv) == metrics


def test_version_metrics_fall_back_to_the_run(model_name):
    """A version whose logged model has no metrics (evaluated before they moved to the model)."""
    run_id, uri = logged_model("reg-tests")
    client = mlflow_utils.configure()
    client.log_metric(run_id, "mae", 0.7)  # a run metric only
    version = registry.register_challenger(model_name, uri, run_id, {})
    assert not client.get_logged_model(registry.logged_model_id(uri)).metrics
    assert registry.version_metrics(client, client.get_model_version(model_name, version)) == {"mae": 0.7}


# -- champion health -------------------------------------------------------------------------------


@pytest.fixture
def webhook(monkeypatch):
    """A real HTTP receiver on 127.0.0.1 as the alerts_webhook connection (the only channel)."""
    with http_receiver() as (url, received):
        for conn_id in alerts.CHANNELS:
            monkeypatch.delenv(f"AIRFLOW_CONN_{conn_id.upper()}", raising=False)
        monkeypatch.setenv("AIRFLOW_CONN_ALERTS_WEBHOOK", json.dumps({"conn_type": "http", "extra": {"url": url}}))
        yield received


def test_champion_health_is_a_daily_series_on_its_model_and_degradation_notifies(model_name, webhook):
    """Each evaluation scores the champion on the newest data: one more point of
    champion_health_<metric> on the champion's logged model (step = the data's day), and a notice
    once it is worse than when it was promoted by more than the workflow's tolerance (20 %)."""
    v1, champion_run = register(model_name, "reg-tests", {"mae": 0.5, "skill_mae": 0.2})  # promoted with 0.5
    registry.decide(model_name, v1, GATE, {"mae": 0.5, "skill_mae": 0.2}, None, None)
    workflow = workflow_for(model_name, GATE)
    assert workflow.health_tolerance == 0.2
    client = mlflow_utils.configure()
    days = [date(2010, 11, 24), date(2010, 11, 25), date(2010, 11, 26)]
    scores = [0.55, 0.58, 0.65]  # 10 %, 16 % (within the tolerance), 30 % worse (over it)
    for n, (day, score) in enumerate(zip(days, scores, strict=True), start=1):
        data = registry.EvaluationData(name=f"power-eval-{day}", version=f"power-{n:016d}", source="/tmp/d", day=day)
        run_id, uri = logged_model("reg-tests")
        registry.log_evaluation(workflow, run_id, {"mae": 0.3, "skill_mae": 0.4},
                                registry.ChampionScore(v1, score), model_uri=uri, data=data)
        history = client.get_metric_history(champion_run, "champion_health_mae")
        assert [(m.value, m.step) for m in history] == [
            (s, (d - date(1970, 1, 1)).days) for d, s in zip(days[:n], scores[:n], strict=False)]
        # The champion's score is the challenger run's metric, never the challenger model's.
        assert client.get_run(run_id).data.metrics["champion_mae"] == score
        assert "champion_mae" not in {m.key for m in client.get_logged_model(registry.logged_model_id(uri)).metrics}
        tags = client.get_model_version(model_name, v1).tags
        if n < 3:
            assert tags["champion_health"] == "ok" and "within the tolerance of 20%" in tags["champion_health_detail"]
            assert webhook == [], "no notice while the champion is within the tolerance"

    on_model = [m for m in client.get_logged_model(registry.logged_model_id(
        client.get_model_version(model_name, v1).source)).metrics if m.key == "champion_health_mae"]
    assert sorted((m.step, m.value, m.dataset_name) for m in on_model) == [
        ((d - date(1970, 1, 1)).days, s, f"power-eval-{d}") for d, s in zip(days, scores, strict=True)]
    degradation = client.get_metric_history(champion_run, registry.HEALTH_DEGRADATION)
    assert [round(m.value, 6) for m in degradation] == [0.1, 0.16, 0.3]
    assert tags["champion_health"] == "degraded"
    assert "30.0% worse than when promoted (0.5)" in tags["champion_health_detail"]
    (notice,) = webhook
    assert notice["subject"] == f"{model_name} champion v{v1} degraded: mae 0.65 (was 0.5 when promoted)"
    assert "over the tolerance of 20%" in notice["text"] and champion_run in notice["text"]
    assert notice["extra"]["version"] == v1 and notice["extra"]["degradation"] == pytest.approx(0.3)
    assert notice["extra"]["data_version"] == "power-0000000000000003"


def test_degradation_follows_the_direction_of_the_gate():
    accuracy = PromotionGate(metric="test_accuracy", greater_is_better=True, threshold_metric="test_accuracy",
                             threshold=0.9)
    assert registry.degradation(accuracy, 0.95, 0.76) == pytest.approx(0.2)  # 20 % lower accuracy
    assert registry.degradation(accuracy, 0.95, 0.99) < 0
    assert registry.degradation(GATE, 0.5, 0.6) == pytest.approx(0.2)  # 20 % higher MAE
    assert registry.degradation(GATE, 0.5, 0.4) == pytest.approx(-0.2)
