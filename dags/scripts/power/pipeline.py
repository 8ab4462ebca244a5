"""The power workflow's steps as plain functions, each logging to MLflow: prepare, train,
evaluate, register. The DAG calls them one per task with the ``WorkflowConfig`` it holds; the
command line (``scripts.power.cli``) runs them all in one process.

Between steps only small JSON-ready dicts travel, exactly what Airflow passes through XCom:
:class:`Snapshot` (where the data lies and its version; declared in ``data``, which writes it),
:class:`Trained` (the MLflow run and its model), ``registry.Evaluated`` (metrics, and the champion
scored on the same hours).

The run's params (DAG params, trigger conf, ``--param`` strings) take one path: :func:`model_params`
parses them against ``cfg.run_params`` into the trainer's ``ModelParams``. ``prepare`` does so
before any work, so a bad key or value fails the run first; ``train`` does so to use them.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypedDict

from common import mlflow_utils, registry
from common.config import WorkflowConfig
from common.mlflow_utils import AirflowIdentity
from scripts.core import progress, threads
from scripts.core.params import build
from scripts.power import data, model
from scripts.power.data import Snapshot  # prepare's XCom, declared where it is written
from scripts.power.model import ModelParams

log = logging.getLogger(__name__)


class Trained(TypedDict):
    """``train``'s XCom: the MLflow run, the logged model, and where the evaluation window starts."""

    run_id: str
    model_uri: str
    window_start: str


def model_params(cfg: WorkflowConfig, values: Mapping[str, Any] | None) -> ModelParams:
    """The run's params -> ModelParams, typed and bounded by ``cfg.run_params``; an unknown key or
    a bad value is a ParameterError naming the field, never silently ignored."""
    return build(ModelParams, cfg.run_params, values, cfg.dag_id)


def prepare(cfg: WorkflowConfig, values: Mapping[str, Any] | None,
            source: str | Path | None = None) -> Snapshot:
    """Check the run's params, then fetch (``source``, the mirror or a download), validate and
    snapshot the data."""
    model_params(cfg, values)  # what the Param schema cannot reject fails here, before any download
    threads.apply()
    return data.prepare(Path(source) if source else None)


def _features(snapshot: Snapshot) -> model.FeatureTable:
    return model.build_features(data.load_snapshot(snapshot["uri"]))


def train(cfg: WorkflowConfig, snapshot: Snapshot, values: Mapping[str, Any] | None,
          who: AirflowIdentity) -> Trained:
    """Fit on the snapshot and log params, model (signature + input example) to a tagged run."""
    task_threads = threads.apply()  # before the numeric libraries load: they size pools once
    import lightgbm
    import mlflow
    import numpy
    import pandas
    from mlflow.models import infer_signature

    settings = model_params(cfg, values)
    table = _features(snapshot)
    with mlflow_utils.task_run(cfg.experiment, who, snapshot["data_version"],
                               {"workflow": cfg.dag_id, "model_name": cfg.model_name}) as run:
        progress.run_meta(mlflow_run_id=run.info.run_id)
        mlflow.set_tag("task_threads", str(task_threads))  # a tag: a retry may get another share
        mlflow.log_params({**dataclasses.asdict(settings), "snapshot_uri": snapshot["uri"],
                           "data_start": snapshot["start"], "data_end": snapshot["end"],
                           "n_features": len(table.columns)})
        log.info("%s train: %d rows x %d features, up to %d boosting rounds, LightGBM on %d thread(s)",
                 cfg.dag_id, len(table.features), len(table.columns), settings.num_boost_round,
                 threads.capped(settings.num_threads))
        result = model.fit(table, settings)
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
        return Trained(run_id=run.info.run_id, model_uri=info.model_uri,
                       window_start=str(result.window_start))


def evaluate(cfg: WorkflowConfig, snapshot: Snapshot, trained: Trained) -> registry.Evaluated:
    """Score model, baselines and champion on the same window; log metrics (on the logged model,
    with the window as their dataset), plots, and the champion's health."""
    threads.apply()
    mlflow_utils.configure()  # before the first load: the server may be known only by its connection
    import mlflow
    import pandas

    started = time.perf_counter()
    table = _features(snapshot)
    window_start = pandas.Timestamp(trained["window_start"])
    booster = mlflow.lightgbm.load_model(trained["model_uri"])
    evaluation = model.score(booster.predict, table, window_start)

    def score(model_uri: str) -> dict[str, float]:  # the champion, exactly as the challenger
        champion = mlflow.lightgbm.load_model(model_uri)
        features = champion.feature_name()
        return model.score(lambda X: champion.predict(X[features]), table, window_start).metrics

    champion = registry.score_champion(cfg, score)
    metrics = {**evaluation.metrics, "evaluate_seconds": time.perf_counter() - started}

    def artifacts(folder: str) -> None:
        model.plot_forecast(evaluation.frame, f"{folder}/forecast_vs_actual.png")
        model.plot_importance(booster, f"{folder}/feature_importance.png")
        evaluation.frame.to_csv(f"{folder}/eval_forecasts.csv", index=False)

    return registry.log_evaluation(cfg, trained["run_id"], metrics, champion, artifacts,
                                   model_uri=trained["model_uri"], data=evaluation_data(snapshot, evaluation))


def evaluation_data(snapshot: Snapshot, evaluation: model.Evaluation) -> registry.EvaluationData:
    """The scored window as MLflow's evaluation dataset: the snapshot's hours from the window's
    start (in its name), digest = the snapshot's data version; its last day is the day of the
    champion's health point."""
    hours = evaluation.frame["timestamp"]
    first, last = hours.min(), hours.max()
    return registry.EvaluationData(
        name=f"household_power-eval-{first:%Y-%m-%d}", version=snapshot["data_version"],
        source=snapshot["uri"], day=last.date(),
        profile={"hours": len(evaluation.frame), "window_start": str(first), "window_end": str(last)})


def register(cfg: WorkflowConfig, snapshot: Snapshot, trained: Trained, evaluated: registry.Evaluated,
             who: AirflowIdentity, values: Mapping[str, Any] | None = None) -> dict[str, object]:
    """Register the challenger and apply the promotion gate; returns the decision. A passing
    challenger becomes champion now with ``auto_promote`` (the run's ``values``, else the
    config), else it waits for approval (with the approval form's text in the result)."""
    tags = {"data_version": snapshot["data_version"], "dag_id": who.dag_id, "airflow_run_id": who.run_id}
    decision = registry.register_and_decide(cfg, trained, evaluated, tags,
                                            auto_promote=registry.wants_auto_promote(cfg, values))
    return registry.register_result(cfg, trained, evaluated, decision, snapshot["data_version"])
