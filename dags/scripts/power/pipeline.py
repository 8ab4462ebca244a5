"""The power workflow's steps as plain functions, each logging to MLflow: prepare, train,
evaluate, register. The DAG calls them one per task; the CLI runs them all in one process.

Between steps only small dicts travel (snapshot URI and data version, MLflow run id and model URI,
metrics): exactly what Airflow passes through XCom.

CLI: ``python -m scripts.power.pipeline [--source FILE] [--param key=value ...]`` prints one
``VTM_PROGRESS::{json}`` line per step and ``VTM_RUN_META::{json}`` once; exit 0 only on success.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from common import config, mlflow_utils, registry
from common.mlflow_utils import AirflowIdentity
from scripts.core import params as run_params
from scripts.core import progress, threads
from scripts.power import data as power_data
from scripts.power import model as power_model

log = logging.getLogger(__name__)

DAG_ID = "power_lgbm_training"


def model_params(overrides: Mapping[str, Any] | None) -> power_model.ModelParams:
    """DAG params / trigger conf / ``--param`` strings -> ModelParams, typed and bounded by the
    specs in ``common.config`` (scripts.core.params); an unknown key or a bad value is a
    ParameterError naming the field, never silently ignored."""
    return run_params.build(power_model.ModelParams, config.get(DAG_ID).run_params, overrides, DAG_ID)


def prepare(source: str | None = None) -> dict[str, Any]:
    threads.apply()
    return power_data.prepare(Path(source) if source else None).to_dict()


def train(snapshot: Mapping[str, Any], params: Mapping[str, Any] | None,
          who: AirflowIdentity) -> dict[str, str]:
    """Fit on the snapshot and log params, model (signature + input example) to a tagged run."""
    task_threads = threads.apply()  # before the numeric libraries load: they size pools once
    import lightgbm
    import mlflow
    import numpy
    import pandas
    from mlflow.models import infer_signature

    cfg = config.get(DAG_ID)
    mp = model_params(params)
    table = power_model.build_features(power_data.load_snapshot(str(snapshot["uri"])))
    with mlflow_utils.task_run(cfg.experiment, who, str(snapshot["data_version"]),
                               {"workflow": DAG_ID, "model_name": cfg.model_name}) as run:
        progress.run_meta(mlflow_run_id=run.info.run_id)
        mlflow.set_tag("task_threads", str(task_threads))  # a tag: a retry may get another share
        mlflow.log_params({**dataclasses.asdict(mp), "snapshot_uri": snapshot["uri"],
                           "data_start": snapshot["start"], "data_end": snapshot["end"],
                           "n_features": len(table.columns)})
        log.info("%s train: %d rows x %d features, up to %d boosting rounds, LightGBM on %d thread(s)",
                 DAG_ID, len(table.features), len(table.columns), mp.num_boost_round,
                 threads.capped(mp.num_threads))
        result = power_model.fit(table, mp)
        progress.emit({"step": "train", "best_iteration": result.best_iteration,
                       "train_seconds": round(result.train_seconds, 2)})
        mlflow.log_params({"train_end": str(result.window_start - pandas.Timedelta(hours=1)),
                           "eval_start": str(result.window_start)})
        mlflow.log_metrics({"train_seconds": result.train_seconds,
                            "best_iteration": result.best_iteration, "train_rows": result.train_rows})
        sample = table.features[table.day >= result.window_start].head(200)
        info = mlflow.lightgbm.log_model(
            result.booster, name="model",
            signature=infer_signature(sample, result.booster.predict(sample)),
            input_example=sample.head(5),
            pip_requirements=[f"lightgbm=={lightgbm.__version__}", f"pandas=={pandas.__version__}",
                              f"numpy=={numpy.__version__}"],
        )
        return {"run_id": run.info.run_id, "model_uri": info.model_uri,
                "window_start": str(result.window_start)}


def evaluate(snapshot: Mapping[str, Any], trained: Mapping[str, str]) -> registry.Evaluated:
    """Score model, baselines and champion on the same window; log metrics and plots."""
    threads.apply()
    mlflow_utils.configure()  # before the first load: the server may be known only by its connection
    import mlflow
    import pandas

    cfg = config.get(DAG_ID)
    started = time.perf_counter()
    table = power_model.build_features(power_data.load_snapshot(str(snapshot["uri"])))
    window_start = pandas.Timestamp(trained["window_start"])
    booster = mlflow.lightgbm.load_model(trained["model_uri"])
    evaluation = power_model.score(booster.predict, table, window_start)

    def score(model_uri: str) -> dict[str, float]:  # the champion, exactly as the challenger
        champion = mlflow.lightgbm.load_model(model_uri)
        features = champion.feature_name()
        return power_model.score(lambda X: champion.predict(X[features]), table, window_start).metrics

    champion = registry.score_champion(cfg, score)
    metrics = {**evaluation.metrics, "evaluate_seconds": time.perf_counter() - started}

    def artifacts(folder: str) -> None:
        power_model.plot_forecast(evaluation.frame, f"{folder}/forecast_vs_actual.png")
        power_model.plot_importance(booster, f"{folder}/feature_importance.png")
        evaluation.frame.to_csv(f"{folder}/eval_forecasts.csv", index=False)

    return registry.log_evaluation(cfg, trained["run_id"], metrics, champion, artifacts)


def register(snapshot: Mapping[str, Any], trained: Mapping[str, str],
             evaluated: Mapping[str, Any], who: AirflowIdentity) -> dict[str, Any]:
    """Register the challenger and apply the promotion gate."""
    tags = {"data_version": str(snapshot["data_version"]), "dag_id": who.dag_id, "airflow_run_id": who.run_id}
    return registry.register_and_decide(config.get(DAG_ID), trained, evaluated, tags).to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the power workflow outside Airflow")
    parser.add_argument("--source", help="UCI zip or txt (default: DATA_MIRROR or download)")
    parser.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                        help="model parameter override, e.g. --param num_boost_round=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    params = dict(p.split("=", 1) for p in args.param)
    model_params(params)  # fail fast on a typo, before any work
    who = AirflowIdentity(DAG_ID, f"cli__{datetime.now(UTC):%Y%m%dT%H%M%S}", "train")
    snapshot = prepare(args.source)
    progress.step("prepare", data_version=snapshot["data_version"])
    trained = train(snapshot, params, who)  # VTM_RUN_META once its MLflow run is open
    evaluated = evaluate(snapshot, trained)
    progress.step("evaluate", **{k: round(v, 4) for k, v in evaluated["metrics"].items()})
    decision = register(snapshot, trained, evaluated, who)
    progress.step("register", **decision)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
