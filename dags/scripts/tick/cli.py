"""The tick workflow for one day without Airflow: every step of ``tick_model_training`` in one
process, against the configured MLflow server, with the same config, parameters and gate.

    python -m scripts.tick.cli --day 2013-10-09 [--lake L] [--param key=value ...]   # from dags/

``--lake`` defaults to ``TICK_LAKE``; ``--param`` takes any run parameter of the DAG
(``max_bad_share`` and the model's, e.g. ``train_days=10``), checked before any work. Prints the
steps' results as JSON. Trades are imported with ``python -m scripts.tick.importer``.
"""

from __future__ import annotations

import argparse
import json
import logging
from datetime import UTC, date, datetime

from common import config
from common.mlflow_utils import AirflowIdentity
from scripts.tick import pipeline

DAG_ID = "tick_model_training"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the tick workflow's steps for one day.")
    parser.add_argument("--day", type=date.fromisoformat, required=True)
    parser.add_argument("--lake", default=None, help="lake root (path or s3://); default: TICK_LAKE")
    parser.add_argument("--param", action="append", default=[], help="key=value run parameter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    cfg = config.get(DAG_ID)
    params = dict(p.split("=", 1) for p in args.param)
    params["trade_date"] = args.day.isoformat()
    day = pipeline.start(cfg, params, lake=args.lake)  # fail fast on a typo or a bad value
    who = AirflowIdentity(cfg.dag_id, f"cli__{datetime.now(UTC):%Y%m%dT%H%M%S}", "cli")
    validated = pipeline.validate(day)
    built = pipeline.build_features(validated)
    trained = pipeline.train(cfg, built, params, who)
    evaluated = pipeline.evaluate(cfg, built, trained)
    decision = pipeline.register(cfg, validated, trained, evaluated, who, params)
    print(json.dumps({"validated": validated, "built": built, "metrics": evaluated["metrics"],
                      "decision": decision}, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
