"""The tick workflow's steps as plain functions: find the day, validate its trade partitions,
build its feature partition, train on the days before it, evaluate on it, register.

Only small dicts travel between steps (day, lake URIs, data versions, MLflow run id, metrics).
Every step is idempotent for its day: features are rebuilt byte-identically, a retried task
continues its MLflow run, and registration happens once per run. That is what makes
``airflow backfill create`` over a date range safe to repeat.

CLI (no Airflow needed): ``python -m scripts.tick.pipeline --day 2013-10-09 [--lake L]``
runs every step for one day against the configured MLflow server.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import json
import logging
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

from common import config, mlflow_utils, registry
from common.mlflow_utils import AirflowIdentity
from scripts.core import params as run_params
from scripts.core import paths, progress, threads
from scripts.core.errors import DataValidationError, ParameterError, PipelineError
from scripts.tick import features as tick_features
from scripts.tick import lake as tick_lake
from scripts.tick import model as tick_model
from scripts.tick.lake import Lake

log = logging.getLogger(__name__)

DAG_ID = "tick_model_training"
RUN_PARAMS = {"trade_date", "max_bad_share"}  # DAG params that are not model parameters
SPECS = config.get(DAG_ID).run_params


class NotEnoughHistory(PipelineError):
    """No earlier trading day to train on (the first day of a lake or a backfill)."""


def trade_day(params: Mapping[str, Any], logical_date: datetime | None,
              run_after: datetime | None = None) -> date:
    """The day a run processes: ``trade_date`` if given, else its logical date's UTC calendar day.

    Scheduled runs fire after the New York close (17:30 ET = 21:30/22:30 UTC, the same UTC day);
    ``airflow dags test tick_model_training 2013-10-09`` gives midnight UTC of that day.
    """
    if params.get("trade_date") is not None:
        checked = run_params.check(config.get(DAG_ID).param_spec("trade_date"), params["trade_date"], DAG_ID)
        return date.fromisoformat(checked)
    when = logical_date or run_after
    if when is None:
        raise ParameterError("run has neither a logical date nor a trade_date param")
    return when.astimezone(UTC).date()


def model_params(params: Mapping[str, Any] | None) -> tick_model.ModelParams:
    """DAG params -> ModelParams, every parameter (``trade_date`` and ``max_bad_share`` too)
    typed and bounded by the specs in ``common.config`` (scripts.core.params); unknown keys fail."""
    return run_params.build(tick_model.ModelParams, SPECS, params, DAG_ID)


def partition_ready(lake_uri: str, day: date) -> bool:
    return Lake.open(lake_uri).day_ready(day)


def validate(lake_uri: str, day: date, max_bad_share: float) -> dict[str, Any]:
    """Check every symbol partition of ``day``; raise on one that may not be used."""
    threads.apply()
    import pyarrow.parquet as pq

    from scripts.tick.importer import SCHEMA_VERSION

    lake = Lake.open(lake_uri)
    symbols = lake.symbols(day)
    if not symbols:
        raise DataValidationError(lake.display(lake.day_dir(tick_lake.TRADES, day)), "no symbol partitions")
    trades = bad = 0
    parts = []
    synthetic = False
    for symbol in symbols:
        folder = lake.trade_dir(day, symbol)
        where = lake.display(folder)
        manifest_path = f"{folder}/{tick_lake.MANIFEST_FILE}"
        if not lake.exists(manifest_path):
            raise DataValidationError(where, f"no {tick_lake.MANIFEST_FILE}: not written by the importer")
        manifest = lake.read_json(manifest_path)
        if manifest.get("schema_version") != SCHEMA_VERSION:
            raise DataValidationError(manifest_path, f"schema_version {manifest.get('schema_version')}, "
                                      f"expected {SCHEMA_VERSION}", field="schema_version")
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
        if missing := tick_features.TRADE_COLUMNS - names:
            raise DataValidationError(f"{where}/{tick_lake.PART_FILE}", f"lacks columns {sorted(missing)}",
                                      field=sorted(missing)[0])
        _check_values(pq.read_table(io.BytesIO(data), columns=["price", "size"]), f"{where}/{tick_lake.PART_FILE}")
        trades += manifest["rows"]
        bad += manifest["bad_rows"]
        synthetic = synthetic or bool(manifest["synthetic"])
        parts.append((symbol, manifest["sha256"]))
    return {"day": day.isoformat(), "symbols": symbols, "trades": trades, "quarantined": bad,
            "data_version": tick_lake.version_of(parts, synthetic), "synthetic": synthetic}


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


def build_features(lake_uri: str, day: date) -> dict[str, Any]:
    threads.apply()  # before Polars loads: it sizes its pool (POLARS_MAX_THREADS) once, at import
    result = tick_features.build_day(lake_uri, day)
    return {**dataclasses.asdict(result), "trades_per_second": result.trades_per_second}


def history(lake: Lake, day: date, train_days: int) -> list[date]:
    """The last ``train_days`` complete trading days before ``day``."""
    return [d for d in lake.days(tick_lake.TRADES) if d < day][-train_days:]


def _feature_sha(lake: Lake, day: date) -> str:
    return lake.read_json(f"{lake.day_dir(tick_lake.FEATURES, day)}/{tick_lake.MANIFEST_FILE}")["sha256"]


def train(lake_uri: str, day: date, params: Mapping[str, Any] | None, who: AirflowIdentity) -> dict[str, Any]:
    """Fit on the rolling window of days before ``day``; log params, model and lineage."""
    task_threads = threads.apply()  # before Polars, XGBoost and numpy load
    import mlflow
    import numpy
    import pandas
    import xgboost
    from mlflow.models import infer_signature

    from scripts.tick.pyfunc import TickVolatilityModel

    cfg = config.get(DAG_ID)
    mp = model_params(params)
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
                               {"workflow": DAG_ID, "model_name": cfg.model_name,
                                "data.synthetic": str(synthetic).lower(), "trade_date": day.isoformat()}) as run:
        progress.run_meta(mlflow_run_id=run.info.run_id)
        mlflow.set_tag("task_threads", str(task_threads))  # a tag: a retry may get another share
        mlflow.log_params({**tick_model.params_dict(mp), "lake": lake_uri, "trade_date": day.isoformat(),
                           "train_first_day": days[0].isoformat(), "train_last_day": days[-1].isoformat(),
                           "n_train_days": len(days), "features": ",".join(tick_features.FEATURES)})
        log.info("%s train: %d rows of %d day(s) (%s..%s), up to %d boosting rounds, XGBoost on %d "
                 "thread(s)", DAG_ID, frame.height, len(days), days[0], days[-1], mp.num_boost_round,
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
                code_paths=[str(Path(__file__).resolve().parent)],
                signature=infer_signature(example, result.model.predict(example)),
                input_example=example.head(5),
                pip_requirements=[f"xgboost=={xgboost.__version__}", f"numpy=={numpy.__version__}",
                                  f"pandas=={pandas.__version__}", f"mlflow=={mlflow.__version__}"])
        return {"run_id": run.info.run_id, "model_uri": info.model_uri, "data_version": version,
                "train_days": [d.isoformat() for d in days], "synthetic": synthetic}


def _load(model_uri: str) -> tick_model.HarXgbModel:
    import mlflow

    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model


def evaluate(lake_uri: str, day: date, built: Mapping[str, Any], trained: Mapping[str, Any]) -> registry.Evaluated:
    """Walk-forward scores of model, persistence, HAR and champion on the day; plots to MLflow."""
    threads.apply()
    mlflow_utils.configure()  # before the first load: the server may be known only by its connection
    cfg = config.get(DAG_ID)
    started = time.perf_counter()
    frame = tick_features.load_features(Lake.open(lake_uri), [day])
    evaluation = tick_model.evaluate(_load(trained["model_uri"]), frame)
    champion = registry.score_champion(cfg, lambda uri: tick_model.evaluate(_load(uri), frame).metrics)
    metrics = {**evaluation.metrics, "features_trades_per_second": float(built["trades_per_second"]),
               "evaluate_seconds": time.perf_counter() - started}

    def artifacts(folder: str) -> None:
        tick_model.plot_volatility(evaluation.frame, f"{folder}/predicted_vs_realized_volatility.png")
        evaluation.frame.write_csv(f"{folder}/eval_predictions.csv")

    return registry.log_evaluation(cfg, trained["run_id"], metrics, champion, artifacts)


def register(validated: Mapping[str, Any], trained: Mapping[str, Any], evaluated: Mapping[str, Any],
             who: AirflowIdentity) -> dict[str, Any]:
    tags = {"data_version": str(trained["data_version"]), "trades_version": str(validated["data_version"]),
            "trade_date": str(validated["day"]), "synthetic": str(trained["synthetic"]).lower(),
            "dag_id": who.dag_id, "airflow_run_id": who.run_id}
    # A model fitted on simulated trades is registered (and tagged) but never becomes champion:
    # the alias that serving reads must only ever point at a model of real market data.
    ineligible = "trained on synthetic (simulated) trades" if trained["synthetic"] else None
    decision = registry.register_and_decide(config.get(DAG_ID), trained, evaluated, tags, ineligible)
    return decision.to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the tick workflow's steps for one day.")
    parser.add_argument("--day", type=date.fromisoformat, required=True)
    parser.add_argument("--lake", default=paths.tick_lake())
    parser.add_argument("--param", action="append", default=[], help="key=value model parameter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    params = dict(p.split("=", 1) for p in args.param)
    model_params(params)  # fail fast on a typo or a bad value, before any work
    who = AirflowIdentity(DAG_ID, f"cli__{datetime.now(UTC):%Y%m%dT%H%M%S}", "cli")
    limit = float(config.get(DAG_ID).params["max_bad_share"])
    validated = validate(args.lake, args.day, limit)
    built = build_features(args.lake, args.day)
    trained = train(args.lake, args.day, params, who)
    evaluated = evaluate(args.lake, args.day, built, trained)
    decision = register(validated, trained, evaluated, who)
    print(json.dumps({"validated": validated, "built": built, "metrics": evaluated["metrics"],
                      "decision": decision}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
