"""Training progress a person reads in the Airflow task log, and the trainer contract's lines.

Two kinds of output, written by every workflow the same way:

* one INFO log line per epoch (images) or every ~5 % of boosting rounds (LightGBM, XGBoost):
  ``power_lgbm train: round 400/2000 (20%) loss 0.5123 valid l1 0.4871 | elapsed 6.1 s,
  remaining ~24 s``. Airflow 3's task runner sends Python logging at INFO and above to the task
  log, so this is what the Grid view's log tab shows while a task runs;
* the run manager's contract on stdout, flushed at once: ``VTM_PROGRESS::{json}`` per reported
  step and ``VTM_RUN_META::{json}`` once per run. Airflow logs each stdout line at INFO too.

:class:`Progress` times and formats; :func:`lightgbm_callback` and :func:`xgboost_callback` feed it
from the boosting loops. Standard library only (the callbacks import nothing: LightGBM calls a plain
function, XGBoost's callback class is built when asked for).
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Mapping
from typing import Any

log = logging.getLogger("vtm.progress")

PROGRESS_PREFIX, RUN_META_PREFIX = "VTM_PROGRESS", "VTM_RUN_META"


def emit(payload: Mapping[str, Any], prefix: str = PROGRESS_PREFIX) -> None:
    """One contract line on stdout, flushed (a run manager reads it while the task runs)."""
    print(f"{prefix}::" + json.dumps(dict(payload), default=str), file=sys.stdout, flush=True)


def run_meta(**fields: Any) -> None:
    emit(fields, RUN_META_PREFIX)


def step(name: str, **fields: Any) -> None:
    """A pipeline step finished (the CLI's prepare / evaluate / register lines)."""
    emit({"step": name, **fields})


def duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 05 s``, ``1 h 02 min``."""
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, secs = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"


class Progress:
    """Progress of ``total`` units (``unit``: epoch, round) of one training task.

    ``update(n, loss=..., metrics=...)`` after unit ``n`` (1-based) logs one line when ``n`` is a
    reporting point (every ``every`` units, the first and the last) and emits a
    ``VTM_PROGRESS`` line with the same figures. Remaining time is the mean time per unit so far
    times the units left; ``at_most`` marks it an upper bound (early stopping may end sooner).
    """

    def __init__(self, label: str, unit: str, total: int, *, every: int | None = None,
                 fraction: float = 0.05, at_most: bool = False, fields: Mapping[str, Any] | None = None,
                 logger: logging.Logger | None = None) -> None:
        self.label, self.unit, self.total = label, unit, max(1, int(total))
        self.every = max(1, int(every or round(self.total * fraction) or 1))
        self.at_most = at_most
        self.fields = dict(fields or {})
        self.log = logger or log
        self.started = time.perf_counter()
        self.last: int = 0
        self.first: int | None = None  # units done before this process started timing (a resume)

    def due(self, n: int) -> bool:
        return n == 1 or n >= self.total or n % self.every == 0

    def update(self, n: int, *, loss: float | None = None, metrics: Mapping[str, float] | None = None,
               force: bool = False, **fields: Any) -> None:
        self.last = n
        if self.first is None:
            self.first = n - 1
        if not (force or self.due(n)):
            return
        elapsed = time.perf_counter() - self.started
        timed = n - self.first
        remaining = elapsed / timed * max(0, self.total - n) if timed > 0 else 0.0
        parts = [f"{self.label}: {self.unit} {n}/{self.total} ({n / self.total:.0%})"]
        if loss is not None:
            parts.append(f"loss {_number(loss)}")
        for name, value in (metrics or {}).items():
            parts.append(f"{name} {_number(value)}")
        parts.extend(f"{k} {v}" for k, v in {**self.fields, **fields}.items())
        bound = "at most " if self.at_most else "~"
        self.log.info("%s | elapsed %s, remaining %s%s", " ".join(parts), duration(elapsed), bound,
                      duration(remaining))
        emit({"task": self.label, self.unit: n, f"total_{self.unit}s": self.total,
              **({"loss": round(loss, 6)} if loss is not None else {}),
              **{k: round(float(v), 6) for k, v in (metrics or {}).items()},
              **self.fields, **fields,
              "elapsed_seconds": round(elapsed, 2), "remaining_seconds": round(remaining, 2)})

    def finish(self, **fields: Any) -> None:
        """A closing line when the last update was not a reporting point (early stopping)."""
        elapsed = time.perf_counter() - self.started
        extra = " ".join(f"{k} {v}" for k, v in fields.items())
        self.log.info("%s: done after %d/%d %ss in %s%s", self.label, self.last, self.total, self.unit,
                      duration(elapsed), f" ({extra})" if extra else "")


def _split(results: list[tuple[str, float]], loss_name: str | None) -> tuple[float | None, dict[str, float]]:
    """(loss, other metrics) from (``data metric`` name, value) pairs: the loss is the training
    data's first metric (or ``loss_name``), the rest are reported by name."""
    loss, metrics = None, {}
    for name, value in results:
        if loss is None and (name == loss_name or (loss_name is None and name.startswith("train "))):
            loss = float(value)
        else:
            metrics[name] = float(value)
    return loss, metrics


def lightgbm_callback(progress: Progress, offset: int = 0):
    """A ``lightgbm.train`` callback reporting round ``offset + iteration + 1`` to ``progress``.

    Evaluation results (``valid_sets``) are reported by data set and metric name; name the
    training set ``train`` in ``valid_names`` to report it as the loss."""

    def callback(env) -> None:
        n = offset + env.iteration - env.begin_iteration + 1
        if not progress.due(n):
            progress.last = n
            if progress.first is None:
                progress.first = n - 1
            return
        results = [(f"{item[0]} {item[1]}", item[2]) for item in env.evaluation_result_list or []]
        loss, metrics = _split(results, None)
        progress.update(n, loss=loss, metrics=metrics)

    callback.order = 30  # after LightGBM's own callbacks (early stopping is 30 too, runs first)
    return callback


def xgboost_callback(progress: Progress):
    """An ``xgboost.callback.TrainingCallback`` reporting every round to ``progress``: the
    ``train`` evaluation's first metric as the loss, the others by name."""
    import xgboost

    class _Callback(xgboost.callback.TrainingCallback):
        def after_iteration(self, model, epoch: int, evals_log) -> bool:
            n = epoch + 1
            if progress.due(n):
                results = [(f"{data} {metric}", values[-1]) for data, by_metric in evals_log.items()
                           for metric, values in by_metric.items() if values]
                loss, metrics = _split(results, None)
                progress.update(n, loss=float(loss) if loss is not None else None, metrics=metrics)
            else:
                progress.last = n
                if progress.first is None:
                    progress.first = n - 1
            return False

    return _Callback()
