"""Tasks side by side on shared cores (issue 9, point 6): each task keeps to its thread budget.

No timing assertions here (speed figures belong in bench/threads_bench.py): what is checked is
how many threads a task process really computes on.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from scripts.core import threads
from tests.helpers import dags_for_dag_test
from tests.reliability.test_logs import lines, run_supervised

ROOT = Path(__file__).resolve().parents[2]

# Torch matrix products and a LightGBM fit; afterwards, how many OS threads of this process
# gained CPU time while they ran (/proc/self/task/*/stat, utime + stime in clock ticks).
BUSY_PROBE = r"""
import json, os, sys
sys.path.insert(0, "dags")
from scripts.core import threads
threads.apply()
import numpy as np, torch, lightgbm

def cpu():
    out = {}
    for tid in os.listdir("/proc/self/task"):
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        out[tid] = int(fields[11]) + int(fields[12])
    return out

threads.apply()
before = cpu()
a = torch.randn(600, 600)
for _ in range(150):
    a = torch.tanh(a @ a.T / 600)
rng = np.random.default_rng(0)
X = rng.normal(size=(60000, 40)); y = X[:, 0] + rng.normal(size=60000)
lightgbm.train({"objective": "l2", "verbose": -1, "num_threads": threads.capped(0)},
               lightgbm.Dataset(X, y), num_boost_round=60)
after = cpu()
busy = sorted((after[t] - before.get(t, 0) for t in after), reverse=True)
print(json.dumps({"busy": [b for b in busy if b >= 5], "torch": torch.get_num_threads(),
                  "budget": threads.budget()}))
"""


@pytest.mark.reliability(
    case="6.1 two tasks side by side, one thread each",
    fault="each task's libraries spun a thread per core: two tasks on 2 cores ran 4+ busy threads",
    survives="with a budget of 1, each of two concurrent task processes computes on one thread")
def test_two_task_processes_each_compute_on_one_thread():
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OMP_", "MKL_", "OPENBLAS_"))}
    env[threads.ENV_OVERRIDE] = "1"
    procs = [subprocess.Popen([sys.executable, "-c", BUSY_PROBE], cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        seen = json.loads(out.strip().splitlines()[-1])
        assert seen["budget"] == 1 and seen["torch"] == 1
        assert len(seen["busy"]) == 1, f"threads that computed (clock ticks each): {seen['busy']}"


@pytest.mark.e2e
@pytest.mark.reliability(
    case="6.2 worker slots size a real task's threads",
    fault="a task started by the executor sized PyTorch's pools to every core of the worker",
    survives="an image train task forked under Airflow's supervisor, on a worker with more task "
             "slots than cores, runs torch with 1 intra-op and 1 inter-op thread")
def test_supervised_train_task_gets_its_share(airflow_db, mlflow_server, tmp_path, monkeypatch):
    from tests.image_synth import write_mnist_mirror

    mirror = tmp_path / "mirror"
    write_mnist_mirror(mirror)
    monkeypatch.setenv("DATA_MIRROR", str(mirror))
    monkeypatch.delenv(threads.ENV_OVERRIDE, raising=False)
    monkeypatch.setenv("AIRFLOW__CORE__EXECUTOR", "LocalExecutor")
    monkeypatch.setenv("AIRFLOW__CORE__PARALLELISM", str(2 * threads.cpu_count()))
    dag = dags_for_dag_test().dags["mnist_cnn_training"]
    dag_run = dag.test(run_conf={"profile": "smoke", "framework": "pytorch"}, mark_success_pattern=".*")
    run_supervised(dag, dag_run, "prepare", tmp_path)
    budget_lines = [line for line in lines(run_supervised(dag, dag_run, "train", tmp_path), "scripts.core.threads")
                    if "torch intra-op" in line]
    assert budget_lines, "the trainer reports the thread counts torch really uses"
    assert re.search(r"task thread budget: 1 of \d+ cores", budget_lines[-1]), budget_lines
    assert "torch intra-op 1" in budget_lines[-1] and "torch inter-op 1" in budget_lines[-1], budget_lines
