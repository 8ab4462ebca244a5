"""The tick importer as an Airflow task, for the user's upstream DAG that feeds ``tick_model_training``.

This repository's ``tick_model_training`` never writes trades; whatever delivers them (a vendor
drop, a lakehouse job) runs the importer. In the upstream DAG::

    from upstream.tick_import import import_trades

    import_trades(["/data/drops/trades_2013-10-09.csv.gz"])

The task validates and writes the partitions (``scripts.tick.importer``) and fails, naming them,
when a partition's bad-row share passes the lake's limit (``scripts.tick.lake.MAX_BAD_SHARE``, the
default of the training DAG's ``max_bad_share``); the training run for that day then fails its own
validation too, so nothing is trained on it.
"""

from __future__ import annotations

from airflow.sdk import task


@task(queue="realtime_queue", pool="high_priority_cpu")
def import_trades(files: list[str], synthetic: bool = False) -> list[dict]:
    """Import vendor trade files into the lake at ``TICK_LAKE``; returns one report per partition."""
    from pathlib import Path

    from common.alerts import permanent_errors_fail_fast
    from scripts.core import paths
    from scripts.core.errors import DataValidationError
    from scripts.tick import importer

    with permanent_errors_fail_fast():  # a bad file stays bad: no retries
        reports = importer.import_files(paths.tick_lake(), [Path(f) for f in files], synthetic=synthetic)
        if over := [r for r in reports if r.over_limit]:
            raise DataValidationError(", ".join(files), "partitions over the bad-row limit: "
                                      + "; ".join(f"date={r.day}/symbol={r.symbol} {r.bad_share:.2%} "
                                                  f"{r.reasons}" for r in over))
    return [r.to_dict() for r in reports]
