"""The TaskFlow tasks of the two image workflows (MNIST, CIFAR-10), built once for both DAGs.

Each DAG file stays a short, readable wiring of these four tasks. Only the training task goes to
the GPU (``gpu_pool``, ``gpu_queue``); preparing data, evaluating and registering run on the
default queue. Imported at parse time: airflow.sdk only, everything heavy inside the tasks.
"""

from __future__ import annotations

from typing import Any

from airflow.sdk import task

from common.config import REGISTRY_POOL, WorkflowConfig


def build(dataset: str, cfg: WorkflowConfig) -> tuple[Any, Any, Any, Any]:
    """(prepare, train, evaluate, register) task callables for ``dataset``."""

    @task
    def prepare(**context) -> dict:
        """Check the run's parameters, then fetch, validate and snapshot the images; returns the
        snapshot URI and data version."""
        from common.alerts import permanent_errors_fail_fast
        from scripts.image import pipeline as image_pipeline

        with permanent_errors_fail_fast():
            # What the Param schema cannot reject (an unknown key: Airflow passes it through)
            # fails here, before any download or snapshot, without retries.
            image_pipeline.train_config(dataset, context["params"])
            return image_pipeline.prepare(dataset)

    @task(**cfg.train_task_args())
    def train(snapshot: dict, **context) -> dict:
        """Train (resuming from the last epoch checkpoint on a retry); log to MLflow."""
        from common.alerts import permanent_errors_fail_fast
        from common.mlflow_utils import AirflowIdentity
        from scripts.image import pipeline as image_pipeline

        with permanent_errors_fail_fast():
            who = AirflowIdentity.from_context(context)
            return image_pipeline.train(dataset, snapshot, context["params"], who)

    @task
    def evaluate(snapshot: dict, trained: dict) -> dict:
        """The logged model, a nearest-centroid baseline and the champion on the same images."""
        from scripts.image import pipeline as image_pipeline

        return image_pipeline.evaluate(dataset, snapshot, trained)

    @task(pool=REGISTRY_POOL.name)
    def register(snapshot: dict, trained: dict, evaluated: dict, **context) -> dict:
        """Register the challenger; promote only through the gate (smoke never promotes)."""
        from common.mlflow_utils import AirflowIdentity
        from scripts.image import pipeline as image_pipeline

        who = AirflowIdentity.from_context(context)
        return image_pipeline.register(dataset, snapshot, trained, evaluated, who)

    return prepare, train, evaluate, register
