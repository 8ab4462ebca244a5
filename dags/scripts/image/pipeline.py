"""The image workflows' steps (MNIST, CIFAR-10) as plain functions logging to MLflow: prepare,
train, evaluate, register. Both DAGs call them; the CLI runs them in one process, so an existing
run manager can drive the trainer from the command line.

CLI (from dags/):

    python -m scripts.image.pipeline --dataset mnist --profile smoke --framework pytorch \
        [--source PATH] [--run-id ID] [--epochs N] [--steps all|train]

prints ``VTM_RUN_META::{"mlflow_run_id": ...}`` once, when the MLflow run is open, and
``VTM_PROGRESS::{"epoch", "total_epochs", "val_accuracy", "device", ...}`` after every epoch,
flushed; exit 0 only on success. The same ``--run-id`` resumes a killed run from its last epoch
checkpoint, in the same MLflow run.
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from common import config, mlflow_utils, registry
from common.mlflow_utils import AirflowIdentity
from scripts.core import params as run_params
from scripts.core import paths, progress, threads
from scripts.image import data as image_data
from scripts.image import plots as image_plots
from scripts.image.base import EpochResult, TrainConfig, TrainResult, subset

log = logging.getLogger(__name__)

DAG_IDS = {"mnist": "mnist_cnn_training", "cifar10": "cifar10_cnn_training"}
# The run parameters (declared once, in common.config); the two image DAGs share them.
TUNABLE = tuple(spec.name for spec in config.get(DAG_IDS["mnist"]).run_params)


def train_config(dataset: str, params: Mapping[str, Any] | None) -> TrainConfig:
    """DAG params / trigger conf / CLI flags -> TrainConfig, typed and bounded by the specs in
    ``common.config`` (scripts.core.params): unknown keys and bad values (``epochs`` 0, a bool, a
    negative learning rate, an unknown profile) are a ParameterError naming the field."""
    dag_id = DAG_IDS[dataset]
    return run_params.build(TrainConfig, config.get(dag_id).run_params, params, dag_id, dataset=dataset)


def checkpoint_dir(dag_id: str, run_id: str, framework: str) -> Path:
    """Per Airflow run (not per try): a retry finds what the killed try saved."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    return paths.data_dir() / "checkpoints" / dag_id / safe / framework


def trainer(framework: str):
    if framework == "tensorflow":
        from scripts.image.keras_trainer import train_keras

        return train_keras
    from scripts.image.torch_trainer import train_torch

    return train_torch


def prepare(dataset: str, source: str | None = None) -> dict[str, Any]:
    threads.apply()
    return image_data.prepare(dataset, Path(source) if source else None).to_dict()


def _log_model(result: TrainResult, framework: str, example: np.ndarray):
    import mlflow
    from mlflow.models import infer_signature

    if framework == "tensorflow":
        import keras
        import tensorflow

        logits = np.asarray(result.model.predict(example, verbose=0))
        # mlflow.tensorflow's flavor saves Keras 3 models; mlflow.keras 3.17 writes the input
        # example before it creates the model folder and fails.
        return mlflow.tensorflow.log_model(
            result.model, name="model", signature=infer_signature(example, logits), input_example=example,
            code_paths=[str(Path(__file__).resolve().parent)],
            pip_requirements=[f"tensorflow-cpu=={tensorflow.__version__}", f"keras=={keras.__version__}",
                              f"numpy=={np.__version__}"])
    import torch

    with torch.no_grad():
        logits = result.model(torch.from_numpy(example)).numpy()
    # The pickled module refers to scripts.image.torch_trainer: ship that package with the model.
    return mlflow.pytorch.log_model(
        result.model, name="model", signature=infer_signature(example, logits), input_example=example,
        code_paths=[str(Path(__file__).resolve().parent)],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"])


def train(dataset: str, snapshot: Mapping[str, Any], params: Mapping[str, Any] | None,
          who: AirflowIdentity) -> dict[str, Any]:
    """Train with per-epoch metrics and checkpoints; log artifacts and the model."""
    task_threads = threads.apply()  # before torch / TensorFlow load: they size their pools once
    import mlflow

    cfg = train_config(dataset, params)
    workflow = config.get(DAG_IDS[dataset])
    arrays = image_data.load_snapshot(str(snapshot["uri"]))
    with mlflow_utils.task_run(workflow.experiment, who, str(snapshot["data_version"]),
                               {"workflow": workflow.dag_id, "framework": cfg.framework,
                                "profile": cfg.profile}) as run:
        progress.run_meta(mlflow_run_id=run.info.run_id)
        mlflow.set_tag("task_threads", str(task_threads))  # a tag: a retry may get another share
        mlflow.log_params({**cfg.to_params(), "snapshot_uri": snapshot["uri"]})
        log.info("%s train: %s %s profile, %d epochs of batch %d, %d thread(s)", workflow.dag_id,
                 cfg.framework, cfg.profile, cfg.recipe.epochs, cfg.recipe.batch_size, task_threads)
        epochs = progress.Progress(f"{workflow.model_name} train", "epoch", cfg.recipe.epochs, every=1)

        def on_epoch(epoch: EpochResult) -> None:
            mlflow.log_metrics({"val_accuracy": epoch.val_accuracy, "train_loss": epoch.train_loss,
                                "epoch_seconds": epoch.seconds}, step=epoch.epoch)
            epochs.update(epoch.epoch, metrics={"train_loss": epoch.train_loss,
                                                "val_accuracy": epoch.val_accuracy},
                          device=epoch.device, seconds=round(epoch.seconds, 3))

        result = trainer(cfg.framework)(arrays, cfg, on_epoch,
                                        checkpoint_dir(who.dag_id, who.run_id, cfg.framework))
        mlflow.log_metrics({"test_accuracy": result.test_accuracy, "train_seconds": result.train_seconds,
                            "images_per_second": result.images_per_second,
                            "resumed_from_epoch": result.resumed_from_epoch})
        mlflow.set_tag("device", result.device)
        evaluated = subset(arrays, cfg.recipe, cfg.seed)
        with tempfile.TemporaryDirectory() as tmp:
            matrix = image_plots.confusion(evaluated.y_test, result.predictions, len(arrays.classes))
            image_plots.plot_learning_curves(result.history, f"{tmp}/learning_curves.png")
            image_plots.plot_confusion(matrix, arrays.classes, f"{tmp}/confusion_matrix.png")
            np.savetxt(f"{tmp}/confusion_matrix.csv", matrix, fmt="%d", delimiter=",")
            image_plots.plot_misclassified(evaluated.x_test, evaluated.y_test, result.predictions,
                                           arrays.classes, f"{tmp}/misclassified.png")
            mlflow.log_artifacts(tmp, artifact_path="evaluation")
        info = _log_model(result, cfg.framework, evaluated.x_test[:4].astype("float32"))
        return {"run_id": run.info.run_id, "model_uri": info.model_uri, "params": cfg.to_params(),
                "test_accuracy": result.test_accuracy}


def _accuracy(model_uri: str, images: np.ndarray, labels: np.ndarray) -> float:
    import mlflow

    if "tensorflow" in mlflow.models.get_model_info(model_uri).flavors:
        import scripts.image.keras_trainer  # noqa: F401 - registers the custom layers the model uses
    model = mlflow.pyfunc.load_model(model_uri)
    logits = np.concatenate([np.asarray(model.predict(images[i:i + 1000].astype("float32")))
                             for i in range(0, len(images), 1000)])
    return float((logits.argmax(1) == labels).mean())


def _nearest_centroid_accuracy(x_train, y_train, x_test, y_test, classes: int) -> float:
    """A simple, honest baseline: classify by the nearest class-mean image."""
    flat = x_train.reshape(len(x_train), -1).astype("float32") / 255
    centroids = np.stack([flat[y_train == c].mean(0) for c in range(classes)])
    test = x_test.reshape(len(x_test), -1).astype("float32") / 255
    distances = (test ** 2).sum(1)[:, None] - 2 * test @ centroids.T + (centroids ** 2).sum(1)[None]
    return float((distances.argmin(1) == y_test).mean())


def evaluate(dataset: str, snapshot: Mapping[str, Any], trained: Mapping[str, Any]) -> dict[str, Any]:
    """The logged model, the baseline and the current champion on the same test images."""
    threads.apply()
    mlflow_utils.configure()  # before the first load: the server may be known only by its connection
    workflow = config.get(DAG_IDS[dataset])
    cfg = train_config(dataset, {k: trained["params"][k] for k in TUNABLE if k in trained["params"]})
    arrays = image_data.load_snapshot(str(snapshot["uri"]))
    data = subset(arrays, cfg.recipe, cfg.seed)
    started = time.perf_counter()
    metrics = {"test_accuracy": _accuracy(trained["model_uri"], data.x_test, data.y_test),
               "baseline_accuracy": _nearest_centroid_accuracy(
                   data.x_train, data.y_train, data.x_test, data.y_test, len(arrays.classes))}
    champion = registry.score_champion(
        workflow, lambda uri: {"test_accuracy": _accuracy(uri, data.x_test, data.y_test)})
    metrics["evaluate_seconds"] = time.perf_counter() - started
    return {**registry.log_evaluation(workflow, trained["run_id"], metrics, champion), "profile": cfg.profile}


def register(dataset: str, snapshot: Mapping[str, Any], trained: Mapping[str, Any],
             evaluated: Mapping[str, Any], who: AirflowIdentity) -> dict[str, Any]:
    tags = {"data_version": str(snapshot["data_version"]), "dag_id": who.dag_id, "airflow_run_id": who.run_id,
            "profile": evaluated["profile"], "framework": str(trained["params"]["framework"])}
    # A smoke run trains on a small subset: it proves the pipeline, never the model.
    ineligible = "smoke profile" if evaluated["profile"] == "smoke" else None
    return registry.register_and_decide(config.get(DAG_IDS[dataset]), trained, evaluated, tags, ineligible).to_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run an image workflow outside Airflow")
    parser.add_argument("--dataset", choices=sorted(DAG_IDS), required=True)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--framework", default="pytorch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--source", help="data file or folder (default: DATA_MIRROR or download)")
    parser.add_argument("--run-id", help="run identity; the same id resumes a killed run")
    parser.add_argument("--steps", choices=("all", "train"), default="all",
                        help="'train' stops after training (for a run manager that registers itself)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    params = {"profile": args.profile, "framework": args.framework, "device": args.device,
              "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
              "learning_rate": args.learning_rate}
    params = {k: v for k, v in params.items() if v is not None}  # a flag not given: the default
    train_config(args.dataset, params)  # fail fast on bad flags, before any work
    run_id = args.run_id or f"cli__{datetime.now(UTC):%Y%m%dT%H%M%S}"
    who = AirflowIdentity(DAG_IDS[args.dataset], run_id, "train")
    snapshot = prepare(args.dataset, args.source)
    trained = train(args.dataset, snapshot, params, who)
    if args.steps == "all":
        evaluated = evaluate(args.dataset, snapshot, trained)
        progress.step("evaluate", **evaluated["metrics"])
        progress.step("register", **register(args.dataset, snapshot, trained, evaluated, who))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
