"""
### power_lgbm_training

Day-ahead forecast of a household's electricity use: at midnight, the 24 hourly means of
`Global_active_power` (kW) of the coming day, from the UCI *Individual household electric power
consumption* data (downloaded, or read from `DATA_MIRROR`).

`prepare` validates the minute file and writes an immutable hourly snapshot whose content hash is
the data version -> `train` fits LightGBM (L1, lags >= 24 h, rolling and calendar features, early
stopping on the weeks before the evaluation window) -> `evaluate` scores it, the seasonal-naive
baselines and the current champion walk-forward on the final 8 weeks -> `register` registers
`power_lgbm`, sets `challenger`, and moves `champion` only through the gate in `common/config.py`.
A challenger that passes waits in `approve` for a person's Approve/Reject in the Airflow UI (the
form shows both scores; no answer within `approval_timeout`: Reject) unless the run param
`auto_promote` is true; `promote` applies the answer. Every new champion is an event of the Asset
`power_lgbm_champion` (docs/model_events.md).

Params: every `ModelParams` field (typed, bounded and described in the trigger form; declared in
`common/config.py`), e.g. `{"num_boost_round": 300}`. A bad value is refused when the run is
triggered; an unknown key fails `prepare` before any work, without retries.
Results: MLflow experiment `power-forecast`, registered model `power_lgbm`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import AssetAlias, Param, dag, task

from common import alerts, config

if TYPE_CHECKING:  # the XCom types; the pipeline itself loads only inside a task (parse time)
    from common.registry import Evaluated
    from scripts.power.pipeline import Snapshot, Trained

CFG = config.get("power_lgbm_training")
# Where every move of the champion is announced: registry.model_alias_name(CFG.model_name).
CHAMPION_EVENTS = AssetAlias(f"{CFG.model_name}_champion_events")


@dag(**CFG.dag_kwargs(), doc_md=__doc__)
def power_lgbm_training() -> None:
    @task
    def prepare(**context) -> Snapshot:
        """Check the run's parameters, then fetch, validate and snapshot the data."""
        from common.alerts import permanent_errors_fail_fast
        from scripts.power import pipeline

        with permanent_errors_fail_fast():  # bad params or data fail the same on every try
            return pipeline.prepare(CFG, context["params"])

    @task
    def train(snapshot: Snapshot, **context) -> Trained:
        """Fit and log the model; returns the MLflow run id and model URI."""
        from common.alerts import permanent_errors_fail_fast
        from common.mlflow_utils import AirflowIdentity
        from scripts.power import pipeline

        with permanent_errors_fail_fast():
            return pipeline.train(CFG, snapshot, context["params"], AirflowIdentity.from_context(context))

    @task
    def evaluate(snapshot: Snapshot, trained: Trained) -> Evaluated:
        """Score model, baselines and champion on the same final 8 weeks."""
        from scripts.power import pipeline

        return pipeline.evaluate(CFG, snapshot, trained)

    # one slot shared by every workflow: promotions never race;
    # its alias outlet carries the model Asset's event when the champion moves (auto_promote)
    @task(pool=config.REGISTRY_POOL.name, outlets=[CHAMPION_EVENTS])
    def register(snapshot: Snapshot, trained: Trained, evaluated: Evaluated, **context) -> dict:
        """Register the challenger; promote to champion only through the gate."""
        from common import registry
        from common.mlflow_utils import AirflowIdentity
        from scripts.power import pipeline

        result = pipeline.register(CFG, snapshot, trained, evaluated, AirflowIdentity.from_context(context),
                                   context["params"])
        registry.announce_champion(context, CFG.model_name, result["champion_event"])
        return result

    # Governance (docs/operations.md): a challenger that passed the gate waits for a person here.
    @task.short_circuit
    def awaits_approval(decision: dict) -> bool:
        """True only when register left the challenger waiting for approval (no auto_promote)."""
        return decision["decision"] == "pending_approval"

    approval = HITLOperator(
        task_id="approve",
        subject=f"Promote {CFG.model_name} v{{{{ ti.xcom_pull(task_ids='register')['version'] }}}} to champion?",
        body="{{ ti.xcom_pull(task_ids='register')['approval_body'] }}",
        options=["Approve", "Reject"],
        defaults=["Reject"],  # no answer within the timeout is a rejection
        params={"reason": Param("", type="string", title="Reason",
                                description="Why (written on the model version with your name)")},
        response_timeout=CFG.approval_response_timeout(),
        notifiers=alerts.notifiers(),  # tells people a decision waits (links to the form)
    )

    @task(pool=config.REGISTRY_POOL.name, outlets=[CHAMPION_EVENTS])
    def promote(decision: dict, answer: dict | None, **context) -> dict:
        """Approve: promote through the gate (champion still the one compared with). Reject or no
        answer: champion unchanged. Decision, reason and who decided go on the model version."""
        from common import registry

        result = registry.resolve_approval(CFG.model_name, decision["version"], answer).to_dict()
        event = registry.champion_event(CFG.model_name, result)
        registry.announce_champion(context, CFG.model_name, event)
        return {**result, "champion_event": event}

    snapshot = prepare()
    trained = train(snapshot)
    decision = register(snapshot, trained, evaluate(snapshot, trained))
    awaits_approval(decision) >> approval
    promote(decision, approval.output)


power_lgbm_training()
