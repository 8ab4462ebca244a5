"""Approval, rejection, timeout and rollback in the registry, against a real MLflow server; the
DAG files' approval steps (the tasks after ``register``) checked as parsed."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from common import config, mlflow_utils, registry
from common.config import PromotionGate
from tests.test_registry import champion, logged_model, registry_cli, workflow_for

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
GATE = PromotionGate(metric="mae", greater_is_better=False, threshold_metric="skill_mae",
                     threshold=0.1, min_improvement=0.02)
GOOD = {"mae": 0.5, "skill_mae": 0.2}


@pytest.fixture
def model_name(mlflow_server) -> str:
    return f"approval_model_{uuid.uuid4().hex[:8]}"


def tags(name: str, version: str) -> dict[str, str]:
    return mlflow_utils.configure().get_model_version(name, version).tags


def challenger(name: str, metrics: dict, champion_version: str | None, champion_score: float | None,
               auto_promote: bool | None) -> tuple[dict, registry.Decision]:
    run_id, uri = logged_model("approval-tests")
    evaluated = registry.log_evaluation(workflow_for(name, GATE), run_id, metrics,
                                        registry.ChampionScore(champion_version, champion_score))
    trained = {"run_id": run_id, "model_uri": uri}
    decision = registry.register_and_decide(workflow_for(name, GATE), trained, evaluated, {"data_version": "d1"},
                                            auto_promote=auto_promote)
    return registry.register_result(workflow_for(name, GATE), trained, evaluated, decision, "d1"), decision


def test_auto_promote_follows_the_run_parameter_else_the_config():
    power = config.get("power_lgbm_training")
    assert power.auto_promote is False  # approval required by default
    assert registry.wants_auto_promote(power, {}) is False
    assert registry.wants_auto_promote(power, {"auto_promote": None}) is False
    assert registry.wants_auto_promote(power, {"auto_promote": True}) is True
    assert registry.wants_auto_promote(power, {"auto_promote": "false", "num_boost_round": "3"}) is False  # CLI
    assert registry.wants_auto_promote(power, {"auto_promote": "true"}) is True
    with pytest.raises(ValueError, match="auto_promote"):
        registry.wants_auto_promote(power, {"auto_promote": "yes please"})
    from dataclasses import replace

    assert registry.wants_auto_promote(replace(power, auto_promote=True), {"auto_promote": False}) is False


def test_passing_challenger_waits_and_its_form_shows_both_scores(model_name):
    result, decision = challenger(model_name, GOOD, None, None, auto_promote=None)
    assert decision.decision == registry.PENDING and champion(model_name) is None
    assert result["champion_event"] is None
    body = result["approval_body"]
    assert f"v{decision.version}" in body and "| mae | 0.5 |" in body and "data version: `d1`" in body
    assert "/#/experiments/" in body and "all evaluation artifacts" in body
    # A later challenger, compared with a champion: both scores on the form.
    registry.approve(model_name, decision.version, "alice")
    second, d2 = challenger(model_name, {"mae": 0.3, "skill_mae": 0.4, "baseline_mae": 0.9},
                            decision.version, 0.5, auto_promote=False)
    assert d2.decision == registry.PENDING
    assert f"champion v{decision.version}" in second["approval_body"]
    assert "| mae | 0.3 | 0.5 |" in second["approval_body"]
    assert "| baseline_mae (baseline) | 0.9 |" in second["approval_body"]


def first_alias_in_model_list(name: str) -> str | None:
    """The alias MLflow's registered model list shows first ("Aliased versions"): its UI (3.17,
    ModelsTableAliasedVersionsCell) sorts the model's aliases by version, newest first, and shows
    the first; equal versions keep the server's order."""
    (model,) = mlflow_utils.configure().search_registered_models(f"name = '{name}'")
    aliases = sorted(model.aliases.items() if isinstance(model.aliases, dict) else
                     [(a.alias, a.version) for a in model.aliases], key=lambda a: int(a[1]), reverse=True)
    return aliases[0][0] if aliases else None


def test_the_model_list_shows_champion_first_unless_a_version_waits(model_name):
    _, first = challenger(model_name, GOOD, None, None, auto_promote=True)
    assert first.decision == registry.PROMOTED and first_alias_in_model_list(model_name) == "champion"
    _, worse = challenger(model_name, {"mae": 0.6, "skill_mae": 0.2}, first.version, 0.5, auto_promote=True)
    assert worse.decision == registry.REJECTED and first_alias_in_model_list(model_name) == "champion"
    # A version waiting for a person is what the list should show first ...
    _, waiting = challenger(model_name, {"mae": 0.3, "skill_mae": 0.4}, first.version, 0.5, auto_promote=False)
    assert first_alias_in_model_list(model_name) == "challenger"
    # ... until it is decided, either way.
    registry.reject(model_name, waiting.version, "bob", "not this week")
    assert first_alias_in_model_list(model_name) == "champion"
    _, again = challenger(model_name, {"mae": 0.3, "skill_mae": 0.4}, first.version, 0.5, auto_promote=False)
    registry.approve(model_name, again.version, "alice")
    assert first_alias_in_model_list(model_name) == "champion" and champion(model_name) == again.version
    client = mlflow_utils.configure()
    assert client.get_model_version(model_name, again.version).aliases == ["champion"]
    # A retry of register on a decided version does not hand the alias back.
    mv = client.get_model_version(model_name, worse.version)
    registry.register_challenger(model_name, mv.source, mv.run_id, {})
    assert first_alias_in_model_list(model_name) == "champion"


def test_failing_challenger_never_reaches_approval(model_name):
    result, decision = challenger(model_name, {"mae": 0.5, "skill_mae": 0.01}, None, None, auto_promote=False)
    assert decision.decision == registry.REJECTED and result["approval_body"] is None
    assert tags(model_name, decision.version)["decided_by"] == "gate"


def test_unattended_promotion_announces_the_new_champion(model_name):
    result, decision = challenger(model_name, GOOD, None, None, auto_promote=True)
    assert decision.decision == registry.PROMOTED and champion(model_name) == decision.version
    event = result["champion_event"]
    assert event["model_name"] == model_name and event["version"] == decision.version
    assert event["metric"] == "mae" and event["value"] == 0.5 and event["previous_version"] == "none"
    assert tags(model_name, decision.version)["decided_by"] == "gate"


def test_approval_answers_approve_reject_and_timeout(model_name):
    _, first = challenger(model_name, GOOD, None, None, auto_promote=False)
    answer = {"chosen_options": ["Approve"], "params_input": {"reason": "looks right"},
              "responded_by_user": {"id": "7", "name": "alice"}}
    approved = registry.resolve_approval(model_name, first.version, answer)
    assert approved.decision == registry.PROMOTED and champion(model_name) == first.version
    t = tags(model_name, first.version)
    assert t["decision"] == "promoted" and t["decided_by"] == "alice" and t["previous_champion"] == "none"
    assert t["decision_reason"].startswith("approved by alice: looks right; gate: ")
    assert not t["decision_reason"].endswith("waiting for approval")
    assert registry.champion_event(model_name, approved)["version"] == first.version
    # Answered twice (a retry of promote): nothing changes, no second event.
    again = registry.resolve_approval(model_name, first.version, answer)
    assert again.decision == registry.PROMOTED and registry.champion_event(model_name, again) is None

    _, second = challenger(model_name, {"mae": 0.3, "skill_mae": 0.4}, first.version, 0.5, auto_promote=False)
    rejected = registry.resolve_approval(model_name, second.version, {
        "chosen_options": ["Reject"], "params_input": {"reason": "drift week"},
        "responded_by_user": {"id": "8", "name": "bob"}})
    assert rejected.decision == registry.REJECTED and champion(model_name) == first.version
    t = tags(model_name, second.version)
    assert (t["decision"], t["decided_by"], t["decision_reason"]) == ("rejected", "bob", "rejected by bob: drift week")
    assert registry.champion_event(model_name, rejected) is None

    _, third = challenger(model_name, {"mae": 0.3, "skill_mae": 0.4}, first.version, 0.5, auto_promote=False)
    timed_out = registry.resolve_approval(model_name, third.version, {
        "chosen_options": ["Reject"], "params_input": {"reason": ""}, "responded_by_user": None})
    assert timed_out.decision == registry.REJECTED and champion(model_name) == first.version
    t = tags(model_name, third.version)
    assert t["decided_by"] == "timeout" and "no answer within the approval timeout" in t["decision_reason"]


def test_approval_after_the_champion_moved_is_refused(model_name):
    _, first = challenger(model_name, GOOD, None, None, auto_promote=False)
    _, second = challenger(model_name, GOOD, None, None, auto_promote=False)  # both against "none"
    registry.approve(model_name, first.version, "alice")
    late = registry.approve(model_name, second.version, "bob", "fine")
    assert late.decision == registry.REJECTED and champion(model_name) == first.version
    assert "champion changed" in tags(model_name, second.version)["decision_reason"]


def test_rollback_restores_the_previous_champion_and_records_who_and_why(model_name, monkeypatch):
    _, first = challenger(model_name, GOOD, None, None, auto_promote=True)
    _, second = challenger(model_name, {"mae": 0.3, "skill_mae": 0.4}, first.version, 0.5, auto_promote=True)
    assert champion(model_name) == second.version
    back = registry.rollback(model_name, "carol", "complaints from serving")
    assert (back.champion_before, back.champion_after) == (second.version, first.version)
    assert champion(model_name) == first.version
    old, restored = tags(model_name, second.version), tags(model_name, first.version)
    assert old["decision"] == "rolled_back" and old["decided_by"] == "carol"
    assert "complaints from serving" in old["decision_reason"]
    assert restored["restored_by"] == "carol" and restored["restored_from"] == second.version
    event = registry.champion_event(model_name, back)
    assert event["version"] == first.version and event["previous_version"] == second.version
    with pytest.raises(registry.RegistryUserError, match="replaced no earlier champion"):
        registry.rollback(model_name, "carol", "again")  # v1 replaced nobody
    assert registry.rollback(model_name, "carol", "forward again", to=second.version).champion_after == second.version
    # Without Airflow API credentials the event cannot be posted: said, not raised.
    said = registry.emit_asset_event(model_name, event, env={})
    assert said.startswith("asset event NOT emitted") and registry.model_asset_name(model_name) in said


def test_cli_reject_and_rollback(model_name, mlflow_server):
    _, first = challenger(model_name, GOOD, None, None, auto_promote=True)
    _, second = challenger(model_name, {"mae": 0.3, "skill_mae": 0.4}, first.version, 0.5, auto_promote=False)
    done = registry_cli("reject", model_name, second.version, "--by", "dan", "--reason", "not now", uri=mlflow_server)
    assert done.returncode == 0, done.stderr
    assert tags(model_name, second.version)["decided_by"] == "dan"
    missing = registry_cli("rollback", model_name, "--by", "dan", "--reason", "x", uri=mlflow_server)
    assert missing.returncode == 2 and "replaced no earlier champion" in missing.stderr
    third = challenger(model_name, {"mae": 0.2, "skill_mae": 0.5}, first.version, 0.5, auto_promote=True)[1]
    assert champion(model_name) == third.version
    back = registry_cli("rollback", model_name, "--by", "dan", "--reason", "bad week", uri=mlflow_server)
    assert back.returncode == 0, back.stderr
    assert champion(model_name) == first.version
    assert "asset event NOT emitted" in back.stdout  # no AIRFLOW_API_* in this environment


# Each side imports the registry, says it is ready, waits for the start file and runs the CLI's
# main(): the two commands reach approve()/reject() at the same instant, not a process start apart.
AT_ONCE = """import os, sys, time
from common import registry
open(f"{sys.argv[1]}.{os.getpid()}", "w").close()
while not os.path.exists(sys.argv[1]):
    time.sleep(0.005)
raise SystemExit(registry.main(sys.argv[2:]))"""


@pytest.mark.reliability(case="8.7 two CLI answers at once",
                         fault="`python -m common.registry approve` and `reject` of one waiting version at the "
                               "same instant, three times",
                         survives="one is applied; the other exits 2 with one `error: ...` line; the tags "
                                  "name the one applied")
def test_two_cli_answers_at_once_one_is_applied_the_other_refused(model_name, mlflow_server, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    winners = []
    for round_ in range(3):
        name = f"{model_name}_{round_}"
        _, waiting = challenger(name, GOOD, None, None, auto_promote=False)
        assert waiting.decision == registry.PENDING
        go = tmp_path / f"go{round_}"
        sides = {who: subprocess.Popen([sys.executable, "-c", AT_ONCE, str(go), verb, name, waiting.version,
                                        "--by", who, "--reason", f"{verb} at once"],
                                       cwd=ROOT / "dags", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                       text=True)
                 for who, verb in (("alice", "approve"), ("bob", "reject"))}
        deadline = time.monotonic() + 300
        while len(list(tmp_path.glob(f"go{round_}.*"))) < 2:
            assert time.monotonic() < deadline and all(p.poll() is None for p in sides.values()), "not ready"
            time.sleep(0.05)
        go.touch()
        done = {who: (proc.wait(timeout=300), *proc.communicate()) for who, proc in sides.items()}
        assert sorted(rc for rc, _, _ in done.values()) == [0, 2], done
        (winner,) = [who for who, (rc, _, _) in done.items() if rc == 0]
        (loser,) = [who for who, (rc, _, _) in done.items() if rc == 2]
        _, out, err = done[loser]
        assert out == "" and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
        assert "not 'pending_approval'" in err
        t = tags(name, waiting.version)
        applied = {"alice": ("promoted", "approved by alice: approve at once"),
                   "bob": ("rejected", "rejected by bob: reject at once")}[winner]
        assert (t["decision"], t["decided_by"]) == (applied[0], winner), t
        assert t["decision_reason"].startswith(applied[1]) and f"is '{applied[0]}'" in err
        assert champion(name) == (waiting.version if winner == "alice" else None)
        winners.append(winner)
    print(f"\nwinners: {winners}")


@pytest.mark.reliability(case="8.2 rollback to a gate-rejected version",
                         fault="rollback --to a version the gate rejected",
                         survives="refused in one line unless --force; a forced one is recorded on the version")
def test_rollback_to_a_version_the_gate_rejected_needs_force_and_is_recorded(model_name, mlflow_server):
    _, first = challenger(model_name, GOOD, None, None, auto_promote=True)
    _, bad = challenger(model_name, {"mae": 0.9, "skill_mae": 0.01}, first.version, 0.5, auto_promote=True)
    assert bad.decision == registry.REJECTED and tags(model_name, bad.version)["decided_by"] == "gate"
    with pytest.raises(registry.RegistryUserError, match=rf"v{bad.version} was rejected by the gate.*--force"):
        registry.rollback(model_name, "erin", "try it", to=bad.version)
    refused = registry_cli("rollback", model_name, "--to", bad.version, "--by", "erin", "--reason", "x",
                           uri=mlflow_server)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.startswith("error: ") and "--force" in refused.stderr
    assert champion(model_name) == first.version and "restored_by" not in tags(model_name, bad.version)

    forced = registry_cli("rollback", model_name, "--to", bad.version, "--force", "--by", "erin",
                          "--reason", "the new feature store broke v1", uri=mlflow_server)
    assert forced.returncode == 0, forced.stderr
    assert champion(model_name) == bad.version
    t = tags(model_name, bad.version)
    assert (t["decision"], t["decided_by"]) == ("forced_champion", "erin")
    assert t["decision_reason"].startswith(f"forced rollback to v{bad.version} by erin past the gate's rejection")
    assert "the new feature store broke v1" in t["decision_reason"] and t["restored_by"] == "erin"
    assert tags(model_name, first.version)["decision"] == "rolled_back"


@pytest.mark.parametrize("dag_file", sorted((ROOT / "dags").glob("*_training.py")), ids=lambda p: p.stem)
def test_every_dag_asks_for_approval_after_register(dag_file):
    from airflow.dag_processing.dagbag import DagBag

    dag = DagBag(str(dag_file)).dags[dag_file.stem]
    cfg = config.get(dag.dag_id)
    approve, promote = dag.get_task("approve"), dag.get_task("promote")
    assert dag.get_task("awaits_approval").upstream_task_ids == {"register"}
    assert approve.upstream_task_ids == {"awaits_approval"}
    assert promote.upstream_task_ids == {"register", "approve"}
    assert approve.options == [registry.APPROVE, registry.REJECT] and approve.defaults == [registry.REJECT]
    assert approve.task_group.group_id == "approval"  # common.approval.approval_step
    assert approve.response_timeout == cfg.approval_timeout and "reason" in approve.params
    assert "approval_body" in approve.body and "register" in approve.subject
    alias = registry.model_alias_name(cfg.model_name)
    for task_id in ("register", "promote"):
        assert [o.name for o in dag.get_task(task_id).outlets] == [alias], task_id
    assert re.fullmatch(r"[\w.-]+", registry.model_asset_name(cfg.model_name))


def test_an_automatic_tick_run_does_not_train_a_day_twice(model_name):
    """The importer's Asset event and the weekday time both start a tick run for the same day: the
    second automatic run skips training (no second approval) when the first registered a model of
    the same trades; a manual run, a retry of the same run and other trades still train."""
    from dataclasses import replace

    from common.mlflow_utils import AirflowIdentity
    from scripts.tick import pipeline

    cfg = replace(config.get("tick_model_training"), model_name=model_name)
    run_id, uri = logged_model("approval-tests")
    registry.register_challenger(model_name, uri, run_id, {"trade_date": "2026-01-07", "trades_version": "t-1",
                                                           "airflow_run_id": "asset_triggered__1"})
    built = {"day": "2026-01-07", "data_version": "t-1", "lake": "/nonexistent"}
    scheduled = AirflowIdentity("tick_model_training", "scheduled__2026-01-07", "train", 1)
    assert f"{model_name} v1 (run asset_triggered__1)" == pipeline.registered_by_another_run(cfg, built, scheduled)
    with pytest.raises(pipeline.AlreadyTrained, match="already trained on"):
        pipeline.train(cfg, built, {}, scheduled, once_per_day=True)
    retry = replace(scheduled, run_id="asset_triggered__1", try_number=2)
    assert pipeline.registered_by_another_run(cfg, built, retry) is None
    assert pipeline.registered_by_another_run(cfg, {**built, "data_version": "t-2"}, scheduled) is None
    with pytest.raises(Exception) as manual:  # trains: fails only on the missing lake
        pipeline.train(cfg, built, {}, scheduled, once_per_day=False)
    assert not isinstance(manual.value, pipeline.AlreadyTrained)
