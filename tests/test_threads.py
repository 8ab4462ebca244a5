"""The task thread budget (scripts/core/threads.py): where it comes from and what applying it sets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.core import threads

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def env(monkeypatch):
    """A clean slate: no override, no Airflow task, no Airflow settings; 8 cores."""
    for name in (threads.ENV_OVERRIDE, "AIRFLOW_CTX_DAG_ID", "AIRFLOW_CTX_TASK_ID", "AIRFLOW__CORE__EXECUTOR",
                 "AIRFLOW__CORE__PARALLELISM", "AIRFLOW__CELERY__WORKER_CONCURRENCY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "cpu_count", lambda: 8)
    monkeypatch.setitem(sys.modules, "airflow.configuration", None)  # Airflow's config not loaded
    return monkeypatch


def in_task(monkeypatch) -> None:
    monkeypatch.setenv("AIRFLOW_CTX_DAG_ID", "power_lgbm_training")
    monkeypatch.setenv("AIRFLOW_CTX_TASK_ID", "train")


def test_outside_airflow_every_core(env):
    assert threads.budget() == 8


def test_override_wins_everywhere(env):
    env.setenv(threads.ENV_OVERRIDE, "3")
    assert threads.budget() == 3
    in_task(env)
    env.setenv("AIRFLOW__CORE__PARALLELISM", "8")
    assert threads.budget() == 3


@pytest.mark.parametrize("value", ["0", "-2", "two", ""])
def test_bad_override_is_ignored(env, value):
    env.setenv(threads.ENV_OVERRIDE, value)
    assert threads.budget() == 8


@pytest.mark.parametrize(("parallelism", "cores", "expected"), [
    ("3", 2, 1),   # the embedded stack: 3 slots on 2 cores
    ("2", 8, 4),
    ("1", 8, 8),
    ("32", 8, 1),  # more slots than cores: one thread each, never zero
])
def test_local_executor_shares_cores_between_parallelism_slots(env, parallelism, cores, expected):
    in_task(env)
    env.setattr(threads, "cpu_count", lambda: cores)
    env.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    env.setenv("AIRFLOW__CORE__PARALLELISM", parallelism)
    assert threads.budget() == expected


def test_airflow_default_parallelism_when_unset(env):
    in_task(env)
    assert threads.worker_slots() == 32 and threads.budget() == 1


def test_celery_worker_uses_its_concurrency_not_parallelism(env):
    in_task(env)
    env.setenv("AIRFLOW__CORE__EXECUTOR", "CeleryExecutor")
    env.setenv("AIRFLOW__CORE__PARALLELISM", "16")
    env.setenv("AIRFLOW__CELERY__WORKER_CONCURRENCY", "4")
    assert threads.budget() == 2
    env.setenv("AIRFLOW__CELERY__WORKER_CONCURRENCY", "1")  # the GPU worker
    assert threads.budget() == 8


def test_capped_trainer_parameter(env):
    in_task(env)
    env.setenv("AIRFLOW__CORE__PARALLELISM", "4")  # budget 2
    assert threads.capped(0) == 2 and threads.capped(None) == 2
    assert threads.capped(8) == 2 and threads.capped(1) == 1


def test_apply_sets_env_torch_and_polars_in_a_fresh_process():
    """Applied before the libraries load (as a task does) and again after: torch's two pools,
    Polars' pool and the OpenMP/BLAS variables all hold the budget."""
    probe = (
        "import json, sys; sys.path.insert(0, 'dags');"
        "from scripts.core import threads; n = threads.apply();"
        "import polars, torch; threads.apply();"
        "torch.ones(64, 64) @ torch.ones(64, 64);"
        "print(json.dumps({'n': n, 'torch': torch.get_num_threads(), 'interop': torch.get_num_interop_threads(),"
        " 'polars': polars.thread_pool_size(), 'omp': threads.os.environ['OMP_NUM_THREADS'],"
        " 'report': threads.report()}))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "POLARS_"))}
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, env={**env, threads.ENV_OVERRIDE: "1"},
                         capture_output=True, text=True, check=True, timeout=300)
    seen = json.loads(out.stdout.strip().splitlines()[-1])
    assert seen["n"] == 1 and seen["torch"] == 1 and seen["interop"] == 1
    assert seen["polars"] == 1 and seen["omp"] == "1"
    assert seen["report"]["torch intra-op"] == 1


def test_apply_twice_in_one_process_does_not_raise(monkeypatch):
    import torch

    for name in threads.THREAD_ENV:  # restored after the test
        monkeypatch.delenv(name, raising=False)

    torch.ones(8) + 1
    before = torch.get_num_threads()
    try:
        assert threads.apply(1) == 1 and torch.get_num_threads() == 1
        assert threads.apply(1) == 1  # inter-op already set: guarded, no RuntimeError
    finally:
        torch.set_num_threads(before)
