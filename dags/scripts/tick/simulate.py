"""A trade simulator for tests and for ``make demo`` where no real trade files are given.

It writes the vendor CSV layout (``symbol,time,price,size,exchange,sale_condition,suspicious``,
New York wall time) and nothing else: the importer (``importer.import_simulated``, its ``simulate``
and ``seed`` commands) imports those files like real ones, flagged ``synthetic``, so the lake
manifests, the data version (``synthetic-...``) and the MLflow tags all say so.

What makes it realistic enough for the model to have something to learn:
- arrivals: a Poisson process with the U-shaped intraday intensity of US equities (busy open and
  close, quiet lunch), plus sparse pre-market and after-hours prints;
- volatility: per-minute log volatility follows a persistent AR(1) (volatility clusters, and the
  state carries over from one day to the next), times the intraday U-shape;
- microstructure: prices on a one-cent grid with bid-ask bounce, round-lot and odd-lot sizes,
  several venues and sale conditions, and a few vendor-flagged suspicious prints.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class SymbolSpec:
    symbol: str
    price: float
    trades_per_day: int
    daily_vol: float


DEFAULT_SYMBOLS = (
    SymbolSpec("SPY", 168.0, 40_000, 0.008),
    SymbolSpec("BAC", 14.0, 12_000, 0.015),
    SymbolSpec("AIG", 49.0, 6_000, 0.014),
    SymbolSpec("IBM", 185.0, 4_000, 0.011),
)
RTH_SECONDS = 6.5 * 3600
EXCHANGES, EXCHANGE_P = np.array(list("DQPZKNT")), np.array([.21, .19, .17, .15, .1, .1, .08])
CONDITIONS, CONDITION_P = np.array(["1", "20000020", "20", "2000"]), np.array([.52, .4, .05, .03])


def weekdays(start: date, count: int) -> list[date]:
    days, day = [], start
    while len(days) < count:
        if day.weekday() < 5:
            days.append(day)
        day += timedelta(days=1)
    return days


def _u_shape(u: np.ndarray) -> np.ndarray:
    """Relative intensity over the session (u in [0, 1]): about 3x at the open and close."""
    return 1.0 + 8.0 * (u - 0.5) ** 2


def simulate_symbol_day(rng: np.random.Generator, spec: SymbolSpec, day: date, log_vol: float,
                        log_price: float) -> tuple[dict[str, np.ndarray], float, float]:
    """One symbol's trades for one day; returns columns and the carried (log_vol, log_price)."""
    # Regular-hours arrival times by inverse-CDF sampling of the U-shaped intensity.
    grid = np.linspace(0.0, 1.0, 2001)
    cdf = np.concatenate([[0.0], np.cumsum(_u_shape(grid[1:]))])
    cdf /= cdf[-1]
    n = rng.poisson(spec.trades_per_day)
    rth = np.sort(np.interp(rng.random(n), cdf, grid)) * RTH_SECONDS + 9.5 * 3600
    pre = np.sort(rng.uniform(4 * 3600, 9.5 * 3600, max(1, n // 80)))
    post = np.sort(rng.uniform(16 * 3600, 20 * 3600, max(1, n // 100)))
    seconds = np.concatenate([pre, rth, post])
    # Log volatility = a daily level (persistent from day to day) + an intraday AR(1) component
    # with a half-life of about two hours: slow enough that 30-minute and day-so-far windows
    # carry information (as in real data), noisy enough that the last 5 minutes alone do not.
    mean = np.log(spec.daily_vol / np.sqrt(390))
    log_vol = mean + 0.8 * (log_vol - mean) + 0.15 * rng.standard_normal()  # today's level
    intraday = np.empty(24 * 60)
    state = 0.0
    for m in range(intraday.size):  # 1,440 steps: cheap
        state = 0.995 * state + 0.035 * rng.standard_normal()
        intraday[m] = state
    minutes = np.arange(intraday.size)
    vols = log_vol + intraday
    u = np.clip((minutes - 570) / 390.0, 0, 1)
    sigma_min = np.exp(vols) * np.sqrt(_u_shape(u) / 1.67)
    sigma = sigma_min[(seconds // 60).astype(int)] * np.sqrt(np.diff(seconds, prepend=seconds[0]) / 60)
    path = log_price + np.cumsum(sigma * rng.standard_normal(seconds.size))
    half_spread = 0.005 if spec.price < 100 else 0.01
    price = np.round(np.exp(path) + rng.choice([-half_spread, half_spread], seconds.size), 2)
    odd = rng.random(seconds.size) < 0.2
    size = np.where(odd, rng.integers(1, 100, seconds.size), 100 * rng.geometric(0.45, seconds.size))
    columns = {
        "seconds": seconds, "price": price, "size": size,
        "exchange": rng.choice(EXCHANGES, seconds.size, p=EXCHANGE_P),
        "sale_condition": rng.choice(CONDITIONS, seconds.size, p=CONDITION_P),
        "suspicious": (rng.random(seconds.size) < 2e-4).astype(np.int64),
    }
    return columns, log_vol, float(path[-1])


def write_vendor_files(folder: Path, start: date, days: int, seed: int = 7,
                       symbols: tuple[SymbolSpec, ...] = DEFAULT_SYMBOLS) -> list[Path]:
    """One ``synthetic_trades_<day>.csv.gz`` per weekday, in the vendor layout."""
    import polars as pl

    rng = np.random.default_rng(seed)
    state = {s.symbol: (np.log(s.daily_vol / np.sqrt(390)), np.log(s.price)) for s in symbols}
    files = []
    for day in weekdays(start, days):
        frames = []
        for spec in symbols:
            cols, log_vol, log_price = simulate_symbol_day(rng, spec, day, *state[spec.symbol])
            state[spec.symbol] = (log_vol, log_price)
            wall = np.datetime64(day.isoformat(), "ms") + (cols["seconds"] * 1000).astype("timedelta64[ms]")
            frames.append(pl.DataFrame({
                "symbol": spec.symbol, "time": wall,
                "price": cols["price"], "size": cols["size"], "exchange": cols["exchange"],
                "sale_condition": cols["sale_condition"], "suspicious": cols["suspicious"],
            }))
        frame = pl.concat(frames).with_columns(pl.col("time").dt.strftime("%Y-%m-%d %H:%M:%S%.3f"))
        path = folder / f"synthetic_trades_{day.isoformat()}.csv.gz"
        with gzip.GzipFile(path, "wb", mtime=0) as out:  # mtime 0: same seed, same bytes
            frame.write_csv(out)
        files.append(path)
    return files

