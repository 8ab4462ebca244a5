"""The image workflows' steps (MNIST, CIFAR-10) as plain functions logging to MLflow: prepare,
train, evaluate, register. Each takes the ``WorkflowConfig`` of the DAG that runs it (the command
line, ``scripts.image.cli``, passes the same one); the data set is named once, to ``prepare``, and
travels on in the :class:`Snapshot`.

Between steps only the small typed dicts below travel, exactly what Airflow passes through XCom:
:class:`Snapshot` (prepare), :class:`Trained` (train: the MLflow run, the model and the run's image
subset, drawn once here and applied as is by evaluate), ``registry.Evaluated`` (evaluate).
"""

from __future__ import annotations

import logging
import re
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypedDict

import numpy as np

from common import mlflow_utils, registry
from common.config import WorkflowConfig
from common.mlflow_utils import AirflowIdentity
from scripts.core import params as run_params
from scripts.core import paths, progress, threads
from scripts.image import data as image_data
from scripts.image import plots
from scripts.image.base import EpochResult, ImageArrays, Subset, TrainConfig, TrainResult, draw_subset

log = logging.getLogger(__name__)

Trainer = Callable[..., TrainResult]


class Snapshot(TypedDict):
    """prepare -> train, evaluate, register: where the validated arrays are, never the data."""

    uri: str
    data_version: str
    dataset: str  # "mnist" | "cifar10": the DAG names it once, to prepare
    n_train: int
    n_test: int
    source: str


class SubsetIndices(TypedDict):
    """Sorted row indices into each split of the snapshot; None: the whole split."""

    train: list[int] | None
    test: list[int] | None


class Trained(TypedDict):
    """train -> evaluate, register."""

    run_id: str  # the MLflow run evaluate reopens
    model_uri: str
    profile: str
    framework: str
    test_accuracy: float  # the trainer's own figure; evaluate scores the logged model again
    subset: SubsetIndices  # the images this run trained and tested on, drawn once in train


def train_config(cfg: WorkflowConfig, dataset: str, params: Mapping[str, Any] | None) -> TrainConfig:
    """DAG params / trigger conf / CLI flags -> TrainConfig, typed and bounded by the workflow's
    ``run_params`` (``scripts.core.params.build``): unknown keys and bad values (``epochs`` 0, a
    bool, a negative learning rate, an unknown profile) are a ParameterError naming the field."""
    return run_params.build(TrainConfig, cfg.run_params, params, cfg.dag_id, dataset=dataset)


def checkpoint_dir(dag_id: str, run_id: str, framework: str) -> Path:
    """Per Airflow run (not per try): a retry finds what the killed try saved."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", run_id)
    return paths.data_dir() / "checkpoints" / dag_id / safe / framework


def trainer(framework: str) -> Trainer:
    if framework == "tensorflow":
        from scripts.image.keras_trainer import train_keras

        return train_keras
    from scripts.image.torch_trainer import train_torch

    return train_torch


def run_device(settings: TrainConfig) -> str:
    """Where the trainer will run ("cpu" or "cuda"): the profile can differ (``Profile.gpu``).
    PyTorch resolves "auto" as its trainer does (and refuses "cuda" without a GPU here, before
    any MLflow run opens); Keras runs the CPU's profile unless "cuda" is named."""
    if settings.framework == "pytorch":
        from scripts.image.torch_trainer import pick_device

        return pick_device(settings.device).type
    return "cuda" if settings.device == "cuda" else "cpu"


def prepare(cfg: WorkflowConfig, dataset: str, params: Mapping[str, Any] | None,
            source: str | Path | None = None, out_root: Path | None = None) -> Snapshot:
    """Check the run's parameters first (what the Param schema cannot reject, an unknown key,
    fails here before any download), then fetch, validate and snapshot ``dataset``."""
    train_config(cfg, dataset, params)
    threads.apply()
    snapshot = image_data.prepare(dataset, Path(source) if source else None, out_root)
    return Snapshot(uri=snapshot.uri, data_version=snapshot.data_version, dataset=snapshot.dataset,
                    n_train=snapshot.n_train, n_test=snapshot.n_test, source=snapshot.source)


# The pickled model refers to scripts.image.*: ship the whole scripts package (its folder) with the
# model, so it loads where this repository is not on the path.
SCRIPTS_PACKAGE = str(Path(__file__).resolve().parents[1])


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
            code_paths=[SCRIPTS_PACKAGE],
            pip_requirements=[f"tensorflow-cpu=={tensorflow.__version__}", f"keras=={keras.__version__}",
                              f"numpy=={np.__version__}"])
    import torch

    with torch.no_grad():
        logits = result.model(torch.from_numpy(example)).numpy()
    return mlflow.pytorch.log_model(
        result.model, name="model", signature=infer_signature(example, logits), input_example=example,
        code_paths=[SCRIPTS_PACKAGE],
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"numpy=={np.__version__}"])


def train(cfg: WorkflowConfig, snapshot: Snapshot, params: Mapping[str, Any] | None,
          who: AirflowIdentity) -> Trained:
    """Draw the run's image subset, train with per-epoch metrics and checkpoints, log the
    learning curves and the model."""
    task_threads = threads.apply()  # before torch / TensorFlow load: they size their pools once
    import mlflow

    settings = train_config(cfg, snapshot["dataset"], params)
    device = run_device(settings)
    recipe = settings.recipe_on(device)
    arrays = image_data.load_snapshot(snapshot["uri"])
    drawn = draw_subset(arrays, recipe, settings.seed)
    data = drawn.apply(arrays)
    with mlflow_utils.task_run(cfg.experiment, who, snapshot["data_version"],
                               {"workflow": cfg.dag_id, "framework": settings.framework,
                                "profile": settings.profile}) as run:
        progress.run_meta(mlflow_run_id=run.info.run_id)
        mlflow.set_tag("task_threads", str(task_threads))  # a tag: a retry may get another share
        mlflow.log_params({**settings.to_params(device), "snapshot_uri": snapshot["uri"]})
        log.info("%s train: %s %s profile, %d epochs of batch %d, %d thread(s)", cfg.dag_id,
                 settings.framework, settings.profile, recipe.epochs, recipe.batch_size, task_threads)
        epochs = progress.Progress(f"{cfg.model_name} train", "epoch", recipe.epochs, every=1)

        def on_epoch(epoch: EpochResult) -> None:
            mlflow.log_metrics({"val_accuracy": epoch.val_accuracy, "train_loss": epoch.train_loss,
                                "epoch_seconds": epoch.seconds}, step=epoch.epoch)
            epochs.update(epoch.epoch, metrics={"train_loss": epoch.train_loss,
                                                "val_accuracy": epoch.val_accuracy},
                          device=epoch.device, seconds=round(epoch.seconds, 3))

        result = trainer(settings.framework)(data, settings, on_epoch,
                                             checkpoint_dir(who.dag_id, who.run_id, settings.framework))
        mlflow.log_metrics({"test_accuracy": result.test_accuracy, "train_seconds": result.train_seconds,
                            "images_per_second": result.images_per_second,
                            "resumed_from_epoch": result.resumed_from_epoch})
        mlflow.set_tag("device", result.device)
        with tempfile.TemporaryDirectory() as tmp:
            plots.plot_learning_curves(result.history, f"{tmp}/learning_curves.png")
            mlflow.log_artifacts(tmp, artifact_path="evaluation")
        info = _log_model(result, settings.framework, data.x_test[:4].astype("float32"))
        return Trained(run_id=run.info.run_id, model_uri=info.model_uri, profile=settings.profile,
                       framework=settings.framework, test_accuracy=result.test_accuracy,
                       subset=SubsetIndices(**drawn.to_dict()))


def _predict(model_uri: str, images: np.ndarray) -> np.ndarray:
    """The class the logged model (through pyfunc, whatever its flavor) gives each image."""
    import mlflow

    if "tensorflow" in mlflow.models.get_model_info(model_uri).flavors:
        import scripts.image.keras_trainer  # noqa: F401 - registers the custom layers the model uses
    model = mlflow.pyfunc.load_model(model_uri)
    logits = np.concatenate([np.asarray(model.predict(images[i:i + 1000].astype("float32")))
                             for i in range(0, len(images), 1000)])
    return logits.argmax(1)


def _nearest_centroid_accuracy(data: ImageArrays) -> float:
    """A simple, honest baseline: classify by the nearest class-mean image."""
    flat = data.x_train.reshape(len(data.x_train), -1).astype("float32") / 255
    centroids = np.stack([flat[data.y_train == c].mean(0) for c in range(len(data.classes))])
    test = data.x_test.reshape(len(data.x_test), -1).astype("float32") / 255
    distances = (test ** 2).sum(1)[:, None] - 2 * test @ centroids.T + (centroids ** 2).sum(1)[None]
    return float((distances.argmin(1) == data.y_test).mean())


def evaluate(cfg: WorkflowConfig, snapshot: Snapshot, trained: Trained) -> registry.Evaluated:
    """The logged model, the baseline and the current champion on the images the run was tested
    on (its subset, as train drew it); metrics on the logged model (the test images as their
    dataset), the confusion matrix and misclassified images, and the champion's health."""
    threads.apply()
    mlflow_utils.configure()  # before the first load: the server may be known only by its connection
    data = Subset.from_dict(trained["subset"]).apply(image_data.load_snapshot(snapshot["uri"]))
    started = time.perf_counter()
    predictions = _predict(trained["model_uri"], data.x_test)
    metrics = {"test_accuracy": float((predictions == data.y_test).mean()),
               "baseline_accuracy": _nearest_centroid_accuracy(data)}
    champion = registry.score_champion(
        cfg, lambda uri: {"test_accuracy": float((_predict(uri, data.x_test) == data.y_test).mean())})
    metrics["evaluate_seconds"] = time.perf_counter() - started

    def write_artifacts(folder: str) -> None:
        matrix = plots.confusion(data.y_test, predictions, len(data.classes))
        plots.plot_confusion(matrix, data.classes, f"{folder}/confusion_matrix.png")
        np.savetxt(f"{folder}/confusion_matrix.csv", matrix, fmt="%d", delimiter=",")
        plots.plot_misclassified(data.x_test, data.y_test, predictions, data.classes,
                                 f"{folder}/misclassified.png")

    return registry.log_evaluation(cfg, trained["run_id"], metrics, champion, write_artifacts,
                                   model_uri=trained["model_uri"], data=evaluation_data(snapshot, len(data.y_test)))


def evaluation_data(snapshot: Snapshot, images: int) -> registry.EvaluationData:
    """The test images scored, as MLflow's evaluation dataset: the snapshot's test split (a
    smoke run's subset says so in the name), digest = the snapshot's data version. The test set
    has no date: the champion's health point is on the day evaluated."""
    split = "test" if images == snapshot["n_test"] else f"test-subset-{images}"
    return registry.EvaluationData(
        name=f"{snapshot['dataset']}-{split}", version=snapshot["data_version"], source=snapshot["uri"],
        profile={"images": images, "n_test": snapshot["n_test"], "source": snapshot["source"]})


def register(cfg: WorkflowConfig, snapshot: Snapshot, trained: Trained, evaluated: registry.Evaluated,
             who: AirflowIdentity, values: Mapping[str, Any] | None = None) -> dict[str, object]:
    """Register the challenger; promote only through the gate, now (``auto_promote``: the run's
    ``values`` or the config) or after approval. A smoke run trains on a small subset: it proves
    the pipeline, never the model, so it is never eligible."""
    tags = {"data_version": snapshot["data_version"], "dag_id": who.dag_id, "airflow_run_id": who.run_id,
            "profile": trained["profile"], "framework": trained["framework"]}
    ineligible = "smoke profile" if trained["profile"] == "smoke" else None
    decision = registry.register_and_decide(cfg, trained, evaluated, tags, ineligible,
                                            auto_promote=registry.wants_auto_promote(cfg, values))
    return registry.register_result(cfg, trained, evaluated, decision, snapshot["data_version"])
