"""Run the power workflow outside Airflow: the DAG's four steps in one process, against the same
MLflow server and registry.

``python -m scripts.power.cli [--source FILE] [--param key=value ...]`` (from dags/) prints one
``VTM_PROGRESS::{json}`` line per step and ``VTM_RUN_META::{json}`` once; exit 0 only on success.
"""

from __future__ import annotations

import argparse
import logging
from datetime import UTC, datetime

from common import config
from common.mlflow_utils import AirflowIdentity
from scripts.core import progress
from scripts.power import pipeline

DAG_ID = "power_lgbm_training"


def key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the power workflow outside Airflow")
    parser.add_argument("--source", help="UCI zip or txt (default: DATA_MIRROR or download)")
    parser.add_argument("--param", action="append", default=[], type=key_value, metavar="KEY=VALUE",
                        help="model parameter override, e.g. --param num_boost_round=50")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = config.get(DAG_ID)
    params = dict(args.param)
    who = AirflowIdentity(cfg.dag_id, f"cli__{datetime.now(UTC):%Y%m%dT%H%M%S}", "train")
    snapshot = pipeline.prepare(cfg, params, args.source)  # a bad param fails here, before any work
    progress.step("prepare", data_version=snapshot["data_version"])
    trained = pipeline.train(cfg, snapshot, params, who)  # VTM_RUN_META once its MLflow run is open
    evaluated = pipeline.evaluate(cfg, snapshot, trained)
    progress.step("evaluate", **{k: round(v, 4) for k, v in evaluated["metrics"].items()})
    decision = pipeline.register(cfg, snapshot, trained, evaluated, who, params)  # --param auto_promote=true
    progress.step("register", **decision)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
