"""Next-5-minute volatility model: HAR-RV linear core plus an XGBoost correction.

The model predicts ``target_log_rv`` (log realized variance of the next 5 minutes) from the
features of ``scripts.tick.features``. It is fitted in two stages on a rolling window of past days:

1. HAR-RV: ordinary least squares of the target on ``log_rv_5``, ``log_rv_30``, ``log_rv_day``
   (the intraday analogue of Corsi's daily/weekly/monthly HAR). This is also the baseline.
2. XGBoost on the HAR residual with every feature (time of day, volume, imbalance, returns),
   early-stopped on the most recent training day. Starting from HAR means the trees only learn
   what the linear model misses, so with little history the model stays close to HAR instead of
   falling below it (trees alone extrapolate a linear relation poorly).

Evaluation is walk-forward: the model never sees the evaluated day; every feature of a minute is
known at the end of that minute. Metrics: RMSE of log RV for the model, persistence (the last
5 minutes' RV) and HAR, and QLIKE (the standard volatility-forecast loss, on variances).

Plain numpy/polars/xgboost: no MLflow or Airflow here, so ``bench/tick_bench.py`` runs it anywhere.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from scripts.core import progress, threads
from scripts.core.errors import TrainingError
from scripts.tick.features import FEATURES, TARGET

HAR_FEATURES = ("log_rv_5", "log_rv_30", "log_rv_day")
PERSISTENCE_FEATURE = "log_rv_5"


@dataclass(frozen=True)
class ModelParams:
    train_days: int = 20  # rolling window of past trading days
    # Depth-1 trees make the correction additive (one step function per feature, like a GAM).
    # With days rather than months of history, deeper trees fit noise: on the real 2013-10 trades
    # depth 3 ended 0.5-0.7 % behind HAR, depth 1 ahead of it on both walk-forward days.
    max_depth: int = 1
    learning_rate: float = 0.02
    num_boost_round: int = 2000
    early_stopping_rounds: int = 200
    min_child_weight: float = 50.0
    subsample: float = 0.8
    colsample_bytree: float = 0.8
    reg_lambda: float = 5.0
    seed: int = 7
    nthread: int = 0  # 0: the task's whole thread budget (scripts/core/threads.py)


def labelled(frame):
    """Rows with a target (the last five minutes of each day have none)."""
    import polars as pl

    return frame.filter(pl.col(TARGET).is_not_null())


def matrix(frame, columns=FEATURES) -> np.ndarray:
    return frame.select(list(columns)).to_numpy().astype(np.float64)


class HarXgbModel:
    """The fitted model: HAR coefficients plus an XGBoost booster on the residual."""

    def __init__(self, har_coef: np.ndarray, booster, best_iteration: int) -> None:
        self.har_coef = np.asarray(har_coef, dtype=np.float64)
        self.booster = booster
        self.best_iteration = best_iteration

    def har(self, frame) -> np.ndarray:
        return har_predict(self.har_coef, frame)

    def predict(self, frame) -> np.ndarray:
        """Log RV of the next 5 minutes for each row (a polars or pandas frame of FEATURES)."""
        import xgboost

        if not hasattr(frame, "columns"):
            raise TypeError(f"expected a polars or pandas DataFrame, got {type(frame).__name__}")
        features = _features_array(frame)
        har = self.har(frame)
        margin = xgboost.DMatrix(features, feature_names=list(FEATURES))
        correction = self.booster.predict(margin, iteration_range=(0, self.best_iteration + 1))
        return har + correction

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.booster.save_model(str(folder / "booster.json"))
        (folder / "har.json").write_text(json.dumps({
            "features": list(HAR_FEATURES), "coef": self.har_coef.tolist(),
            "best_iteration": self.best_iteration, "model_features": list(FEATURES)}))

    @classmethod
    def load(cls, folder: Path) -> HarXgbModel:
        import xgboost

        meta = json.loads((folder / "har.json").read_text())
        if meta["model_features"] != list(FEATURES):
            raise TrainingError(f"{folder}: model expects features {meta['model_features']}, "
                                f"this code builds {list(FEATURES)}")
        booster = xgboost.Booster()
        booster.load_model(str(folder / "booster.json"))
        return cls(np.array(meta["coef"]), booster, int(meta["best_iteration"]))


def _features_array(frame, columns=FEATURES) -> np.ndarray:
    if hasattr(frame, "to_numpy") and hasattr(frame, "select") and not hasattr(frame, "iloc"):
        return matrix(frame, columns)
    return frame[list(columns)].to_numpy(dtype=np.float64)  # pandas (the pyfunc path)


def har_fit(frame) -> np.ndarray:
    x = np.column_stack([np.ones(frame.height), matrix(frame, HAR_FEATURES)])
    coef, *_ = np.linalg.lstsq(x, frame[TARGET].to_numpy(), rcond=None)
    return coef


def har_predict(coef: np.ndarray, frame) -> np.ndarray:
    x = _features_array(frame, HAR_FEATURES)
    return coef[0] + x @ coef[1:]


@dataclass(frozen=True)
class FitResult:
    model: HarXgbModel
    train_rows: int
    valid_rows: int
    train_seconds: float
    best_iteration: int


def fit(train_frame, params: ModelParams) -> FitResult:
    """Fit HAR on all training rows, then XGBoost on its residual, early-stopped on the last day."""
    import polars as pl
    import xgboost

    rows = labelled(train_frame)
    if rows.height < 200:
        raise TrainingError(f"only {rows.height} labelled training rows; need at least 200")
    started = time.perf_counter()
    coef = har_fit(rows)
    days = rows["date"].unique().sort()
    if days.len() >= 2:
        is_valid = pl.col("date") == days[-1]
    else:  # one day of history: hold out its last quarter, in time order
        is_valid = pl.col("minute") >= int(rows["minute"].max() * 0.75)
    fit_rows, valid_rows = rows.filter(~is_valid), rows.filter(is_valid)

    def dmatrix(frame) -> xgboost.DMatrix:
        residual = frame[TARGET].to_numpy() - har_predict(coef, frame)
        return xgboost.DMatrix(matrix(frame), label=residual, feature_names=list(FEATURES))

    dtrain, dvalid = dmatrix(fit_rows), dmatrix(valid_rows)
    # "valid" stays the last evaluation: early stopping watches it; "train" is the reported loss.
    rounds = progress.Progress("tick_model train", "round", params.num_boost_round, at_most=True)
    booster = xgboost.train(
        {"objective": "reg:squarederror", "max_depth": params.max_depth, "eta": params.learning_rate,
         "min_child_weight": params.min_child_weight, "subsample": params.subsample,
         "colsample_bytree": params.colsample_bytree, "lambda": params.reg_lambda,
         "seed": params.seed, "nthread": threads.capped(params.nthread), "tree_method": "hist",
         "eval_metric": "rmse"},
        dtrain, num_boost_round=params.num_boost_round, evals=[(dtrain, "train"), (dvalid, "valid")],
        early_stopping_rounds=params.early_stopping_rounds, verbose_eval=False,
        callbacks=[progress.xgboost_callback(rounds)])
    best = int(booster.best_iteration)
    rounds.finish(best_iteration=best + 1)
    return FitResult(HarXgbModel(coef, booster, best), fit_rows.height, valid_rows.height,
                     time.perf_counter() - started, best)


def rmse(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.sqrt(np.mean((y - pred) ** 2)))


def qlike(log_rv: np.ndarray, log_pred: np.ndarray) -> float:
    """QLIKE on variances: mean(RV/h - log(RV/h) - 1); 0 for a perfect forecast."""
    ratio = np.exp(log_rv - log_pred)
    return float(np.mean(ratio - np.log(ratio) - 1))


@dataclass(frozen=True)
class Evaluation:
    metrics: dict[str, float]
    frame: Any  # polars frame: date, symbol, minute, target, model, persistence, har


def evaluate(model: HarXgbModel, day_frame) -> Evaluation:
    """Walk-forward scores of the model and both baselines on one unseen day."""
    import polars as pl

    rows = labelled(day_frame)
    if rows.height == 0:
        raise TrainingError("the evaluation day has no labelled rows")
    y = rows[TARGET].to_numpy()
    predictions = {"model": model.predict(rows), "persistence": rows[PERSISTENCE_FEATURE].to_numpy(),
                   "har": model.har(rows)}
    metrics = {
        "rmse_log_rv": rmse(y, predictions["model"]),
        "persistence_rmse_log_rv": rmse(y, predictions["persistence"]),
        "har_rmse_log_rv": rmse(y, predictions["har"]),
        "qlike": qlike(y, predictions["model"]),
        "persistence_qlike": qlike(y, predictions["persistence"]),
        "har_qlike": qlike(y, predictions["har"]),
        "eval_rows": float(rows.height),
    }
    metrics["skill_vs_persistence"] = 1 - metrics["rmse_log_rv"] / metrics["persistence_rmse_log_rv"]
    metrics["skill_vs_har"] = 1 - metrics["rmse_log_rv"] / metrics["har_rmse_log_rv"]
    frame = rows.select("date", "symbol", "minute", pl.col(TARGET).alias("realized")).with_columns(
        **{name: pl.Series(values) for name, values in predictions.items()})
    return Evaluation(metrics, frame)


def plot_volatility(frame, path: str) -> None:
    """Predicted against realized 5-minute volatility (annualised %), one panel per symbol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    symbols = frame["symbol"].unique().sort().to_list()
    fig, axes = plt.subplots(len(symbols), 2, figsize=(13, 2.6 * len(symbols)), squeeze=False)
    to_vol = np.sqrt(252 * 78) * 100  # 78 five-minute windows per session
    for row, symbol in enumerate(symbols):
        part = frame.filter(frame["symbol"] == symbol)
        realized = np.sqrt(np.exp(part["realized"].to_numpy())) * to_vol
        axes[row, 0].plot(part["minute"], realized, lw=0.8, color="0.5", label="realized")
        for name, colour in (("model", "C0"), ("har", "C1"), ("persistence", "C2")):
            axes[row, 0].plot(part["minute"], np.sqrt(np.exp(part[name].to_numpy())) * to_vol, lw=0.9,
                              color=colour, label=name, alpha=1 if name == "model" else 0.6)
        axes[row, 0].set_title(f"{symbol}: next-5-minute volatility (annualised %)")
        axes[row, 0].set_xlabel("minute of session")
        axes[row, 1].scatter(part["realized"], part["model"], s=4, alpha=0.5)
        lims = [float(min(part["realized"].min(), part["model"].min())),
                float(max(part["realized"].max(), part["model"].max()))]
        axes[row, 1].plot(lims, lims, color="0.3", lw=0.8)
        axes[row, 1].set_xlabel("realized log RV")
        axes[row, 1].set_ylabel("predicted log RV")
    axes[0, 0].legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
