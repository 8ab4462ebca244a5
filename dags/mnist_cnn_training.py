"""
### mnist_cnn_training

MNIST handwritten digits: a compact CNN trained with a fast recipe (whole data set on the device, large batches,
one-cycle schedule, mixed precision and channels-last on CUDA), on the GPU worker when there is one.

`prepare` validates the four official IDX files (torchvision's download, or `DATA_MIRROR/mnist/`) and writes a versioned array snapshot -> `train` (GPU pool and queue;
PyTorch, or `framework="tensorflow"` for Keras 3; per-epoch metrics and checkpoints, a retry resumes)
-> `evaluate` scores the logged model, a nearest-centroid baseline and the champion on the same test
images -> `register` registers `mnist_cnn`; `champion` moves only when test accuracy >= 0.99 and
beats the champion. The `smoke` profile (small subset, CPU, seconds) never promotes.

Params (typed, bounded and described in the trigger form; declared in `common/config.py`):
`profile` (smoke | fast | quality), `framework` (pytorch | tensorflow), and optionally `epochs`
(>= 1), `batch_size` (>= 1), `learning_rate` (> 0), `seed` (>= 0), `device` (auto | cpu | cuda).
A bad value is refused when the run is triggered; an unknown key fails `prepare` before any work.
"""

from __future__ import annotations

from airflow.sdk import dag

from common import config, image_tasks

CFG = config.get("mnist_cnn_training")


@dag(**CFG.dag_kwargs(), doc_md=__doc__)
def mnist_cnn_training() -> None:
    prepare, train, evaluate, register = image_tasks.build("mnist", CFG)

    snapshot = prepare()
    trained = train(snapshot)
    register(snapshot, trained, evaluate(snapshot, trained))


mnist_cnn_training()
