"""Run an image workflow (MNIST, CIFAR-10) outside Airflow, in one process, so an existing run
manager can drive the trainer from the command line. From dags/:

    python -m scripts.image.cli --dataset mnist --profile smoke --framework pytorch \
        [--source PATH] [--run-id ID] [--epochs N] [--steps all|train|prepare] [--out DIR]

prints ``VTM_RUN_META::{"mlflow_run_id": ...}`` once, when the MLflow run is open, and
``VTM_PROGRESS::{"epoch", "total_epochs", "val_accuracy", "device", ...}`` after every epoch,
flushed; exit 0 only on success. The same ``--run-id`` resumes a killed run from its last epoch
checkpoint, in the same MLflow run. ``--steps prepare`` only validates and snapshots the data and
prints the snapshot as JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import UTC, datetime
from pathlib import Path

from common import config
from common.mlflow_utils import AirflowIdentity
from scripts.core import progress
from scripts.image import pipeline

# --dataset -> the workflow whose settings (experiment, model, gate, params) the run uses.
WORKFLOWS = {"mnist": "mnist_cnn_training", "cifar10": "cifar10_cnn_training"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run an image workflow outside Airflow")
    parser.add_argument("--dataset", choices=sorted(WORKFLOWS), required=True)
    parser.add_argument("--profile", default="smoke")
    parser.add_argument("--framework", default="pytorch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--seed", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--learning-rate", type=float)
    parser.add_argument("--source", help="MNIST: folder with the 4 IDX files; CIFAR-10: python or "
                        "ImageFolder tarball, or ImageFolder folder (default: DATA_MIRROR or download)")
    parser.add_argument("--out", type=Path, help="snapshot root (default: <data dir>/<dataset>/snapshots)")
    parser.add_argument("--run-id", help="run identity; the same id resumes a killed run")
    parser.add_argument("--steps", choices=("all", "train", "prepare"), default="all",
                        help="'train' stops after training (for a run manager that registers itself); "
                             "'prepare' after the snapshot, printed as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    cfg = config.get(WORKFLOWS[args.dataset])
    params = {"profile": args.profile, "framework": args.framework, "device": args.device,
              "seed": args.seed, "epochs": args.epochs, "batch_size": args.batch_size,
              "learning_rate": args.learning_rate}
    params = {k: v for k, v in params.items() if v is not None}  # a flag not given: the default
    snapshot = pipeline.prepare(cfg, args.dataset, params, args.source, args.out)  # bad flags fail first
    if args.steps == "prepare":
        print(json.dumps(snapshot), flush=True)
        return 0
    run_id = args.run_id or f"cli__{datetime.now(UTC):%Y%m%dT%H%M%S}"
    who = AirflowIdentity(cfg.dag_id, run_id, "train")
    trained = pipeline.train(cfg, snapshot, params, who)
    if args.steps == "all":
        evaluated = pipeline.evaluate(cfg, snapshot, trained)
        progress.step("evaluate", **evaluated["metrics"])
        progress.step("register", **pipeline.register(cfg, snapshot, trained, evaluated, who, params))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
