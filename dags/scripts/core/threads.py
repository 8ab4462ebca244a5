"""How many compute threads one task may use, and applying that to every numeric library.

Each numeric library sizes its thread pool to the whole machine on its own (PyTorch's intra-op
pool, the OpenMP runtime under LightGBM and XGBoost, Polars, TensorFlow's two pools). Two such
tasks side by side on the same cores then run two or three times as many busy threads as there
are cores; the spin-waiting OpenMP threads make that far worse than sharing: an MNIST smoke epoch
took 0.42 s alone and 2-4 s beside one power run on two cores. A task that keeps to its share of
the worker takes about twice as long beside another, not ten times.

The budget (:func:`budget`):

* ``VTM_TASK_THREADS`` when set (a worker, a deployment or a person overrides everything);
* outside Airflow (CLI, ``bench/``, a notebook, the tests' direct calls): every core;
* inside an Airflow task: ``cpu_count // slots``, at least 1, where ``slots`` is how many tasks the
  worker runs at once: ``[celery] worker_concurrency`` on a Celery worker, else
  ``[core] parallelism`` (the LocalExecutor's process count; ``airflow dags test`` is given the
  same share as the deployment it stands in for). Slots beyond the core count cannot run in
  parallel anyway, so the budget never goes below one thread: the embedded stack's parallelism 3
  on 2 cores gives every task 1 thread.

:func:`apply` writes the budget into the environment (for libraries not imported yet: OpenMP,
MKL, OpenBLAS, Polars and TensorFlow read it once, when they load) and into the libraries already
loaded (``torch.set_num_threads``, ``tf.config.threading``, threadpoolctl). Call it at the start of
every task that computes, before its heavy imports, and again where a trainer imports its
framework. LightGBM and XGBoost take the number as a parameter (``num_threads``, ``nthread``).

Standard library only: no Airflow, no MLflow, nothing heavy at import.
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

ENV_OVERRIDE = "VTM_TASK_THREADS"
# What OpenMP, the BLAS libraries, Polars and TensorFlow read when they load.
THREAD_ENV = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "POLARS_MAX_THREADS",
              "TF_NUM_INTRAOP_THREADS", "TF_NUM_INTEROP_THREADS", "NUMEXPR_NUM_THREADS")
# Set in a task's process by Airflow's task runner (and by dag.test, which runs tasks in-process).
_AIRFLOW_TASK_MARKERS = ("AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_TASK_ID")
_applied: int | None = None
_interop_set = False
_REPORTED_LIBRARIES = ("torch", "tensorflow", "polars", "lightgbm", "xgboost", "numpy")
_reported: frozenset[str] = frozenset()
# The process the state above describes: a forked child (a task process under Airflow's
# supervisor) inherits it, but its task log has not said anything yet.
_state_pid: int | None = None


def cpu_count() -> int:
    """Cores this process may run on (the affinity mask: a container's or taskset's share)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def in_airflow_task() -> bool:
    return any(os.environ.get(name) for name in _AIRFLOW_TASK_MARKERS)


def _option(section: str, key: str) -> str | None:
    """An Airflow option: its environment variable, else Airflow's config when already loaded
    (inside a task it always is; importing it here would make this module heavy)."""
    value = os.environ.get(f"AIRFLOW__{section.upper()}__{key.upper()}")
    if value:
        return value
    conf = getattr(sys.modules.get("airflow.configuration"), "conf", None)
    if conf is None:
        return None
    try:
        return conf.get(section, key, fallback=None)
    except Exception:  # noqa: BLE001 - a missing section (no Celery provider) is no answer
        return None


def _positive_int(value: str | None, what: str) -> int | None:
    if value is None or str(value).strip() == "":
        return None
    try:
        number = int(str(value).strip())
    except ValueError:
        log.warning("ignoring %s=%r: not an integer", what, value)
        return None
    if number < 1:
        log.warning("ignoring %s=%r: must be at least 1", what, value)
        return None
    return number


def worker_slots() -> int:
    """How many tasks this worker runs at once, from Airflow's configuration."""
    executor = _option("core", "executor") or ""
    if "celery" in executor.lower():
        slots = _positive_int(_option("celery", "worker_concurrency"), "[celery] worker_concurrency")
        if slots:
            return slots
    return _positive_int(_option("core", "parallelism"), "[core] parallelism") or 32  # Airflow's default


def budget() -> int:
    """This task's compute threads (see the module docstring)."""
    override = _positive_int(os.environ.get(ENV_OVERRIDE), ENV_OVERRIDE)
    if override:
        return override
    cores = cpu_count()
    if not in_airflow_task():
        return cores
    return max(1, cores // min(worker_slots(), cores))


def capped(requested: int | None) -> int:
    """A trainer's thread parameter (LightGBM ``num_threads``, XGBoost ``nthread``) within the
    budget: ``requested`` caps it, 0 or None means the whole budget."""
    limit = budget()
    return min(int(requested), limit) if requested and int(requested) > 0 else limit


def apply(threads: int | None = None) -> int:
    """Limit this process to ``threads`` (default :func:`budget`) in every numeric library,
    loaded or not; returns the number. Idempotent and cheap: call it wherever a task starts."""
    global _applied, _interop_set, _reported, _state_pid
    if _state_pid != os.getpid():
        _applied, _reported, _state_pid = None, frozenset(), os.getpid()
    n = threads or budget()
    for name in THREAD_ENV:
        os.environ[name] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "set_num_threads"):
        torch.set_num_threads(n)
        if not _interop_set:
            # Settable once per process, and only before the first inter-op parallel work.
            try:
                torch.set_num_interop_threads(n)
            except RuntimeError:
                pass
            _interop_set = True
    tf = sys.modules.get("tensorflow")
    threading_api = getattr(getattr(tf, "config", None), "threading", None)
    if threading_api is not None:
        for setter in (threading_api.set_intra_op_parallelism_threads,
                       threading_api.set_inter_op_parallelism_threads):
            try:
                setter(n)
            except RuntimeError:  # TensorFlow's runtime already started: its env was read then
                pass
    if sys.modules.get("threadpoolctl") is not None or any(
            name in sys.modules for name in ("numpy", "lightgbm", "xgboost", "torch", "sklearn")):
        try:
            import threadpoolctl

            threadpoolctl.threadpool_limits(n)
        except Exception:  # noqa: BLE001 - not installed, or a runtime it cannot drive
            pass
    loaded = frozenset(name for name in _REPORTED_LIBRARIES if name in sys.modules)
    if (_applied, _reported) != (n, loaded):
        log.info("task thread budget: %d of %d cores (%s); %s", n, cpu_count(), describe(),
                 ", ".join(f"{k} {v}" for k, v in report().items()))
    _reported = loaded
    _applied = n
    return n


def describe() -> str:
    """Where the budget comes from, for the log."""
    if os.environ.get(ENV_OVERRIDE):
        return f"{ENV_OVERRIDE}={os.environ[ENV_OVERRIDE]}"
    if not in_airflow_task():
        return "outside Airflow: every core"
    return f"{worker_slots()} task slots on this worker"


def report() -> dict[str, object]:
    """The thread counts the loaded libraries actually use now (for the log and the tests)."""
    out: dict[str, object] = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}
    torch = sys.modules.get("torch")
    if torch is not None and hasattr(torch, "get_num_threads"):
        out["torch intra-op"] = torch.get_num_threads()
        out["torch inter-op"] = torch.get_num_interop_threads()
    polars = sys.modules.get("polars")
    if polars is not None and hasattr(polars, "thread_pool_size"):
        out["polars"] = polars.thread_pool_size()
    if "numpy" in sys.modules or "torch" in sys.modules:
        try:
            import threadpoolctl

            pools = {}
            for info in threadpoolctl.threadpool_info():
                pools[f"{info['internal_api']}"] = info["num_threads"]
            out.update({f"threadpool {k}": v for k, v in sorted(pools.items())})
        except Exception:  # noqa: BLE001 - not installed
            pass
    return out
