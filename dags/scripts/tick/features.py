"""One-minute bars and volatility features per symbol, one feature partition per trading day.

Engine: Polars. Each trade partition holds one symbol in time order, so every step is a linear,
vectorised pass over columns (no per-row Python, no group hashing over the tape); a row-wise pandas
loop is about two orders of magnitude slower. ``bench/tick_bench.py`` prints the throughput.

Per symbol and regular-hours minute (09:30-16:00 New York, 390 bars, empty minutes kept), known
at the end of that minute:

- ``rv``: realized variance of the minute, the sum of squared 10-second log returns (sampling at
  10 s rather than every tick keeps bid-ask bounce from swamping the estimate);
- HAR-style windows ``log_rv_5``, ``log_rv_30``, ``log_rv_day`` (day so far), each scaled to a
  5-minute horizon before the log, so they are comparable with the target;
- returns ``ret_1``, ``ret_5``; ``log_volume_5``, ``log_trades_5``; ``imbalance_5``, the signed
  volume share by the tick rule (a trade above the last different price is a buy);
- ``minute`` of the session (intraday seasonality).

Target ``target_log_rv``: log realized variance of the next 5 minutes (null for the last five bars
of the day). Rebuilding a day from the same trades gives byte-identical Parquet.
"""

from __future__ import annotations

import io
import time
from dataclasses import dataclass
from datetime import date

from scripts.core import threads
from scripts.core.errors import DataValidationError
from scripts.tick import lake as tick_lake
from scripts.tick.lake import Lake

EXCHANGE_TZ = "America/New_York"
OPEN_MINUTE, SESSION_MINUTES = 9 * 60 + 30, 390
SAMPLE_SECONDS = 10
HORIZON = 5  # minutes ahead the target covers
EPS = 1e-12  # floor under a variance before its log (an untraded window has zero variance)
FEATURES = ("log_rv_1", "log_rv_5", "log_rv_30", "log_rv_day", "ret_1", "ret_5", "log_volume_5",
            "log_trades_5", "imbalance_5", "minute")
TARGET = "target_log_rv"
FEATURE_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class BuildResult:
    day: str
    uri: str
    rows: int
    trades: int
    seconds: float
    sha256: str
    data_version: str
    synthetic: bool

    @property
    def trades_per_second(self) -> float:
        return self.trades / self.seconds if self.seconds > 0 else float("inf")


def symbol_bars(trades, day: date):
    """Minute bars and features of one symbol's trades (the lake schema, time-ordered)."""
    import polars as pl

    # Integer arithmetic on epoch nanoseconds instead of per-row time-zone conversion: New York's
    # UTC offset cannot change during a session (DST switches at 02:00 on a Sunday).
    epoch_ns = pl.col("ts").dt.epoch("ns")
    local_ns = epoch_ns + utc_offset_ns(day)
    minute_of_day = ((local_ns // 60_000_000_000) % 1440).cast(pl.Int32)
    # The tape is time-ordered, so minutes are sorted: flagging that makes the group-bys below
    # slice contiguous runs and sum each run in order - deterministic floats, byte-identical output
    # (a hash group-by splits groups across threads and sums in a varying order).
    rth = trades.lazy().select("ts", "price", "size").with_columns(
        minute=(minute_of_day - OPEN_MINUTE)).filter(
        (pl.col("minute") >= 0) & (pl.col("minute") < SESSION_MINUTES)).with_columns(
        pl.col("minute").set_sorted())
    price_change = pl.col("price").diff()
    tick_sign = pl.when(price_change > 0).then(1).when(price_change < 0).then(-1).otherwise(None)
    sample = epoch_ns // (SAMPLE_SECONDS * 1_000_000_000)
    ticks = rth.with_columns(
        sign=tick_sign.forward_fill().fill_null(0).cast(pl.Int64),
        last_in_sample=sample != sample.shift(-1).fill_null(-1),
    )
    # Squared 10-second log returns, each credited to the minute its sample ends in.
    sampled = ticks.filter(pl.col("last_in_sample")).select(
        "minute", sq_ret=pl.col("price").log().diff().pow(2).fill_null(0.0))
    rv = sampled.group_by("minute").agg(rv=pl.col("sq_ret").sum())
    bars = ticks.group_by("minute").agg(
        close=pl.col("price").last(), volume=pl.col("size").sum(), trades=pl.len(),
        signed_volume=(pl.col("sign") * pl.col("size")).sum())
    grid = pl.LazyFrame({"minute": pl.int_range(0, SESSION_MINUTES, eager=True, dtype=pl.Int32)})
    frame = (grid.join(bars, on="minute", how="left").join(rv, on="minute", how="left")
             .sort("minute")
             .with_columns(pl.col("close").forward_fill().backward_fill(),
                           pl.col("volume", "trades", "signed_volume").fill_null(0),
                           pl.col("rv").fill_null(0.0)))

    def log_var(expr: pl.Expr) -> pl.Expr:
        return (expr + EPS).log()

    elapsed = pl.col("minute").cast(pl.Float64) + 1
    future = pl.col("rv").reverse().rolling_sum(HORIZON, min_samples=1).reverse().shift(-1)
    volume_5 = pl.col("volume").rolling_sum(5, min_samples=1)
    return frame.with_columns(
        log_rv_1=log_var(pl.col("rv") * HORIZON),
        log_rv_5=log_var(pl.col("rv").rolling_sum(5, min_samples=1) * HORIZON / elapsed.clip(upper_bound=5)),
        log_rv_30=log_var(pl.col("rv").rolling_sum(30, min_samples=1) * HORIZON / elapsed.clip(upper_bound=30)),
        log_rv_day=log_var(pl.col("rv").cum_sum() * HORIZON / elapsed),
        ret_1=pl.col("close").log().diff().fill_null(0.0),
        ret_5=(pl.col("close").log() - pl.col("close").log().shift(5)).fill_null(0.0),
        log_volume_5=volume_5.cast(pl.Float64).log1p(),
        log_trades_5=pl.col("trades").rolling_sum(5, min_samples=1).cast(pl.Float64).log1p(),
        imbalance_5=(pl.col("signed_volume").rolling_sum(5, min_samples=1)
                     / volume_5.clip(lower_bound=1)).cast(pl.Float64),
        target_log_rv=pl.when(pl.col("minute") < SESSION_MINUTES - HORIZON).then(log_var(future)),
    ).with_columns(
        date=pl.lit(day), symbol=pl.lit(trades["symbol"][0] if trades.height else ""),
        minute=pl.col("minute").cast(pl.Int32),
    ).select("date", "symbol", "minute", "close", "volume", "trades", "signed_volume", "rv",
             *[c for c in FEATURES if c != "minute"], TARGET)


def utc_offset_ns(day: date) -> int:
    """New York's UTC offset at noon of ``day``, in nanoseconds (negative: behind UTC)."""
    from datetime import datetime
    from zoneinfo import ZoneInfo

    offset = datetime(day.year, day.month, day.day, 12, tzinfo=ZoneInfo(EXCHANGE_TZ)).utcoffset()
    return int(offset.total_seconds()) * 1_000_000_000


def read_trades(lake: Lake, day: date, symbol: str):
    """The columns the features use (text columns are not decoded: half the read time)."""
    import polars as pl
    import pyarrow.parquet as pq

    path = f"{lake.trade_dir(day, symbol)}/{tick_lake.PART_FILE}"
    handle = io.BytesIO(lake.read_bytes(path))
    missing = tick_lake.TRADE_COLUMNS - set(pq.read_schema(handle).names)
    if missing:
        raise DataValidationError(lake.display(path), f"trade partition lacks columns {sorted(missing)}",
                                  field=sorted(missing)[0])
    handle.seek(0)
    return pl.read_parquet(handle, columns=["ts", "symbol", "price", "size"])


def day_features(lake: Lake, day: date):
    """Features of every symbol of ``day`` (sorted by symbol, minute) and the trades read."""
    import polars as pl

    frames, trades = [], 0
    tapes = [read_trades(lake, day, symbol) for symbol in lake.symbols(day)]
    for tape in tapes:
        trades += tape.height
        if tape.height:
            frames.append(symbol_bars(tape, day))
    if not frames:
        raise DataValidationError(lake.display(lake.day_dir(tick_lake.TRADES, day)),
                                  "no trades in any symbol partition")
    return pl.concat(pl.collect_all(frames)), trades


def _warm_up(day: date) -> None:
    """Start Polars' thread pool and plan cache on a few rows, so the timing below measures the
    feature build, not the engine's one-off start in a fresh task process."""
    import polars as pl

    ts = pl.Series("ts", [0, 1_000_000_000], dtype=pl.Datetime("ns", "UTC"))
    symbol_bars(pl.DataFrame({"ts": ts, "symbol": ["X", "X"], "price": [1.0, 1.01], "size": [1, 1]}),
                day).collect()


def build_day(lake_uri: str, day: date) -> BuildResult:
    """(Re)build the feature partition of ``day`` from its trade partitions; atomic, idempotent."""
    threads.apply()  # before Polars loads (POLARS_MAX_THREADS is read once, at import)
    lake = Lake.open(lake_uri)
    if not lake.day_ready(day):
        raise DataValidationError(lake.display(lake.day_dir(tick_lake.TRADES, day)),
                                  f"trades of {day} are not complete (no {tick_lake.SUCCESS_FILE})")
    _warm_up(day)
    started = time.perf_counter()
    features, trades = day_features(lake, day)
    seconds = time.perf_counter() - started
    data = tick_lake.parquet_bytes(features)
    success = lake.read_json(f"{lake.day_dir(tick_lake.TRADES, day)}/{tick_lake.SUCCESS_FILE}")
    synthetic = any(s["synthetic"] for s in success["symbols"].values())
    version = tick_lake.version_of([(s, v["sha256"]) for s, v in success["symbols"].items()], synthetic)
    folder = lake.day_dir(tick_lake.FEATURES, day)
    lake.write_bytes(f"{folder}/{tick_lake.PART_FILE}", data)
    sha = tick_lake.sha256(data)
    lake.write_json(f"{folder}/{tick_lake.MANIFEST_FILE}", {
        "date": day.isoformat(), "rows": features.height, "trades": trades, "sha256": sha,
        "trades_version": version, "synthetic": synthetic, "schema_version": FEATURE_SCHEMA_VERSION})
    return BuildResult(day.isoformat(), lake.display(f"{folder}/{tick_lake.PART_FILE}"), features.height,
                       trades, seconds, sha, version, synthetic)


def load_features(lake: Lake, days: list[date]):
    """The feature partitions of ``days`` as one frame (each must exist)."""
    import polars as pl

    frames = []
    for day in days:
        path = f"{lake.day_dir(tick_lake.FEATURES, day)}/{tick_lake.PART_FILE}"
        if not lake.exists(path):
            raise DataValidationError(lake.display(path), "feature partition missing; build it first")
        frames.append(pl.read_parquet(io.BytesIO(lake.read_bytes(path))))
    return pl.concat(frames)
