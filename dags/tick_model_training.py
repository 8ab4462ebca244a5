"""
### tick_model_training

Forecasts the next 5 minutes' realized volatility of US equities from the tick lake, once per
trading day after the New York close.

Runs on the importer's `tick_lake_trades` Asset event for a completed day or at its weekday time,
whichever comes first (`AssetOrTimeSchedule`). `wait_for_trades` waits (reschedule mode: no worker
slot held) for the day's trade partitions (`<lake>/trades/date=D/_SUCCESS`, written by the
importer; this DAG never writes trades; a run the event started finds them at once) ->
`validate` checks each symbol partition (schema, content hash, quarantined share under
`max_bad_share`) -> `build_features` (re)builds the day's one-minute feature partition,
byte-identically -> `train` fits HAR-RV + XGBoost on the days before it -> `evaluate` scores
model, persistence, HAR and the champion on the day -> `register` registers `tick_model` and
moves `champion` only through the gate in `common/config.py`.
A challenger that passes waits in `approve` for a person's Approve/Reject in the Airflow UI (the
form shows both scores; no answer within `approval_timeout`: Reject) unless the run param
`auto_promote` is true; `promote` applies the answer. Every new champion is an event of the Asset
`tick_model_champion` (docs/model_events.md).

The day is the `trade_date` param, else the triggering asset event's `day` (its extra), else the
run's logical date (UTC calendar day). Params (typed,
bounded and described in the trigger form; declared in `common/config.py`): `trade_date`,
`max_bad_share` and every `ModelParams` field; an unknown key fails the first task. Backfill:
`airflow backfill create --dag-id tick_model_training --from-date 2013-10-07 --to-date 2013-10-10 --max-active-runs 1`.
Results: MLflow experiment `tick-production`, registered model `tick_model`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import PokeReturnValue, dag, task

from common import approval, config

if TYPE_CHECKING:  # the XCom types; the module itself loads inside the tasks (numpy, polars, mlflow)
    from common.registry import Evaluated
    from scripts.tick.pipeline import Built, Day, Trained, Validated

CFG = config.get("tick_model_training")
CHAMPION_EVENTS = approval.champion_events(CFG)  # where a new champion is announced


@dag(**CFG.dag_kwargs(), doc_md=__doc__)
def tick_model_training() -> None:
    @task.sensor(poke_interval=CFG.poke_interval.total_seconds(), timeout=CFG.data_wait.total_seconds(),
                 mode="reschedule")
    def wait_for_trades(**context) -> PokeReturnValue:
        """Done when the day's trade partitions are complete; returns the day, lake and bad-row limit."""
        from common.alerts import permanent_errors_fail_fast
        from scripts.tick import pipeline

        events = context.get("triggering_asset_events") or {}
        extras = [event.extra for asset in events if asset.name == CFG.trigger_asset for event in events[asset]]
        with permanent_errors_fail_fast():  # a bad parameter fails now, not after hours of waiting
            day = pipeline.start(CFG, context["params"], logical_date=context.get("logical_date"),
                                 run_after=context["dag_run"].run_after, events=extras)
            # An importer's event says the day is complete: ready at the first look, or an error.
            ready = pipeline.partition_ready(day, announced=bool(extras))
        return PokeReturnValue(is_done=ready, xcom_value=day)

    @task
    def validate(day: Day) -> Validated:
        """Every symbol partition usable, or a clear failure; returns the trades' data version."""
        from common.alerts import permanent_errors_fail_fast
        from scripts.tick import pipeline

        with permanent_errors_fail_fast():
            return pipeline.validate(day)

    @task
    def build_features(validated: Validated) -> Built:
        """(Re)build the day's feature partition; returns its URI, hash and throughput."""
        from scripts.tick import pipeline

        return pipeline.build_features(validated)

    @task
    def train(built: Built, **context) -> Trained:
        """Fit on the days before; skipped (not failed) when there is none, or when this automatic
        run's day was already trained on by the other automatic run (Asset event or weekday time)."""
        from airflow.sdk.exceptions import AirflowSkipException

        from common.alerts import permanent_errors_fail_fast
        from common.mlflow_utils import AirflowIdentity
        from scripts.tick import pipeline

        with permanent_errors_fail_fast():
            try:
                return pipeline.train(CFG, built, context["params"], AirflowIdentity.from_context(context),
                                      once_per_day=context["dag_run"].run_type in ("scheduled", "asset_triggered"))
            except (pipeline.NotEnoughHistory, pipeline.AlreadyTrained) as exc:
                raise AirflowSkipException(str(exc)) from None

    @task
    def evaluate(built: Built, trained: Trained) -> Evaluated:
        """Score model, baselines and champion on the same day."""
        from scripts.tick import pipeline

        return pipeline.evaluate(CFG, built, trained)

    # one promotion at a time, across all workflows;
    # its alias outlet carries the model Asset's event when the champion moves (auto_promote)
    @task(pool=config.REGISTRY_POOL.name, outlets=[CHAMPION_EVENTS])
    def register(validated: Validated, trained: Trained, evaluated: Evaluated, **context) -> dict:
        """Register the challenger; promote to champion only through the gate."""
        from common import registry
        from common.mlflow_utils import AirflowIdentity
        from scripts.tick import pipeline

        result = pipeline.register(CFG, validated, trained, evaluated, AirflowIdentity.from_context(context),
                                   context["params"])
        registry.announce_champion(context, CFG.model_name, result["champion_event"])
        return result

    validated = validate(wait_for_trades())
    built = build_features(validated)
    trained = train(built)
    decision = register(validated, trained, evaluate(built, trained))
    approval.approval_step(CFG, decision)  # a person's Approve/Reject, then promote


tick_model_training()
