"""The tick importer as an Airflow task, for the user's upstream DAG that feeds ``tick_model_training``.

This repository's ``tick_model_training`` never writes trades; whatever delivers them (a vendor
drop, a lakehouse job) runs the importer. In the upstream DAG::

    from upstream.tick_import import import_trades

    import_trades(["/data/drops/trades_2013-10-09.csv.gz"])

The task validates and writes the partitions (``scripts.tick.importer``) and fails, naming them,
when a partition's bad-row share passes the lake's limit (``scripts.tick.lake.MAX_BAD_SHARE``, the
default of the training DAG's ``max_bad_share``); the training run for that day then fails its own
validation too, so nothing is trained on it.

When it succeeds it emits one event of the Asset ``tick_lake_trades`` (``TRADES``, the training
workflow's ``trigger_asset``) per trading day it completed, the day in the event's extra
(``{"day": "2013-10-09", "symbols": [...], "trades": N}``): ``tick_model_training`` is scheduled on
that Asset or its weekday time, whichever comes first, and a run the event starts trains on that
day at once, without waiting for the partition. Several events in one task (a file holding several
days) go out through the alias ``DAY_EVENTS``: Airflow merges the events a task emits for one Asset
directly into one, and an alias keeps one event per distinct extra. A failed import emits nothing
(Airflow registers outlet events on success only); the weekday schedule still runs those days.
"""

from __future__ import annotations

from airflow.sdk import Asset, AssetAlias, task

from common import config

TRADES = Asset(config.get("tick_model_training").trigger_asset)
DAY_EVENTS = AssetAlias(f"{TRADES.name}_days")


def day_events(reports: list[dict]) -> list[dict]:
    """One event extra per completed day of the import's partition reports, in day order."""
    days: dict[str, dict] = {}
    for report in sorted(reports, key=lambda r: (r["day"], r["symbol"])):
        event = days.setdefault(report["day"], {"day": report["day"], "symbols": [], "trades": 0})
        event["symbols"].append(report["symbol"])
        event["trades"] += report["rows"]
    return list(days.values())


@task(queue="realtime_queue", pool="high_priority_cpu", outlets=[DAY_EVENTS])
def import_trades(files: list[str], synthetic: bool = False, **context) -> list[dict]:
    """Import vendor trade files into the lake at ``TICK_LAKE``; returns one report per partition,
    and emits one ``tick_lake_trades`` event per completed day."""
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
    result = [r.to_dict() for r in reports]
    if (outlet_events := context.get("outlet_events")) is not None:  # absent when called bare
        for extra in day_events(result):
            outlet_events[DAY_EVENTS].add(TRADES, extra=extra)
    return result
