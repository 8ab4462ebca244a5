"""The tick importer on small vendor files written here: every bad-row kind, atomic idempotent
re-import, the bad-share limit, and UTC conversion."""

from __future__ import annotations

import gzip
import json
from datetime import UTC, date, datetime
from pathlib import Path

import polars as pl
import pytest

from common import config
from scripts.core.errors import DataValidationError
from scripts.tick import importer as tick_import
from scripts.tick import lake as tick_lake
from scripts.tick import pipeline as tick_pipeline

HEADER = "symbol,time,price,size,exchange,sale_condition,suspicious"
DAY = date(2013, 10, 8)
GOOD = [
    "IBM,2013-10-08 09:30:00.100,185.10,100,N,1,0",
    "IBM,2013-10-08 09:30:00.100,185.10,100,N,1,0",  # identical print in tape order: kept
    "IBM,2013-10-08 09:30:01.000,185.12,200,D,20000020,0",
    "IBM,2013-10-08 09:30:02.000,185.11,50,Q,20,0",
    "IBM,2013-10-08 09:30:03.000,185.13,300,P,1,0",
]
BAD = {
    "unparseable_price": "IBM,2013-10-08 09:30:03.100,abc,100,N,1,0",
    "non_positive_price": "IBM,2013-10-08 09:30:03.200,0,100,N,1,0",
    "non_positive_size": "IBM,2013-10-08 09:30:03.300,185.1,-5,N,1,0",
    "out_of_session": "IBM,2013-10-08 03:59:59.000,185.1,100,N,1,0",
    "out_of_order": "IBM,2013-10-08 09:30:00.500,185.1,100,N,1,0",
    "duplicate": "IBM,2013-10-08 09:30:01.000,185.12,200,D,20000020,0",  # re-sent: behind the tape
    "suspicious": "IBM,2013-10-08 09:30:04.000,185.2,100,N,1,1",
    "unparseable_suspicious": "IBM,2013-10-08 09:30:04.100,185.2,100,N,1,x",
}


def day_of(lake: str | Path, day: date = DAY, max_bad_share: float = 0.02) -> tick_pipeline.Day:
    """What tick_model_training's first task hands the steps after it, for ``day`` in ``lake``."""
    return tick_pipeline.start(config.get("tick_model_training"),
                               {"trade_date": day.isoformat(), "max_bad_share": max_bad_share}, lake=str(lake))


def write_csv(path: Path, rows: list[str], header: str = HEADER) -> Path:
    text = "\n".join([header, *rows]) + "\n"
    if path.suffix == ".gz":
        with gzip.open(path, "wt") as out:
            out.write(text)
    else:
        path.write_text(text)
    return path


def read_partition(lake: Path, day: date, symbol: str, name: str = tick_lake.PART_FILE) -> pl.DataFrame:
    return pl.read_parquet(lake / "trades" / f"date={day}" / f"symbol={symbol}" / name)


def test_every_bad_row_kind_is_quarantined_with_its_line_and_reason(tmp_path):
    source = write_csv(tmp_path / "ibm.csv.gz", GOOD + list(BAD.values()))
    (report,) = tick_import.import_files(str(tmp_path / "lake"), [source], max_bad_share=1.0)
    assert (report.rows_in, report.rows, report.bad_rows) == (len(GOOD) + len(BAD), len(GOOD), len(BAD))
    assert report.reasons == {reason: 1 for reason in BAD}
    quarantine = read_partition(tmp_path / "lake", DAY, "IBM", tick_lake.QUARANTINE_FILE)
    by_reason = {row["reason"]: row for row in quarantine.iter_rows(named=True)}
    for offset, reason in enumerate(BAD):
        assert by_reason[reason]["line"] == len(GOOD) + 2 + offset  # header is line 1
        assert by_reason[reason]["source"] == "ibm.csv.gz"
    good = read_partition(tmp_path / "lake", DAY, "IBM")
    assert good.columns == ["ts", "symbol", "price", "size", "exchange", "conditions", "suspicious"]
    assert str(good.schema["ts"]) == "Datetime(time_unit='ns', time_zone='UTC')"
    assert good["ts"].is_sorted() and good.height == len(GOOD)
    # 09:30 New York daylight time is 13:30 UTC.
    assert good["ts"][0].isoformat() == "2013-10-08T13:30:00.100000+00:00"
    manifest = json.loads((tmp_path / "lake/trades/date=2013-10-08/symbol=IBM/_manifest.json").read_text())
    assert manifest["bad_rows"] == len(BAD) and manifest["synthetic"] is False


def test_missing_column_names_file_line_and_field(tmp_path):
    source = write_csv(tmp_path / "broken.csv", GOOD, header="symbol,time,price,exchange,sale_condition,suspicious")
    with pytest.raises(DataValidationError, match=r"broken.csv, line 1, field 'size'"):
        tick_import.import_files(str(tmp_path / "lake"), [source])
    assert not (tmp_path / "lake").exists()  # nothing half-written


def many_rows(n: int, symbol: str = "IBM", day: date = DAY) -> list[str]:
    """``n`` valid trades of ``symbol`` in tape order, 50 ms apart from 09:30."""
    start = 9 * 3_600_000 + 30 * 60_000
    rows = []
    for i in range(n):
        ms = start + 50 * i
        stamp = f"{day} {ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"
        rows.append(f"{symbol},{stamp},{185 + (i % 7) / 100:.2f},{100 + i % 3 * 100},N,1,0")
    return rows


def test_unreadable_times_are_quarantined_and_the_rest_imported(tmp_path):
    """2 rows with unreadable times in 20,000: quarantined as unparseable_time in the partition of
    the row above them; the file is not refused."""
    rows = many_rows(20_000)
    rows[5_000] = "IBM,2013-10-08 25:61:00.000,185.10,100,N,1,0"
    rows[12_345] = "IBM,yesterday,185.1,100,N,1,0"
    source = write_csv(tmp_path / "ibm.csv", rows)
    (report,) = tick_import.import_files(str(tmp_path / "lake"), [source])
    assert (report.day, report.rows_in, report.rows, report.bad_rows) == ("2013-10-08", 20_000, 19_998, 2)
    assert report.reasons == {"unparseable_time": 2} and not report.over_limit
    quarantine = read_partition(tmp_path / "lake", DAY, "IBM", tick_lake.QUARANTINE_FILE)
    assert quarantine["line"].to_list() == [5_002, 12_347]  # header is line 1
    assert quarantine["time"][1] == "yesterday" and set(quarantine["reason"]) == {"unparseable_time"}
    assert read_partition(tmp_path / "lake", DAY, "IBM").height == 19_998
    assert tick_pipeline.validate(day_of(str(tmp_path / "lake"), DAY, 0.02))["trades"] == 19_998


def test_unreadable_time_goes_to_the_day_of_its_neighbours(tmp_path):
    """Several days and symbols in one file: the row joins its own symbol's day above it (below it
    when it is the symbol's first row)."""
    next_day = date(2013, 10, 9)
    rows = [*many_rows(3, "BAC"), "BAC,09:31,14.1,100,D,1,0",
            "IBM,,185.1,100,N,1,0", *many_rows(3, "IBM", next_day), *many_rows(2, "BAC", next_day)]
    reports = tick_import.import_files(str(tmp_path / "lake"), [write_csv(tmp_path / "m.csv", rows)],
                                       max_bad_share=1.0)
    bad = {(r.day, r.symbol): r.reasons for r in reports if r.bad_rows}
    assert bad == {("2013-10-08", "BAC"): {"unparseable_time": 1},
                   ("2013-10-09", "IBM"): {"unparseable_time": 1}}


def test_unreadable_time_with_no_day_to_take_fails_naming_the_line(tmp_path):
    """A symbol none of whose rows has a readable time: no partition to quarantine it in."""
    source = write_csv(tmp_path / "t.csv", [*GOOD, "AIG,yesterday,45.1,100,N,1,0"])
    with pytest.raises(DataValidationError, match=r"t.csv, line 7, field 'time': 1 row\(s\) with an "
                       r"unreadable time and no row of symbol 'AIG'"):
        tick_import.import_files(str(tmp_path / "lake"), [source])
    assert not (tmp_path / "lake").exists()


def test_unreadable_symbol_fails_naming_the_line(tmp_path):
    source = write_csv(tmp_path / "s.csv", [*GOOD, ",2013-10-08 09:30:04.000,185.1,100,N,1,0"])
    with pytest.raises(DataValidationError, match=r"s.csv, line 7, field 'symbol'"):
        tick_import.import_files(str(tmp_path / "lake"), [source])


@pytest.mark.parametrize("field, text, reason", [
    ("price", "inf", "unparseable_price"),
    ("price", "Infinity", "unparseable_price"),
    ("price", "1e309", "unparseable_price"),
    ("price", "-inf", "unparseable_price"),
    ("price", "nan", "unparseable_price"),
    ("price", "NaN", "unparseable_price"),
    ("price", "", "unparseable_price"),
    ("price", "-185.1", "non_positive_price"),
    ("price", "0.0", "non_positive_price"),
    ("price", "1e-400", "non_positive_price"),  # underflows to 0
    ("size", "inf", "unparseable_size"),
    ("size", "1e309", "unparseable_size"),
    ("size", "nan", "unparseable_size"),
    ("size", "100.5", "unparseable_size"),
    ("size", "0", "non_positive_size"),
    ("size", "-100", "non_positive_size"),
])
def test_non_finite_or_non_positive_price_and_size_are_quarantined(tmp_path, field, text, reason):
    fields = dict(zip(HEADER.split(","), "IBM,2013-10-08 09:30:04.000,185.2,100,N,1,0".split(","),
                      strict=True))
    fields[field] = text
    source = write_csv(tmp_path / "p.csv", [*GOOD, ",".join(fields.values())])
    (report,) = tick_import.import_files(str(tmp_path / "lake"), [source], max_bad_share=1.0)
    assert (report.rows, report.reasons) == (len(GOOD), {reason: 1})
    quarantine = read_partition(tmp_path / "lake", DAY, "IBM", tick_lake.QUARANTINE_FILE)
    assert (quarantine["line"][0], quarantine[field][0]) == (len(GOOD) + 2, text or None)
    good = read_partition(tmp_path / "lake", DAY, "IBM")
    assert good["price"].is_finite().all() and (good["price"] > 0).all() and (good["size"] > 0).all()


def test_reimport_replaces_never_duplicates(tmp_path):
    lake = tmp_path / "lake"
    source = write_csv(tmp_path / "day.csv", GOOD + [BAD["suspicious"]])
    first = tick_import.import_files(str(lake), [source])
    files_before = sorted(p.relative_to(lake) for p in lake.rglob("*") if p.is_file())
    second = tick_import.import_files(str(lake), [source])
    files_after = sorted(p.relative_to(lake) for p in lake.rglob("*") if p.is_file())
    assert files_before == files_after  # no second part file, no temporary left behind
    assert first[0].sha256 == second[0].sha256
    assert read_partition(lake, DAY, "IBM").height == len(GOOD)
    # A corrected delivery replaces the partition, and its stale quarantine goes.
    write_csv(source, GOOD[:3])
    (third,) = tick_import.import_files(str(lake), [source])
    assert third.rows == 3 and read_partition(lake, DAY, "IBM").height == 3
    assert not (lake / "trades/date=2013-10-08/symbol=IBM" / tick_lake.QUARANTINE_FILE).exists()
    success = json.loads((lake / "trades/date=2013-10-08/_SUCCESS").read_text())
    assert success["symbols"]["IBM"]["sha256"] == third.sha256


def test_days_and_symbols_are_split_into_partitions(tmp_path):
    rows = [*GOOD, "BAC,2013-10-08 10:00:00.000,14.1,100,D,1,0",
            "BAC,2013-10-09 10:00:00.000,14.2,100,D,1,0"]
    reports = tick_import.import_files(str(tmp_path / "lake"), [write_csv(tmp_path / "m.csv", rows)])
    assert sorted((r.day, r.symbol, r.rows) for r in reports) == [
        ("2013-10-08", "BAC", 1), ("2013-10-08", "IBM", 5), ("2013-10-09", "BAC", 1)]
    lake = tick_lake.Lake.open(str(tmp_path / "lake"))
    assert lake.days(tick_lake.TRADES) == [date(2013, 10, 8), date(2013, 10, 9)]


def test_partition_over_the_bad_share_limit_fails_validation(tmp_path, capsys):
    lake = str(tmp_path / "lake")
    source = write_csv(tmp_path / "bad.csv", GOOD + [BAD["non_positive_price"], BAD["out_of_session"]])
    exit_code = tick_import.main(["--lake", lake, "import", str(source), "--max-bad-share", "0.1"])
    assert exit_code == 1
    assert "date=2013-10-08/symbol=IBM: 28.57% of rows rejected" in capsys.readouterr().err
    with pytest.raises(DataValidationError, match=r"symbol=IBM: 2 of 7 rows \(28.57%\) were quarantined"):
        tick_pipeline.validate(day_of(lake, DAY, 0.1))
    assert tick_pipeline.validate(day_of(lake, DAY, 0.5))["trades"] == len(GOOD)


def test_validation_catches_a_partition_changed_after_import(tmp_path):
    lake = tmp_path / "lake"
    tick_import.import_files(str(lake), [write_csv(tmp_path / "d.csv", GOOD)])
    part = lake / "trades/date=2013-10-08/symbol=IBM" / tick_lake.PART_FILE
    frame = pl.read_parquet(part)
    frame.head(2).write_parquet(part)
    with pytest.raises(DataValidationError, match="content differs from its manifest"):
        tick_pipeline.validate(day_of(str(lake), DAY, 0.5))


@pytest.mark.parametrize("price", [float("inf"), float("nan"), -1.0])
def test_validation_refuses_prices_an_older_importer_let_through(tmp_path, price):
    """A partition with a consistent manifest whose values the importer now refuses (written by an
    older version): validate names the file, row and field instead of passing it to the features."""
    lake = tmp_path / "lake"
    tick_import.import_files(str(lake), [write_csv(tmp_path / "d.csv", GOOD)])
    folder = lake / "trades/date=2013-10-08/symbol=IBM"
    frame = pl.read_parquet(folder / tick_lake.PART_FILE)
    frame = frame.with_columns(pl.when(pl.int_range(pl.len()) == 2).then(price).otherwise(pl.col("price"))
                               .cast(frame.schema["price"]).alias("price"))
    data = tick_lake.parquet_bytes(frame)
    (folder / tick_lake.PART_FILE).write_bytes(data)
    manifest = json.loads((folder / tick_lake.MANIFEST_FILE).read_text())
    (folder / tick_lake.MANIFEST_FILE).write_text(json.dumps({**manifest, "sha256": tick_lake.sha256(data)}))
    with pytest.raises(DataValidationError, match=r"symbol=IBM/.*, field 'price': row 2: .* is not a finite number > 0"):
        tick_pipeline.validate(day_of(str(lake), DAY, 0.5))


def test_simulated_days_are_tagged_synthetic(tmp_path):
    lake = str(tmp_path / "lake")
    days = tick_import.seed(lake, mirror=None, simulate_start=date(2026, 1, 2), simulate_days=2)
    assert days == [date(2026, 1, 2), date(2026, 1, 5)]  # weekdays only
    validated = tick_pipeline.validate(day_of(lake, days[0], 0.02))
    assert validated["synthetic"] and validated["data_version"].startswith("synthetic-")
    assert validated["symbols"] == ["AIG", "BAC", "IBM", "SPY"]


def test_a_run_without_max_bad_share_uses_the_lakes_limit():
    """The CLI passes only the params given; the DAG's default is the lake's too (tests/dags)."""
    day = tick_pipeline.start(config.get("tick_model_training"), {"trade_date": "2013-10-08"}, lake="lake")
    assert day["max_bad_share"] == tick_lake.MAX_BAD_SHARE


def test_the_lake_refuses_a_partition_outside_its_schema(tmp_path):
    frame = pl.DataFrame({"ts": [1], "symbol": ["IBM"], "price": [1.0]})
    with pytest.raises(ValueError, match="trade partition columns"):
        tick_lake.Lake.open(str(tmp_path / "lake")).write_trades(DAY, "IBM", frame, frame.clear(),
                                                                 sources=[], synthetic=False)


def test_import_task_for_upstream_dags(tmp_path, monkeypatch):
    """``upstream.tick_import.import_trades``: what the user's upstream DAG runs (its callable,
    called here as the task runner would)."""
    from airflow.sdk.exceptions import AirflowFailException

    from upstream.tick_import import import_trades

    monkeypatch.setenv("TICK_LAKE", str(tmp_path / "lake"))
    reports = import_trades.function([str(write_csv(tmp_path / "good.csv", GOOD))])
    assert [(r["day"], r["symbol"], r["rows"]) for r in reports] == [("2013-10-08", "IBM", len(GOOD))]
    bad = write_csv(tmp_path / "bad.csv", GOOD + [BAD["non_positive_price"], BAD["out_of_session"]])
    with pytest.raises(AirflowFailException, match=r"date=2013-10-08/symbol=IBM 28.57%"):
        import_trades.function([str(bad)])


UPSTREAM_DAG = """
from datetime import UTC, datetime

from airflow.sdk import dag

from upstream.tick_import import import_trades


@dag(schedule=None, start_date=datetime(2013, 1, 1, tzinfo=UTC), catchup=False)
def {dag_id}():
    import_trades({files!r}, synthetic={synthetic!r})


{dag_id}()
"""


def upstream_bundle(folder: Path, dag_id: str, files: list[Path], dags_folder: Path | None = None,
                    synthetic: bool = False) -> str:
    """Write a user's minimal upstream DAG (the one in docs/tick_model_training.md) into ``folder``;
    returns the ``[dag_processor] dag_bundle_config_list`` that serves it beside the repository's
    dags/ (``dags_folder``, default: ``[core] dags_folder``) as a second DAG bundle."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{dag_id}.py").write_text(UPSTREAM_DAG.format(dag_id=dag_id, files=[str(f) for f in files],
                                                                   synthetic=synthetic))
    local = "airflow.dag_processing.bundles.local.LocalDagBundle"
    return json.dumps([{"name": "dags-folder", "classpath": local,
                        "kwargs": {"path": str(dags_folder)} if dags_folder else {}},
                       {"name": "upstream", "classpath": local, "kwargs": {"path": str(folder)}}])


def test_import_task_emits_one_asset_event_per_completed_day(airflow_db, tmp_path, monkeypatch):
    """A real upstream DAG run with ``dag.test()``: the importer task's success registers one
    ``tick_lake_trades`` event per trading day in its files, the day (and what it holds) in the
    extra - what starts ``tick_model_training`` for that day."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from sqlalchemy import select

    from upstream.tick_import import TRADES

    monkeypatch.setenv("TICK_LAKE", str(tmp_path / "lake"))
    next_day = [row.replace("2013-10-08", "2013-10-09") for row in GOOD]
    files = [write_csv(tmp_path / "monday.csv", GOOD),
             write_csv(tmp_path / "tuesday.csv", [*next_day, "MSFT,2013-10-09 09:30:00.500,33.10,100,N,1,0"])]
    bundles = upstream_bundle(tmp_path / "upstream", "upstream_trade_drop", files)
    monkeypatch.setenv("AIRFLOW__DAG_PROCESSOR__DAG_BUNDLE_CONFIG_LIST", bundles)
    upstream = DagBag(str(tmp_path / "upstream")).dags["upstream_trade_drop"]
    run = upstream.test(logical_date=datetime(2013, 10, 9, 22, tzinfo=UTC))
    assert run.state == "success"
    with create_session() as session:
        events = session.scalars(select(AssetEvent).where(AssetEvent.source_dag_id == upstream.dag_id,
                                                          AssetEvent.source_run_id == run.run_id)).all()
        got = sorted((e.asset.name, e.source_task_id, e.extra["day"], e.extra["symbols"], e.extra["trades"])
                     for e in events)
    assert TRADES.name == config.get("tick_model_training").trigger_asset == "tick_lake_trades"
    assert got == [("tick_lake_trades", "import_trades", "2013-10-08", ["IBM"], len(GOOD)),
                   ("tick_lake_trades", "import_trades", "2013-10-09", ["IBM", "MSFT"], len(GOOD) + 1)]


def test_a_run_started_by_asset_events_takes_their_day(tmp_path):
    """The tick DAG's first step: the triggering event's day beats the (absent) logical date; the
    newest of several; a ``trade_date`` param beats both; an event without a day fails; a day the
    event announced but the lake lacks is an error, not a six-hour wait."""
    from scripts.core.errors import ParameterError

    cfg = config.get("tick_model_training")
    lake = str(tmp_path / "lake")
    tick_import.import_files(lake, [write_csv(tmp_path / "good.csv", GOOD)])
    queued = datetime(2013, 10, 10, 1, tzinfo=UTC)  # an asset run's run_after: the next UTC day

    day = tick_pipeline.start(cfg, {}, logical_date=None, run_after=queued, lake=lake,
                              events=[{"day": "2013-10-08", "symbols": ["IBM"], "trades": 5}])
    assert day["day"] == "2013-10-08" and tick_pipeline.partition_ready(day, announced=True)
    several = [{"day": "2013-10-07"}, {"day": "2013-10-08"}, {"day": "2013-10-04"}]
    assert tick_pipeline.trade_day(cfg, {}, None, queued, several) == DAY
    assert tick_pipeline.trade_day(cfg, {"trade_date": "2013-10-04"}, None, queued, several) == date(2013, 10, 4)
    assert tick_pipeline.trade_day(cfg, {}, None, queued) == date(2013, 10, 10)  # no event: as before
    with pytest.raises(ParameterError, match="no trade day in its extra"):
        tick_pipeline.start(cfg, {}, run_after=queued, lake=lake, events=[{"note": "hello"}])

    announced = tick_pipeline.start(cfg, {}, run_after=queued, lake=lake, events=[{"day": "2013-10-09"}])
    assert tick_pipeline.partition_ready(announced) is False  # a scheduled run would wait
    with pytest.raises(DataValidationError, match="announced this trade day complete"):
        tick_pipeline.partition_ready(announced, announced=True)


def test_tick_schedule_is_its_weekday_time_or_the_importers_asset():
    """config.timetable(): Airflow's AssetOrTimeSchedule, the cron as a CronTriggerTimetable in
    New York time; the other workflows keep their plain cron (or none)."""
    from airflow.sdk import Asset, AssetOrTimeSchedule, CronTriggerTimetable

    cfg = config.get("tick_model_training")
    schedule = cfg.timetable()
    assert isinstance(schedule, AssetOrTimeSchedule)
    assert schedule.timetable == CronTriggerTimetable("30 17 * * 1-5", timezone="America/New_York")
    assert list(schedule.asset_condition.objects) == [Asset("tick_lake_trades")]
    assert config.get("power_lgbm_training").timetable() == config.get("power_lgbm_training").schedule


def test_backfill_still_makes_one_run_per_weekday_close():
    """What ``airflow backfill create`` iterates (the scheduler's copy of the DAG): the asset-or-time
    schedule is periodic through its cron, and yields the same 17:30 New York runs as the cron did."""
    from airflow.dag_processing.dagbag import DagBag
    from airflow.serialization.serialized_objects import DagSerialization

    dag = DagBag(str(Path(__file__).resolve().parents[1] / "dags")).dags["tick_model_training"]
    scheduler_dag = DagSerialization.deserialize_dag(DagSerialization.serialize_dag(dag))
    assert scheduler_dag.timetable.periodic
    infos = scheduler_dag.iter_dagrun_infos_between(datetime(2026, 1, 5, tzinfo=UTC), datetime(2026, 1, 12, tzinfo=UTC))
    assert [i.run_after.isoformat() for i in infos] == [
        f"2026-01-{d:02d}T22:30:00+00:00" for d in (5, 6, 7, 8, 9)]  # 17:30 EST, weekdays only
