"""The tick importer on small vendor files written here: every bad-row kind, atomic idempotent
re-import, the bad-share limit, and UTC conversion."""

from __future__ import annotations

import gzip
import json
from datetime import date
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
