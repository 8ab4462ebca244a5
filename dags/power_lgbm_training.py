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

from airflow.sdk import dag, task

from common import approval, config

if TYPE_CHECKING:  # the XCom types; the pipeline itself loads only inside a task (parse time)
    from common.registry import Evaluated
    from scripts.power.pipeline import Snapshot, Trained

CFG = config.get("power_lgbm_training")
CHAMPION_EVENTS = approval.champion_events(CFG)  # where a new champion is announced


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

    snapshot = prepare()
    trained = train(snapshot)
    decision = register(snapshot, trained, evaluate(snapshot, trained))
    approval.approval_step(CFG, decision)  # a person's Approve/Reject, then promote


power_lgbm_training()
