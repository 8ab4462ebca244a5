"""Day-ahead forecast of household power: features, LightGBM fit, walk-forward evaluation.

Pure core, no MLflow or Airflow: importable anywhere (a notebook, a benchmark, the GPU box).

The task: at midnight before day ``d`` forecast the 24 hourly means of ``Global_active_power`` (kW)
of day ``d``. A row is one (day, hour); every feature is computed from days ``<= d-1`` only, so
building the features for the evaluation window is itself the walk-forward: each day is forecast
with exactly what was known at the midnight before it, by a model trained only on days before the
window. Hours whose actual value is missing (long outages) are neither trained on nor scored.

Why L1: the metric is MAE, and hourly household load is heavy-tailed (a kettle, an oven), so the
conditional median, which L1 estimates, beats the mean that L2 estimates.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from datetime import date, timedelta

import numpy as np
import pandas as pd

from scripts.core import progress, threads
from scripts.core.errors import TrainingError

TARGET = "global_active_power"
SIDE_COLUMNS = ("global_reactive_power", "voltage", "sub_metering_1", "sub_metering_2",
                "sub_metering_3")
HOURS = 24
YEAR_DAYS = 364  # 52 weeks: a year back on the same weekday


@dataclass(frozen=True)
class ModelParams:
    """Every knob of a run; logged to MLflow as params, so a run can be reproduced from them."""

    eval_weeks: int = 8
    validation_weeks: int = 8
    num_boost_round: int = 2000
    learning_rate: float = 0.03
    num_leaves: int = 63
    min_data_in_leaf: int = 40
    feature_fraction: float = 0.5
    bagging_fraction: float = 0.8
    lambda_l2: float = 10.0
    early_stopping_rounds: int = 100
    seed: int = 7
    ensemble_size: int = 3  # boosters refit with seeds seed, seed+1, ... and averaged into one
    num_threads: int = 0  # 0: the task's whole thread budget (scripts/core/threads.py)

    def lgb_params(self) -> dict[str, object]:
        return {
            "objective": "l1", "metric": "l1", "learning_rate": self.learning_rate,
            "num_leaves": self.num_leaves, "min_data_in_leaf": self.min_data_in_leaf,
            "feature_fraction": self.feature_fraction, "bagging_fraction": self.bagging_fraction,
            "bagging_freq": 1, "lambda_l2": self.lambda_l2, "seed": self.seed,
            "deterministic": True, "force_row_wise": True, "num_threads": self.num_threads,
            "verbosity": -1,
        }


# ---------------------------------------------------------------------------------------------
# Calendar
# ---------------------------------------------------------------------------------------------


def _easter(year: int) -> date:
    """Gregorian Easter Sunday (anonymous Gregorian algorithm)."""
    a, b, c = year % 19, year // 100, year % 100
    d, e = b // 4, b % 4
    g = (8 * b + 13) // 25
    h = (19 * a + b - d - g + 15) % 30
    i, k = c // 4, c % 4
    l_ = (32 + 2 * e + 2 * i - h - k) % 7
    m = (a + 11 * h + 22 * l_) // 451
    month, day = divmod(h + l_ - 7 * m + 114, 31)
    return date(year, month, day + 1)


def french_holidays(years: range) -> set[date]:
    """Public holidays in France (the household is in Sceaux, near Paris)."""
    days: set[date] = set()
    for y in years:
        easter = _easter(y)
        days |= {date(y, 1, 1), date(y, 5, 1), date(y, 5, 8), date(y, 7, 14), date(y, 8, 15),
                 date(y, 11, 1), date(y, 11, 11), date(y, 12, 25),
                 easter + timedelta(days=1), easter + timedelta(days=39), easter + timedelta(days=50)}
    return days


# ---------------------------------------------------------------------------------------------
# Features
# ---------------------------------------------------------------------------------------------


@dataclass
class FeatureTable:
    """Rows are (day, hour). ``features`` only uses days before ``day``; ``target`` may be NaN."""

    features: pd.DataFrame
    target: pd.Series
    day: pd.Series
    baselines: pd.DataFrame  # same hour yesterday / same hour last week
    columns: list[str] = field(default_factory=list)


def _shift_days(matrix: np.ndarray, days: int) -> np.ndarray:
    out = np.full_like(matrix, np.nan)
    out[days:] = matrix[:-days]
    return out


def _rolling_days(matrix: np.ndarray, window: int, func) -> np.ndarray:
    """func over days d-window..d-1 for each day d (per hour column), NaN-aware."""
    out = np.full_like(matrix, np.nan)
    for d in range(window, len(matrix)):
        block = matrix[d - window:d]
        if np.isfinite(block).any():
            out[d] = func(block, axis=0)
    return out


def build_features(hourly: pd.DataFrame) -> FeatureTable:
    """One row per (day, hour) of the hourly snapshot, from whole days (index starts at 00:00)."""
    if len(hourly) % HOURS or hourly.index[0].hour != 0:
        raise TrainingError("hourly frame must cover whole days starting at 00:00")
    days = pd.DatetimeIndex(hourly.index[::HOURS])
    n_days = len(days)
    y = hourly[TARGET].to_numpy(dtype="float64").reshape(n_days, HOURS)
    import warnings

    cols: dict[str, np.ndarray] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices in outages are expected
        for lag in (1, 2, 3, 4, 5, 6, 7, 14, 21, 28):
            cols[f"y_same_hour_lag{lag}d"] = _shift_days(y, lag)
        prev = _shift_days(y, 1)
        for name, func in (("mean", np.nanmean), ("max", np.nanmax), ("min", np.nanmin),
                           ("std", np.nanstd)):
            cols[f"prev_day_{name}"] = np.repeat(func(prev, axis=1)[:, None], HOURS, axis=1)
        for h in (19, 20, 21, 22, 23):
            cols[f"prev_day_h{h}"] = np.repeat(prev[:, h][:, None], HOURS, axis=1)
        # Neighbouring hours yesterday: consumption shifts by an hour from day to day.
        padded = np.pad(prev, ((0, 0), (1, 1)), constant_values=np.nan)
        cols["prev_day_hour_window3"] = np.nanmean(
            np.stack([padded[:, :-2], padded[:, 1:-1], padded[:, 2:]]), axis=0)
        for window in (7, 14, 28):
            cols[f"same_hour_mean_{window}d"] = _rolling_days(y, window, np.nanmean)
            cols[f"same_hour_median_{window}d"] = _rolling_days(y, window, np.nanmedian)
        cols["same_hour_std_7d"] = _rolling_days(y, 7, np.nanstd)
        cols["same_hour_q75_14d"] = _rolling_days(y, 14, lambda b, axis: np.nanpercentile(b, 75, axis=axis))
        cols["same_hour_q25_14d"] = _rolling_days(y, 14, lambda b, axis: np.nanpercentile(b, 25, axis=axis))
        daily_mean = np.nanmean(y, axis=1)
        for window in (7, 28):
            roll = np.full(n_days, np.nan)
            for d in range(window, n_days):
                roll[d] = np.nanmean(daily_mean[d - window:d])
            cols[f"daily_mean_{window}d"] = np.repeat(roll[:, None], HOURS, axis=1)
        same_weekday = np.stack([_shift_days(y, 7 * k) for k in range(1, 9)])
        cols["same_weekday_hour_mean_4w"] = np.nanmean(same_weekday[:4], axis=0)
        cols["same_weekday_hour_mean_8w"] = np.nanmean(same_weekday, axis=0)
        cols["same_weekday_hour_median_8w"] = np.nanmedian(same_weekday, axis=0)
        # The same weeks a year ago (364 days: the same weekday): how the level moved from the
        # four weeks before to now, last year. Autumn heating and the Christmas holidays recur.
        cols["last_year_same_hour_mean_7d"] = np.nanmean(
            np.stack([_shift_days(y, YEAR_DAYS + k) for k in range(-3, 4)]), axis=0)
        last_year_now, last_year_before = np.full(n_days, np.nan), np.full(n_days, np.nan)
        for d in range(YEAR_DAYS + 28, n_days):
            last_year_now[d] = np.nanmean(daily_mean[d - YEAR_DAYS - 3:d - YEAR_DAYS + 4])
            last_year_before[d] = np.nanmean(daily_mean[d - YEAR_DAYS - 28:d - YEAR_DAYS])
        cols["last_year_daily_mean_7d"] = np.repeat(last_year_now[:, None], HOURS, axis=1)
        cols["last_year_daily_mean_28d_before"] = np.repeat(last_year_before[:, None], HOURS, axis=1)
        cols["last_year_trend_ratio"] = cols["last_year_daily_mean_7d"] / cols["last_year_daily_mean_28d_before"]
        cols["expected_level_last_year_trend"] = cols["daily_mean_28d"] * cols["last_year_trend_ratio"]
        cols["prev_day_missing_hours"] = np.repeat(
            np.isnan(prev).sum(axis=1)[:, None].astype(float), HOURS, axis=1)
        for side in SIDE_COLUMNS:
            m = hourly[side].to_numpy(dtype="float64").reshape(n_days, HOURS)
            cols[f"prev_day_{side}_mean"] = np.repeat(
                np.nanmean(_shift_days(m, 1), axis=1)[:, None], HOURS, axis=1)
            cols[f"{side}_same_hour_mean_7d"] = _rolling_days(m, 7, np.nanmean)

    holidays = french_holidays(range(days[0].year - 1, days[-1].year + 2))
    day_dates = [d.date() for d in days]
    is_holiday = np.array([d in holidays for d in day_dates], dtype=float)
    prev_holiday = np.array([(d - timedelta(days=1)) in holidays for d in day_dates], dtype=float)
    next_holiday = np.array([(d + timedelta(days=1)) in holidays for d in day_dates], dtype=float)
    dow = days.dayofweek.to_numpy()
    calendar = {
        "hour": np.tile(np.arange(HOURS), (n_days, 1)),
        "day_of_week": np.repeat(dow[:, None], HOURS, axis=1),
        "is_weekend": np.repeat((dow >= 5)[:, None].astype(float), HOURS, axis=1),
        "is_holiday": np.repeat(is_holiday[:, None], HOURS, axis=1),
        "prev_is_holiday": np.repeat(prev_holiday[:, None], HOURS, axis=1),
        "next_is_holiday": np.repeat(next_holiday[:, None], HOURS, axis=1),
        "month": np.repeat(days.month.to_numpy()[:, None], HOURS, axis=1),
        "day_of_year": np.repeat(days.dayofyear.to_numpy()[:, None], HOURS, axis=1),
    }
    cols.update({k: v.astype(float) for k, v in calendar.items()})

    names = list(cols)
    features = pd.DataFrame({k: cols[k].reshape(-1) for k in names})
    day_of_row = pd.Series(np.repeat(days.to_numpy(), HOURS), name="day")
    baselines = pd.DataFrame({
        "same_hour_yesterday": features["y_same_hour_lag1d"].to_numpy(),
        "same_hour_last_week": features["y_same_hour_lag7d"].to_numpy(),
    })
    target = pd.Series(y.reshape(-1), name=TARGET)
    return FeatureTable(features, target, day_of_row, baselines, names)


# ---------------------------------------------------------------------------------------------
# Fit and evaluate
# ---------------------------------------------------------------------------------------------


@dataclass
class FitResult:
    booster: object  # lightgbm.Booster
    best_iteration: int
    train_seconds: float
    train_rows: int
    window_start: pd.Timestamp


def eval_window_start(table: FeatureTable, eval_weeks: int) -> pd.Timestamp:
    last_day = table.day.iloc[-1]
    return last_day - pd.Timedelta(days=7 * eval_weeks - 1)


PROGRESS_LABEL = "power_lgbm train"


def fit(table: FeatureTable, params: ModelParams) -> FitResult:
    """Early-stop on the weeks just before the eval window, then refit on all pre-window days."""
    import lightgbm as lgb

    window_start = eval_window_start(table, params.eval_weeks)
    val_start = window_start - pd.Timedelta(weeks=params.validation_weeks)
    # The first 28 days have incomplete lags; rows without a target are never trained on.
    usable = table.target.notna() & (table.day >= table.day.iloc[0] + pd.Timedelta(days=28))
    train_mask = usable & (table.day < val_start)
    val_mask = usable & (table.day >= val_start) & (table.day < window_start)
    if train_mask.sum() < 24 * 28 or val_mask.sum() < 24 * 7:
        raise TrainingError(
            f"not enough history: {int(train_mask.sum())} train and {int(val_mask.sum())} "
            f"validation hours before the {params.eval_weeks}-week evaluation window")
    X, y = table.features, table.target
    started = time.perf_counter()
    # ModelParams.num_threads caps the task's thread budget (scripts/core/threads.py); 0: the budget.
    lgb_params = {**params.lgb_params(), "num_threads": threads.capped(params.num_threads)}
    train_set = lgb.Dataset(X[train_mask], y[train_mask], free_raw_data=False)
    val_set = lgb.Dataset(X[val_mask], y[val_mask], reference=train_set)
    # The training set among valid_sets costs nothing (LightGBM keeps its scores) and early
    # stopping ignores it: it is the loss the progress lines report.
    probe_progress = progress.Progress(f"{PROGRESS_LABEL} early-stopping probe", "round",
                                       params.num_boost_round, at_most=True)
    probe = lgb.train(lgb_params, train_set, num_boost_round=params.num_boost_round,
                      valid_sets=[train_set, val_set], valid_names=["train", "valid"],
                      callbacks=[lgb.early_stopping(params.early_stopping_rounds, verbose=False),
                                 progress.lightgbm_callback(probe_progress)])
    best = max(1, probe.best_iteration or params.num_boost_round)
    probe_progress.finish(best_iteration=best)
    # Refit on everything before the window, a little longer for the extra weeks of data.
    full_mask = train_mask | val_mask
    rounds = int(best * full_mask.sum() / train_mask.sum())
    full_set = lgb.Dataset(X[full_mask], y[full_mask], free_raw_data=False)
    # A seed ensemble: boosters that differ only in their bagging and feature-sampling draws,
    # averaged. One booster's skill moves by +-0.4 points with the seed alone; the average is
    # both steadier and better (see docs/power_lgbm_training.md).
    size = max(1, params.ensemble_size)
    refit_progress = progress.Progress(f"{PROGRESS_LABEL} refit of {size} seed(s)", "round", rounds * size)
    members = [lgb.train({**lgb_params, "seed": params.seed + i}, full_set, num_boost_round=rounds,
                         valid_sets=[full_set], valid_names=["train"],
                         callbacks=[progress.lightgbm_callback(refit_progress, offset=i * rounds)])
               for i in range(size)]
    booster = average_boosters(members)
    return FitResult(booster, rounds, time.perf_counter() - started, int(full_mask.sum()), window_start)


_TREE_HEADER = re.compile(r"^Tree=\d+\n", re.MULTILINE)


def average_boosters(boosters: list) -> object:
    """One LightGBM booster that predicts the mean of ``boosters`` (same features and objective).

    A booster predicts the sum of its trees' leaf values, so the average of k boosters is the
    booster holding all their trees with every leaf value divided by k. Built on LightGBM's own
    text model format, the result is an ordinary ``lightgbm.Booster``: saved, logged to MLflow,
    served and explained like any other (internal values are scaled too, for SHAP).
    """
    import lightgbm as lgb

    if len(boosters) == 1:
        return boosters[0]
    k = len(boosters)
    texts = [b.model_to_string() for b in boosters]
    if any("is_linear=1" in text for text in texts):
        raise TrainingError("cannot average boosters with linear trees")
    # A model text is: header, "Tree=0" ... "Tree=n-1" blocks, "end of trees", importances, params.
    head = _TREE_HEADER.split(texts[0], maxsplit=1)[0]
    tail = texts[0].partition("end of trees")[2]
    trees = [block.strip("\n") for text in texts
             for block in _TREE_HEADER.split(text.partition("end of trees")[0])[1:]]

    def scaled(line: str) -> str:
        key, _, values = line.partition("=")
        if key not in ("leaf_value", "internal_value"):
            return line
        return key + "=" + " ".join(repr(float(v) / k) for v in values.split())

    blocks = [f"Tree={i}\n" + "\n".join(scaled(line) for line in block.splitlines())
              for i, block in enumerate(trees)]
    # tree_sizes (byte offsets for parallel loading) no longer match: drop it, LightGBM then parses
    # the trees one after another.
    head = "\n".join(line for line in head.splitlines() if not line.startswith("tree_sizes="))
    return lgb.Booster(model_str=head + "\n\n" + "\n\n\n".join(blocks) + "\n\n\nend of trees" + tail)


@dataclass
class Evaluation:
    metrics: dict[str, float]
    frame: pd.DataFrame  # timestamp, actual, forecast, baselines over the scored hours


def score(predict, table: FeatureTable, window_start: pd.Timestamp) -> Evaluation:
    """MAE/RMSE of ``predict(features)`` over the window against both seasonal-naive baselines.

    Scored hours: in the window, with an actual value and both baseline values (so every method
    is judged on exactly the same hours).
    """
    in_window = table.day >= window_start
    mask = (in_window & table.target.notna() & table.baselines.notna().all(axis=1)).to_numpy()
    if mask.sum() == 0:
        raise TrainingError("no scorable hours in the evaluation window")
    X = table.features[mask]
    forecast = np.asarray(predict(X), dtype="float64").reshape(-1)
    actual = table.target[mask].to_numpy()
    errors = forecast - actual
    mae = float(np.mean(np.abs(errors)))
    rmse = float(np.sqrt(np.mean(errors ** 2)))
    base = {name: float(np.mean(np.abs(table.baselines[name][mask].to_numpy() - actual)))
            for name in table.baselines.columns}
    baseline_mae = min(base.values())
    frame = pd.DataFrame({
        "timestamp": table.day[mask].to_numpy() + pd.to_timedelta(X["hour"].to_numpy(), unit="h"),
        "actual": actual, "forecast": forecast,
        **{name: table.baselines[name][mask].to_numpy() for name in table.baselines.columns},
    })
    metrics = {
        "mae": mae, "rmse": rmse, "baseline_mae": baseline_mae,
        "skill_mae": 1.0 - mae / baseline_mae,
        **{f"baseline_mae_{name}": value for name, value in base.items()},
        "eval_hours": float(mask.sum()),
    }
    return Evaluation(metrics, frame)


def plot_forecast(frame: pd.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(14, 4.5))
    ax.plot(frame["timestamp"], frame["actual"], lw=0.8, label="actual", color="black")
    ax.plot(frame["timestamp"], frame["forecast"], lw=0.8, label="LightGBM day-ahead", color="C1")
    ax.plot(frame["timestamp"], frame["same_hour_last_week"], lw=0.6, alpha=0.5,
            label="same hour last week", color="C0")
    ax.set_ylabel("Global active power, hourly mean (kW)")
    ax.set_title("Day-ahead forecast over the evaluation window")
    ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_importance(booster, path: str, top: int = 25) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gain = pd.Series(booster.feature_importance("gain"), index=booster.feature_name())
    gain = gain.sort_values().tail(top)
    fig, ax = plt.subplots(figsize=(8, 0.3 * len(gain) + 1))
    ax.barh(gain.index, gain.to_numpy(), color="C2")
    ax.set_xlabel("total gain")
    ax.set_title("Feature importance")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
