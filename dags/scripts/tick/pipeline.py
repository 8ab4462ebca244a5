"""The tick workflow's steps as plain functions: check the run and find its day, validate the
day's trade partitions, build its feature partition, train on the days before it, evaluate on it,
register.

Each step takes the ``WorkflowConfig`` its caller holds (the DAG's ``CFG``, the CLI's) and the day
record the first step made (:class:`Day`: the day, the lake URI read once when the run starts, the
bad-row limit). Only small JSON dicts travel between steps - the TypedDicts below, Airflow's XComs.
Every step is idempotent for its day: features are rebuilt byte-identically, a retried task
continues its MLflow run, and registration happens once per run. That is what makes
``airflow backfill create`` over a date range safe to repeat.

Command line (no Airflow): ``python -m scripts.tick.cli --day 2013-10-09`` (scripts/tick/cli.py).
"""

from __future__ import annotations

import dataclasses
import io
import logging
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, TypedDict

from common import mlflow_utils, registry
from common.config import WorkflowConfig
from common.mlflow_utils import AirflowIdentity
from scripts.core import params as core_params
from scripts.core import paths, progress, threads
from scripts.core.errors import DataValidationError, ParameterError, PipelineError
from scripts.tick import features as tick_features
from scripts.tick import lake as tick_lake
from scripts.tick import model as tick_model
from scripts.tick.lake import Lake

log = logging.getLogger(__name__)


class NotEnoughHistory(PipelineError):
    """No earlier trading day to train on (the first day of a lake or a backfill)."""


class AlreadyTrained(PipelineError):
    """An automatic run found the day's very trades already trained on and registered by another
    run (the importer's Asset event and the weekday time both start a run for the same day)."""


# -- what travels between the steps (XCom) ----------------------------------------------------
class Day(TypedDict):
    """The run's day, fixed by its first step (``start``), and what every later step reads it with."""

    day: str  # YYYY-MM-DD
    lake: str  # the tick lake's URI (TICK_LAKE), read once, when the run starts
    max_bad_share: float  # the run's bad-row limit for validate


class Validated(Day):
    """Every symbol partition of the day usable: what was found, and the trades' data version."""

    symbols: list[str]
    trades: int
    quarantined: int
    data_version: str
    synthetic: bool


class Built(Day):
    """The day's feature partition (re)built: where, its content hash and the build's throughput."""

    uri: str
    rows: int
    trades: int
    seconds: float
    sha256: str
    data_version: str  # of the trades the features were built from
    synthetic: bool
    trades_per_second: float


class Trained(TypedDict):
    """The challenger's MLflow run and model, and the data it was fitted on."""

    run_id: str
    model_uri: str
    data_version: str
    train_days: list[str]
    synthetic: bool


# -- run parameters ---------------------------------------------------------------------------
@dataclass(frozen=True)
class DayParams:
    """The run parameters that are not the model's: which day, and how much of it may be bad."""

    trade_date: str | None = None
    max_bad_share: float = tick_lake.MAX_BAD_SHARE


def model_params(cfg: WorkflowConfig, params: Mapping[str, Any] | None) -> tick_model.ModelParams:
    """Run params -> ModelParams, every parameter (``trade_date`` and ``max_bad_share`` too)
    typed and bounded by ``cfg.run_params`` (scripts.core.params); unknown keys fail."""
    return core_params.build(tick_model.ModelParams, cfg.run_params, params, cfg.dag_id)


def day_params(cfg: WorkflowConfig, params: Mapping[str, Any] | None) -> DayParams:
    """Run params -> DayParams, through the same parser as :func:`model_params`."""
    return core_params.build(DayParams, cfg.run_params, params, cfg.dag_id)


def event_day(extras: Sequence[Mapping[str, Any]]) -> date | None:
    """The day the asset events that started a run announce (their extra's ``day``, written by
    ``upstream.tick_import``); the newest when several came together (the earlier ones are in its
    training history); None for a run no event started."""
    days = []
    for extra in extras:
        try:
            days.append(date.fromisoformat(str(extra["day"])))
        except (KeyError, ValueError):
            raise ParameterError(f"the asset event that started this run has no trade day in its extra "
                                 f"(expected {{'day': 'YYYY-MM-DD'}}): {dict(extra)!r}",
                                 field="day") from None
    return max(days, default=None)


def trade_day(cfg: WorkflowConfig, params: Mapping[str, Any] | None, logical_date: datetime | None,
              run_after: datetime | None = None, events: Sequence[Mapping[str, Any]] = ()) -> date:
    """The day a run processes: ``trade_date`` if given, else the day of the asset events that
    started it (``events``: their extras, see :func:`event_day`), else its logical date's UTC
    calendar day.

    Scheduled runs fire after the New York close (17:30 ET = 21:30/22:30 UTC, the same UTC day);
    ``airflow dags test tick_model_training 2013-10-09`` gives midnight UTC of that day. A run an
    asset event started has no logical date: its day is only in the event.
    """
    trade_date = day_params(cfg, params).trade_date
    if trade_date is not None:
        return date.fromisoformat(trade_date)
    if (announced := event_day(events)) is not None:
        return announced
    when = logical_date or run_after
    if when is None:
        raise ParameterError("run has neither a logical date nor a trade_date param")
    return when.astimezone(UTC).date()


# -- the steps --------------------------------------------------------------------------------
def start(cfg: WorkflowConfig, params: Mapping[str, Any] | None, *, logical_date: datetime | None = None,
          run_after: datetime | None = None, lake: str | None = None,
          events: Sequence[Mapping[str, Any]] = ()) -> Day:
    """The first step, before any work: every run parameter checked (an unknown key or a bad value
    fails here, not after hours of waiting), and the run's day (:func:`trade_day`), lake (``lake``,
    else TICK_LAKE) and bad-row limit fixed for the steps after it."""
    model_params(cfg, params)
    return Day(day=trade_day(cfg, params, logical_date, run_after, events).isoformat(),
               lake=lake or paths.tick_lake(), max_bad_share=day_params(cfg, params).max_bad_share)


def _day(day: Day) -> date:
    return date.fromisoformat(day["day"])


def _only_day(day: Day) -> Day:
    """The Day part of a record that extends it (a Validated passed on as the day)."""
    return Day(day=day["day"], lake=day["lake"], max_bad_share=day["max_bad_share"])


def partition_ready(day: Day, *, announced: bool = False) -> bool:
    """Whether the day's trade partitions are complete (its ``_SUCCESS``). ``announced``: an asset
    event said they are, so a missing marker is an error now, not a reason to wait for hours."""
    lake = Lake.open(day["lake"])
    ready = lake.day_ready(_day(day))
    if announced and not ready:
        raise DataValidationError(lake.display(f"{lake.day_dir(tick_lake.TRADES, _day(day))}/"
                                               f"{tick_lake.SUCCESS_FILE}"),
                                  "an asset event announced this trade day complete, but the lake "
                                  "has no complete day there")
    return ready


def validate(day: Day) -> Validated:
    """Check every symbol partition of the day; raise on one that may not be used."""
    threads.apply()
    import pyarrow.parquet as pq

    lake, when, max_bad_share = Lake.open(day["lake"]), _day(day), day["max_bad_share"]
    symbols = lake.symbols(when)
    if not symbols:
        raise DataValidationError(lake.display(lake.day_dir(tick_lake.TRADES, when)), "no symbol partitions")
    trades = bad = 0
    parts = []
    synthetic = False
    for symbol in symbols:
        folder = lake.trade_dir(when, symbol)
        where = lake.display(folder)
        manifest_path = f"{folder}/{tick_lake.MANIFEST_FILE}"
        if not lake.exists(manifest_path):
            raise DataValidationError(where, f"no {tick_lake.MANIFEST_FILE}: not written by the importer")
        manifest = lake.read_json(manifest_path)
        if manifest.get("schema_version") != tick_lake.SCHEMA_VERSION:
            raise DataValidationError(manifest_path, f"schema_version {manifest.get('schema_version')}, "
                                      f"expected {tick_lake.SCHEMA_VERSION}", field="schema_version")
        if manifest["bad_share"] > max_bad_share:
            raise DataValidationError(where, f"{manifest['bad_rows']} of {manifest['rows_in']} rows "
                                      f"({manifest['bad_share']:.2%}) were quarantined, over the limit "
                                      f"of {max_bad_share:.2%}: {manifest['reasons']}; see "
                                      f"{tick_lake.QUARANTINE_FILE}")
        data = lake.read_bytes(f"{folder}/{tick_lake.PART_FILE}")
        if tick_lake.sha256(data) != manifest["sha256"]:
            raise DataValidationError(f"{where}/{tick_lake.PART_FILE}",
                                      "content differs from its manifest (changed after import)")
        names = set(pq.read_schema(io.BytesIO(data)).names)
        if missing := tick_lake.TRADE_COLUMNS - names:
            raise DataValidationError(f"{where}/{tick_lake.PART_FILE}", f"lacks columns {sorted(missing)}",
                                      field=sorted(missing)[0])
        _check_values(pq.read_table(io.BytesIO(data), columns=["price", "size"]), f"{where}/{tick_lake.PART_FILE}")
        trades += manifest["rows"]
        bad += manifest["bad_rows"]
        synthetic = synthetic or bool(manifest["synthetic"])
        parts.append((symbol, manifest["sha256"]))
    return Validated(**_only_day(day), symbols=symbols, trades=trades, quarantined=bad,
                     data_version=tick_lake.version_of(parts, synthetic), synthetic=synthetic)


def _check_values(table, where: str) -> None:
    """Prices and sizes finite and > 0, as the importer admits them: a partition written by an
    older importer (or by hand, with a manifest to match) could still hold what it now refuses."""
    import numpy as np

    for name in ("price", "size"):
        values = table.column(name).to_numpy(zero_copy_only=False).astype("float64")
        bad = ~(np.isfinite(values) & (values > 0))
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise DataValidationError(where, f"row {row}: {float(values[row])} is not a finite number > 0 "
                                      f"({int(bad.sum())} such rows)", field=name)


def build_features(day: Day) -> Built:
    """(Re)build the day's feature partition from its trade partitions."""
    threads.apply()  # before Polars loads: it sizes its pool (POLARS_MAX_THREADS) once, at import
    result = tick_features.build_day(day["lake"], _day(day))
    fields = {**dataclasses.asdict(result), **_only_day(day)}  # both name the same "day"
    return Built(**fields, trades_per_second=result.trades_per_second)


def history(lake: Lake, day: date, train_days: int) -> list[date]:
    """The last ``train_days`` complete trading days before ``day``."""
    return [d for d in lake.days(tick_lake.TRADES) if d < day][-train_days:]


def _feature_sha(lake: Lake, day: date) -> str:
    return lake.read_json(f"{lake.day_dir(tick_lake.FEATURES, day)}/{tick_lake.MANIFEST_FILE}")["sha256"]


def registered_by_another_run(cfg: WorkflowConfig, built: Built, who: AirflowIdentity) -> str | None:
    """The version (and Airflow run) that another run registered from this day's same trades, if any."""
    for mv in registry.versions_tagged(cfg.model_name, {"trade_date": built["day"],
                                                        "trades_version": built["data_version"]}):
        if mv.tags.get("airflow_run_id") != who.run_id:  # a retry of this run is not another run
            return f"{cfg.model_name} v{mv.version} (run {mv.tags.get('airflow_run_id', '?')})"
    return None


def train(cfg: WorkflowConfig, run_day: Day, params: Mapping[str, Any] | None, who: AirflowIdentity,
          *, once_per_day: bool = False) -> Trained:
    """Fit on the rolling window of days before the run's day; log params, model and lineage.
    ``once_per_day`` (the automatic runs: Asset event, weekday time): raise :class:`AlreadyTrained`
    rather than train again on trades another run already registered a model of; a manual run
    or a backfill always trains (a person asked for it)."""
    if once_per_day and (earlier := registered_by_another_run(cfg, run_day, who)):
        raise AlreadyTrained(f"{run_day['day']}'s trades ({run_day['data_version']}) were already trained on: "
                             f"{earlier}; an automatic run does not ask for the same approval twice")
    task_threads = threads.apply()  # before Polars, XGBoost and numpy load
    import mlflow
    import numpy
    import pandas
    import xgboost
    from mlflow.models import infer_signature

    from scripts.tick.pyfunc import TickVolatilityModel

    mp = model_params(cfg, params)
    lake_uri, day = run_day["lake"], _day(run_day)
    lake = Lake.open(lake_uri)
    days = history(lake, day, mp.train_days)
    if not days:
        raise NotEnoughHistory(f"no complete trading day before {day} in {lake_uri}: nothing to train on")
    for past in days:  # features of a day this DAG has not run for yet (a new lake, a gap)
        if not lake.exists(f"{lake.day_dir(tick_lake.FEATURES, past)}/{tick_lake.MANIFEST_FILE}"):
            tick_features.build_day(lake_uri, past)
    frame = tick_features.load_features(lake, days)
    eval_sha = _feature_sha(lake, day)
    synthetic = any(lake.read_json(f"{lake.day_dir(tick_lake.FEATURES, d)}/{tick_lake.MANIFEST_FILE}")
                    ["synthetic"] for d in [*days, day])
    version = tick_lake.version_of([(d.isoformat(), _feature_sha(lake, d)) for d in days]
                                   + [(f"eval:{day}", eval_sha)], synthetic)
    with mlflow_utils.task_run(cfg.experiment, who, version,
                               {"workflow": cfg.dag_id, "model_name": cfg.model_name,
                                "data.synthetic": str(synthetic).lower(), "trade_date": day.isoformat()}) as run:
        progress.run_meta(mlflow_run_id=run.info.run_id)
        mlflow.set_tag("task_threads", str(task_threads))  # a tag: a retry may get another share
        mlflow.log_params({**dataclasses.asdict(mp), "lake": lake_uri, "trade_date": day.isoformat(),
                           "train_first_day": days[0].isoformat(), "train_last_day": days[-1].isoformat(),
                           "n_train_days": len(days), "features": ",".join(tick_features.FEATURES)})
        log.info("%s train: %d rows of %d day(s) (%s..%s), up to %d boosting rounds, XGBoost on %d "
                 "thread(s)", cfg.dag_id, frame.height, len(days), days[0], days[-1], mp.num_boost_round,
                 threads.capped(mp.nthread))
        result = tick_model.fit(frame, mp)
        progress.emit({"step": "train", "best_iteration": result.best_iteration,
                       "train_seconds": round(result.train_seconds, 2)})
        mlflow.log_metrics({"train_seconds": result.train_seconds, "best_iteration": result.best_iteration,
                            "train_rows": result.train_rows, "valid_rows": result.valid_rows})
        example = tick_model.labelled(frame).select(list(tick_features.FEATURES)).head(200).to_pandas()
        with tempfile.TemporaryDirectory() as tmp:
            result.model.save(Path(tmp) / "har_xgb")
            info = mlflow.pyfunc.log_model(
                name="model", python_model=TickVolatilityModel(), artifacts={"model": f"{tmp}/har_xgb"},
                # The scripts package (tick, and the core it uses), so the model loads outside this repo.
                code_paths=[str(Path(__file__).resolve().parents[1])],
                signature=infer_signature(example, result.model.predict(example)),
                input_example=example.head(5),
                pip_requirements=[f"xgboost=={xgboost.__version__}", f"numpy=={numpy.__version__}",
                                  f"pandas=={pandas.__version__}", f"mlflow=={mlflow.__version__}"])
        return Trained(run_id=run.info.run_id, model_uri=info.model_uri, data_version=version,
                       train_days=[d.isoformat() for d in days], synthetic=synthetic)


def _load(model_uri: str) -> tick_model.HarXgbModel:
    import mlflow

    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model


def evaluate(cfg: WorkflowConfig, built: Built, trained: Trained) -> registry.Evaluated:
    """Walk-forward scores of model, persistence, HAR and champion on the day; metrics on the
    logged model (the day's features as their dataset), plots, and the champion's daily health."""
    threads.apply()
    mlflow_utils.configure()  # before the first load: the server may be known only by its connection
    started = time.perf_counter()
    frame = tick_features.load_features(Lake.open(built["lake"]), [_day(built)])
    evaluation = tick_model.evaluate(_load(trained["model_uri"]), frame)
    champion = registry.score_champion(cfg, lambda uri: tick_model.evaluate(_load(uri), frame).metrics)
    metrics = {**evaluation.metrics, "features_trades_per_second": float(built["trades_per_second"]),
               "evaluate_seconds": time.perf_counter() - started}

    def artifacts(folder: str) -> None:
        tick_model.plot_volatility(evaluation.frame, f"{folder}/predicted_vs_realized_volatility.png")
        evaluation.frame.write_csv(f"{folder}/eval_predictions.csv")

    return registry.log_evaluation(cfg, trained["run_id"], metrics, champion, artifacts,
                                   model_uri=trained["model_uri"], data=evaluation_data(built))


def evaluation_data(built: Built) -> registry.EvaluationData:
    """The evaluated day as MLflow's evaluation dataset: its feature partition, digest = the data
    version of the trades it was built from (every model scored on that day shares it); the day
    is the step of the champion's daily health point."""
    return registry.EvaluationData(
        name=f"tick-features-{built['day']}", version=built["data_version"], source=built["uri"],
        day=_day(built), profile={"rows": built["rows"], "trades": built["trades"],
                                  "features_sha256": built["sha256"], "synthetic": built["synthetic"]})


def register(cfg: WorkflowConfig, validated: Validated, trained: Trained, evaluated: registry.Evaluated,
             who: AirflowIdentity, values: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Register the challenger with its lineage; the gate decides whether it becomes champion
    now (``auto_promote``: the run's ``values`` or the config) or waits for approval."""
    tags = {"data_version": str(trained["data_version"]), "trades_version": str(validated["data_version"]),
            "trade_date": str(validated["day"]), "synthetic": str(trained["synthetic"]).lower(),
            "dag_id": who.dag_id, "airflow_run_id": who.run_id}
    # A model fitted on simulated trades is registered (and tagged) but never becomes champion:
    # the alias that serving reads must only ever point at a model of real market data.
    ineligible = "trained on synthetic (simulated) trades" if trained["synthetic"] else None
    decision = registry.register_and_decide(cfg, trained, evaluated, tags, ineligible,
                                            auto_promote=registry.wants_auto_promote(cfg, values))
    return registry.register_result(cfg, trained, evaluated, decision, str(trained["data_version"]))
