"""
### cifar10_cnn_training

CIFAR-10 images: a compact CNN trained with a fast recipe (whole data set on the device, large batches,
one-cycle schedule, mixed precision and channels-last on CUDA), on the GPU worker when there is one.

`prepare` validates the official python tarball (torchvision's download) or an ImageFolder tree or tarball (`DATA_MIRROR/cifar10/`) and writes a versioned array snapshot -> `train` (GPU pool and queue;
PyTorch, or `framework="tensorflow"` for Keras 3; per-epoch metrics and checkpoints, a retry resumes)
-> `evaluate` scores the logged model, a nearest-centroid baseline and the champion on the same test
images and logs the confusion matrix and misclassified images -> `register` registers `cifar10_cnn`; `champion` moves only when test accuracy >= 0.90 and
beats the champion. The `smoke` profile (small subset, CPU, seconds) never promotes.
A challenger that passes waits in `approve` for a person's Approve/Reject in the Airflow UI (the
form shows both scores; no answer within `approval_timeout`: Reject) unless the run param
`auto_promote` is true; `promote` applies the answer. Every new champion is an event of the Asset
`cifar10_cnn_champion` (docs/model_events.md).

Params (typed, bounded and described in the trigger form; declared in `common/config.py`):
`profile` (smoke | fast | quality), `framework` (pytorch | tensorflow), and optionally `epochs`
(>= 1), `batch_size` (>= 1), `learning_rate` (> 0), `seed` (>= 0), `device` (auto | cpu | cuda).
A bad value is refused when the run is triggered; an unknown key fails `prepare` before any work,
without retries. Steps: `scripts/image/pipeline.py`; the same run without Airflow: `scripts/image/cli.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from airflow.sdk import dag, task

from common import approval, config

if TYPE_CHECKING:  # the XCom types; the pipeline itself loads only inside a task (parse time)
    from common.registry import Evaluated
    from scripts.image.pipeline import Snapshot, Trained

CFG = config.get("cifar10_cnn_training")
CHAMPION_EVENTS = approval.champion_events(CFG)  # where a new champion is announced
DATASET = "cifar10"  # named once here; it travels on in the Snapshot


@dag(**CFG.dag_kwargs(), doc_md=__doc__)
def cifar10_cnn_training() -> None:
    @task
    def prepare(**context) -> Snapshot:
        """Check the run's parameters, then fetch, validate and snapshot the images."""
        from common.alerts import permanent_errors_fail_fast
        from scripts.image import pipeline

        with permanent_errors_fail_fast():  # bad params or data fail the same on every try
            return pipeline.prepare(CFG, DATASET, context["params"])

    @task(**CFG.train_task_args())  # the GPU pool and queue; a retry resumes from the last epoch
    def train(snapshot: Snapshot, **context) -> Trained:
        """Train on the run's image subset, per-epoch metrics and checkpoints; log to MLflow."""
        from common.alerts import permanent_errors_fail_fast
        from common.mlflow_utils import AirflowIdentity
        from scripts.image import pipeline

        with permanent_errors_fail_fast():
            return pipeline.train(CFG, snapshot, context["params"], AirflowIdentity.from_context(context))

    @task
    def evaluate(snapshot: Snapshot, trained: Trained) -> Evaluated:
        """The logged model, a nearest-centroid baseline and the champion on the same images."""
        from scripts.image import pipeline

        return pipeline.evaluate(CFG, snapshot, trained)

    # one slot shared by every workflow: promotions never race;
    # its alias outlet carries the model Asset's event when the champion moves (auto_promote)
    @task(pool=config.REGISTRY_POOL.name, outlets=[CHAMPION_EVENTS])
    def register(snapshot: Snapshot, trained: Trained, evaluated: Evaluated, **context) -> dict:
        """Register the challenger; promote only through the gate (smoke never promotes)."""
        from common import registry
        from common.mlflow_utils import AirflowIdentity
        from scripts.image import pipeline

        result = pipeline.register(CFG, snapshot, trained, evaluated, AirflowIdentity.from_context(context),
                                   context["params"])
        registry.announce_champion(context, CFG.model_name, result["champion_event"])
        return result

    snapshot = prepare()
    trained = train(snapshot)
    decision = register(snapshot, trained, evaluate(snapshot, trained))
    approval.approval_step(CFG, decision)  # a person's Approve/Reject, then promote


cifar10_cnn_training()
