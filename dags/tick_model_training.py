"""
### tick_model_training

Forecasts the next 5 minutes' realized volatility of US equities from the tick lake, once per
trading day after the New York close.

`wait_for_trades` waits (reschedule mode: no worker slot held) for the day's trade partitions
(`<lake>/trades/date=D/_SUCCESS`, written by the importer; this DAG never writes trades) ->
`validate` checks each symbol partition (schema, content hash, quarantined share under
`max_bad_share`) -> `build_features` (re)builds the day's one-minute feature partition,
byte-identically -> `train` fits HAR-RV + XGBoost on the days before it -> `evaluate` scores
model, persistence, HAR and the champion on the day -> `register` registers `tick_model` and
moves `champion` only through the gate in `common/config.py`.

The day is the run's logical date (UTC calendar day) or the `trade_date` param. Params (typed,
bounded and described in the trigger form; declared in `common/config.py`): `trade_date`,
`max_bad_share` and every `ModelParams` field; an unknown key fails the first task. Backfill:
`airflow backfill create --dag-id tick_model_training --from-date 2013-10-07 --to-date 2013-10-10 --max-active-runs 1`.
Results: MLflow experiment `tick-production`, registered model `tick_model`.
"""

from __future__ import annotations

from airflow.sdk import PokeReturnValue, dag, task

from common import config

CFG = config.get("tick_model_training")


@dag(**CFG.dag_kwargs(), doc_md=__doc__)
def tick_model_training() -> None:
    @task.sensor(poke_interval=CFG.poke_interval.total_seconds(), timeout=CFG.data_wait.total_seconds(),
                 mode="reschedule")
    def wait_for_trades(**context) -> PokeReturnValue:
        """Done when the day's trade partitions are complete; returns the day."""
        from common.alerts import permanent_errors_fail_fast
        from scripts.core import paths
        from scripts.tick import pipeline as tick_pipeline

        with permanent_errors_fail_fast():  # a bad parameter fails now, not after hours of waiting
            # What the Param schema cannot reject (an unknown key: Airflow passes it through).
            tick_pipeline.model_params(context["params"])
            day = tick_pipeline.trade_day(context["params"], context.get("logical_date"),
                                          context["dag_run"].run_after)
        ready = tick_pipeline.partition_ready(paths.tick_lake(), day)
        return PokeReturnValue(is_done=ready, xcom_value=day.isoformat())

    @task
    def validate(day: str, **context) -> dict:
        """Every symbol partition usable, or a clear failure; returns the trades' data version."""
        from datetime import date

        from common.alerts import permanent_errors_fail_fast
        from scripts.core import paths
        from scripts.tick import pipeline as tick_pipeline

        with permanent_errors_fail_fast():
            limit = float(context["params"]["max_bad_share"])
            return tick_pipeline.validate(paths.tick_lake(), date.fromisoformat(day), limit)

    @task
    def build_features(validated: dict) -> dict:
        """(Re)build the day's feature partition; returns its URI, hash and throughput."""
        from datetime import date

        from scripts.core import paths
        from scripts.tick import pipeline as tick_pipeline

        return tick_pipeline.build_features(paths.tick_lake(), date.fromisoformat(validated["day"]))

    @task
    def train(built: dict, **context) -> dict:
        """Fit on the days before; skipped (not failed) when there is none."""
        from datetime import date

        from airflow.sdk.exceptions import AirflowSkipException

        from common.alerts import permanent_errors_fail_fast
        from common.mlflow_utils import AirflowIdentity
        from scripts.core import paths
        from scripts.tick import pipeline as tick_pipeline

        with permanent_errors_fail_fast():
            try:
                return tick_pipeline.train(paths.tick_lake(), date.fromisoformat(built["day"]),
                                           context["params"], AirflowIdentity.from_context(context))
            except tick_pipeline.NotEnoughHistory as exc:
                raise AirflowSkipException(str(exc)) from None

    @task
    def evaluate(built: dict, trained: dict) -> dict:
        """Score model, baselines and champion on the same day."""
        from datetime import date

        from scripts.core import paths
        from scripts.tick import pipeline as tick_pipeline

        return tick_pipeline.evaluate(paths.tick_lake(), date.fromisoformat(built["day"]), built, trained)

    @task(pool=config.REGISTRY_POOL.name)  # one promotion at a time, across all workflows
    def register(validated: dict, trained: dict, evaluated: dict, **context) -> dict:
        """Register the challenger; promote to champion only through the gate."""
        from common.mlflow_utils import AirflowIdentity
        from scripts.tick import pipeline as tick_pipeline

        return tick_pipeline.register(validated, trained, evaluated, AirflowIdentity.from_context(context))

    validated = validate(wait_for_trades())
    built = build_features(validated)
    trained = train(built)
    register(validated, trained, evaluate(built, trained))


tick_model_training()
