"""Importer: vendor trade files -> validated trade partitions in the tick lake.

This is what the upstream lakehouse pipeline (or a person, or ``make demo``) runs; the training
DAG never writes trades, it waits for them. Input: CSV files (plain or ``.gz``) with the header
``symbol,time,price,size,exchange,sale_condition,suspicious`` and ``time`` in exchange-local
America/New_York wall time (the AlgoSeek layout of ``DATA_MIRROR/ticks``).

Every row is checked; a bad row is not dropped silently but kept, with its file, line and reason,
in ``_quarantine.parquet`` beside its partition. Reasons:

``unparseable_<field>``  a value that is not a time, a finite number (``nan``, ``inf``,
                         ``Infinity``, ``1e309`` are not), a whole number for ``size``, or a 0/1
                         flag. A row whose time cannot be read has no day of its own: it is
                         quarantined in the partition of the nearest readable row of its symbol
                         above it in the same file (below it, for the first rows).
``non_positive_price`` / ``non_positive_size``
``out_of_session``       outside 04:00-20:00 New York (pre-market to after-hours) or on a weekend
``out_of_order``         earlier than a trade already seen for the symbol that day
``duplicate``            an out-of-order row identical to one already seen (a re-sent block).
                         Identical rows in tape order stay: this layout has no trade id, and one
                         order filling several resting orders prints the same ms/price/size
                         several times (a quarter of the real rows).
``suspicious``           flagged by the vendor

Each (day, symbol) partition is replaced whole on re-import (same file names), and the day's
``_SUCCESS`` is rewritten last (``Lake.write_trades`` and ``Lake.mark_day_complete``: the
partition contract, its schema version and the default bad-row limit live in ``lake``). A
partition whose bad share exceeds ``--max-bad-share`` is still written, for inspection, but its
manifest says so, the importer exits 1, and the training DAG's validation fails on it before
anything downstream is written. Simulated days (``scripts.tick.simulate``, which knows nothing of
the importer) come in through the same path, flagged synthetic.

CLI (from ``dags/``)::

    python -m scripts.tick.importer --lake LAKE import FILE [FILE ...] [--synthetic]
    python -m scripts.tick.importer --lake LAKE simulate --start 2026-01-05 --days 3
    python -m scripts.tick.importer --lake LAKE seed [--mirror DIR]   # mirror ticks, else simulated
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from datetime import date
from pathlib import Path

from scripts.core import paths
from scripts.core.errors import DataValidationError
from scripts.tick import simulate
from scripts.tick.lake import MAX_BAD_SHARE, Lake, PartitionReport

VENDOR_COLUMNS = ("symbol", "time", "price", "size", "exchange", "sale_condition", "suspicious")
EXCHANGE_TZ = "America/New_York"
SESSION_START, SESSION_END = (4, 0), (20, 0)  # pre-market open to after-hours close, New York


def read_vendor_csv(path: Path):
    """All columns as text, plus ``source`` and ``line`` (1-based, header = line 1)."""
    import gzip

    import polars as pl

    try:
        with open(path, "rb") as probe:
            opener = gzip.open if probe.read(2) == b"\x1f\x8b" else open
        with opener(path, "rt", encoding="utf-8") as handle:
            header = handle.readline().strip().split(",")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataValidationError(path, f"cannot read the file: {exc}") from None
    missing = [c for c in VENDOR_COLUMNS if c not in header]
    if missing:
        raise DataValidationError(path, f"header lacks {missing}; expected {','.join(VENDOR_COLUMNS)}",
                                  line=1, field=missing[0])
    try:
        frame = pl.read_csv(path, infer_schema=False, has_header=True)
    except Exception as exc:  # noqa: BLE001 - polars raises several types for broken files
        raise DataValidationError(path, f"not a readable CSV file: {exc}") from None
    return frame.select(VENDOR_COLUMNS).with_columns(
        source=pl.lit(Path(path).name), line=pl.int_range(2, pl.len() + 2, dtype=pl.Int64))


def classify(raw):
    """Parse the text columns and give each row a ``reason`` (null = valid). Order is kept."""
    import polars as pl

    local = pl.col("time").str.strip_chars().str.to_datetime("%Y-%m-%d %H:%M:%S%.f", strict=False)
    parsed = raw.with_columns(
        local_time=local,
        price_v=pl.col("price").str.strip_chars().cast(pl.Float64, strict=False),
        size_v=pl.col("size").str.strip_chars().cast(pl.Int64, strict=False),
        suspicious_v=pl.col("suspicious").str.strip_chars().replace_strict(
            {"0": False, "1": True}, default=None, return_dtype=pl.Boolean),
    ).with_columns(
        ts=pl.col("local_time").dt.replace_time_zone(EXCHANGE_TZ, ambiguous="earliest",
                                                     non_existent="null")
        .dt.convert_time_zone("UTC").dt.cast_time_unit("ns"),
        day=pl.col("local_time").dt.date(),
    )
    minutes = pl.col("local_time").dt.hour().cast(pl.Int32) * 60 + pl.col("local_time").dt.minute()
    in_session = ((minutes >= SESSION_START[0] * 60 + SESSION_START[1])
                  & (minutes < SESSION_END[0] * 60 + SESSION_END[1])
                  & (pl.col("local_time").dt.weekday() <= 5))
    group = ["symbol", "day"]
    seen_max = pl.col("ts").cum_max().shift(1).over(group)
    repeated = ~pl.struct(list(VENDOR_COLUMNS)).is_first_distinct()
    reason = (
        pl.when(pl.col("symbol").is_null() | (pl.col("symbol").str.strip_chars() == ""))
        .then(pl.lit("unparseable_symbol"))
        .when(pl.col("ts").is_null()).then(pl.lit("unparseable_time"))
        .when(pl.col("price_v").is_null() | ~pl.col("price_v").is_finite())
        .then(pl.lit("unparseable_price"))
        .when(pl.col("size_v").is_null()).then(pl.lit("unparseable_size"))
        .when(pl.col("suspicious_v").is_null()).then(pl.lit("unparseable_suspicious"))
        .when(pl.col("price_v") <= 0).then(pl.lit("non_positive_price"))
        .when(pl.col("size_v") <= 0).then(pl.lit("non_positive_size"))
        .when(~in_session).then(pl.lit("out_of_session"))
        .when((pl.col("ts") < seen_max) & repeated).then(pl.lit("duplicate"))
        .when(pl.col("ts") < seen_max).then(pl.lit("out_of_order"))
        .when(pl.col("suspicious_v")).then(pl.lit("suspicious"))
        .otherwise(pl.lit(None, dtype=pl.Utf8))
    )
    return parsed.with_columns(reason=reason)


def attribute_unreadable_times(rows):
    """Give each row whose time cannot be read (reason ``unparseable_time``, no day) the day of the
    nearest readable row of its symbol above it in its file, else below it: a vendor file is one
    tape in time order, so that is the partition the row came from. The row stays quarantined; it
    only needs a partition to be quarantined in (and to count in that partition's bad share)."""
    import polars as pl

    return rows.with_columns(
        day=pl.col("day").forward_fill().backward_fill().over(["file_no", "symbol"]))


def to_lake_schema(good):
    """Valid rows as the lake's trade columns (``lake.TRADE_COLUMNS``): ts (UTC, ns), symbol,
    price, size, exchange, conditions, suspicious; in time order."""
    import polars as pl

    return good.select(
        pl.col("ts"), pl.col("symbol"), pl.col("price_v").alias("price"), pl.col("size_v").alias("size"),
        pl.col("exchange"), pl.col("sale_condition").alias("conditions"),
        pl.col("suspicious_v").alias("suspicious"),
    ).sort("ts", maintain_order=True)


def import_files(lake_uri: str, files: Sequence[Path], *, synthetic: bool = False,
                 max_bad_share: float = MAX_BAD_SHARE) -> list[PartitionReport]:
    """Validate ``files`` and write one partition per (day, symbol) they contain."""
    import polars as pl

    if not files:
        raise ValueError("no trade files given")
    raw = pl.concat([read_vendor_csv(Path(f)).with_columns(file_no=pl.lit(i, dtype=pl.Int32))
                     for i, f in enumerate(files)], how="vertical")
    rows = attribute_unreadable_times(classify(raw))
    # Rows whose symbol cannot be read, or whose day cannot be inferred, belong to no partition:
    # they can only fail loudly.
    orphans = rows.filter(pl.col("day").is_null() | (pl.col("reason") == "unparseable_symbol"))
    if orphans.height:
        first = orphans.row(0, named=True)
        if first["reason"] == "unparseable_symbol":
            raise DataValidationError(first["source"], f"{orphans.height} row(s) without a readable "
                                      f"symbol, e.g. {first['symbol']!r},{first['time']!r}",
                                      line=first["line"], field="symbol")
        raise DataValidationError(first["source"], f"{orphans.height} row(s) with an unreadable time "
                                  f"and no row of symbol {first['symbol']!r} with a readable time in "
                                  f"the file to take the day from, e.g. {first['time']!r}",
                                  line=first["line"], field="time")
    lake = Lake.open(lake_uri)
    reports = []
    for (day, symbol), part in rows.group_by(["day", "symbol"], maintain_order=True):
        good = to_lake_schema(part.filter(pl.col("reason").is_null()))
        quarantined = part.filter(pl.col("reason").is_not_null()).select(
            "source", "line", *VENDOR_COLUMNS, "reason")
        reports.append(lake.write_trades(day, symbol, good, quarantined, synthetic=synthetic,
                                         sources=sorted(set(part["source"].to_list())),
                                         max_bad_share=max_bad_share))
    for day in sorted({r.day for r in reports}):
        lake.mark_day_complete(date.fromisoformat(day))
    return reports


def import_simulated(lake_uri: str, start: date, days: int, seed: int = 7,
                     symbols: tuple[simulate.SymbolSpec, ...] = simulate.DEFAULT_SYMBOLS,
                     ) -> list[PartitionReport]:
    """Simulate ``days`` weekdays from ``start`` (``scripts.tick.simulate``) and import them like
    vendor files, flagged synthetic."""
    with tempfile.TemporaryDirectory(prefix="vtm-sim-") as tmp:
        files = simulate.write_vendor_files(Path(tmp), start, days, seed, symbols)
        return import_files(lake_uri, files, synthetic=True)


def seed(lake_uri: str, mirror: Path | None, simulate_start: date = date(2026, 1, 5),
         simulate_days: int = 4) -> list[date]:
    """Fill a lake for a demo or test: the mirror's real trade files if any, else simulated days."""
    files = sorted((mirror / "ticks").glob("*.csv*")) if mirror and (mirror / "ticks").is_dir() else []
    if files:
        reports = import_files(lake_uri, files)
    else:
        reports = import_simulated(lake_uri, simulate_start, simulate_days)
    return sorted({date.fromisoformat(r.day) for r in reports})


def _print_reports(reports: list[PartitionReport]) -> int:
    over = [r for r in reports if r.over_limit]
    for r in reports:
        print(json.dumps({k: v for k, v in r.to_dict().items() if k != "sha256"}), flush=True)
    for r in over:
        print(f"ERROR: partition date={r.day}/symbol={r.symbol}: {r.bad_share:.2%} of rows rejected "
              f"(limit {r.max_bad_share:.2%}): {r.reasons}", file=sys.stderr)
    return 1 if over else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Import trade files into the tick lake.")
    parser.add_argument("--lake", default=str(paths.tick_lake()), help="lake root (path or s3://)")
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="validate and import vendor CSV files")
    imp.add_argument("files", nargs="+", type=Path)
    imp.add_argument("--synthetic", action="store_true", help="the files are simulated, not real")
    imp.add_argument("--max-bad-share", type=float, default=MAX_BAD_SHARE)
    sim = sub.add_parser("simulate", help="import simulated trading days")
    sim.add_argument("--start", type=date.fromisoformat, required=True)
    sim.add_argument("--days", type=int, default=4)
    sim.add_argument("--seed", type=int, default=7)
    sd = sub.add_parser("seed", help="mirror trades when DATA_MIRROR has them, else simulated days")
    sd.add_argument("--mirror", type=Path, default=paths.data_mirror())
    args = parser.parse_args(argv)
    try:
        if args.command == "import":
            return _print_reports(import_files(args.lake, args.files, synthetic=args.synthetic,
                                               max_bad_share=args.max_bad_share))
        if args.command == "simulate":
            return _print_reports(import_simulated(args.lake, args.start, args.days, args.seed))
        print(json.dumps([d.isoformat() for d in seed(args.lake, args.mirror)]))
        return 0
    except DataValidationError as exc:
        print(f"ERROR: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
