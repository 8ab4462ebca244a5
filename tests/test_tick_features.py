"""Tick features: determinism, no look-ahead, bar and tick-rule arithmetic, and the model's
walk-forward scores on simulated days."""

from __future__ import annotations

import math
from datetime import date

import numpy as np
import polars as pl
import pytest

from scripts.core.errors import DataValidationError
from scripts.tick import features as tick_features
from scripts.tick import importer as tick_import
from scripts.tick import lake as tick_lake
from scripts.tick import model as tick_model

DAY = date(2026, 1, 6)


@pytest.fixture(scope="module")
def lake(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("ticks") / "lake")
    tick_import.seed(root, mirror=None, simulate_start=date(2026, 1, 5), simulate_days=4)
    return root


def tape(rows: list[tuple[str, float, int]]) -> pl.DataFrame:
    """Trades of one symbol from (New York wall time, price, size)."""
    ts = pl.Series([f"{DAY} {t}" for t, _, _ in rows]).str.to_datetime("%Y-%m-%d %H:%M:%S%.f")
    return pl.DataFrame({
        "ts": ts.dt.replace_time_zone("America/New_York").dt.convert_time_zone("UTC").dt.cast_time_unit("ns"),
        "symbol": "XYZ", "price": [p for _, p, _ in rows], "size": [s for _, _, s in rows]})


def test_rebuilding_a_day_is_byte_identical(lake):
    first = tick_features.build_day(lake, DAY)
    path = first.uri
    with open(path, "rb") as handle:
        before = handle.read()
    second = tick_features.build_day(lake, DAY)
    with open(path, "rb") as handle:
        assert handle.read() == before
    assert first.sha256 == second.sha256 and first.rows == 4 * tick_features.SESSION_MINUTES
    assert second.synthetic and second.data_version.startswith("synthetic-")


def test_bars_cover_regular_hours_only_with_tick_rule_imbalance():
    rows = [("09:29:59.000", 10.00, 500),   # pre-market: not in any bar
            ("09:30:00.000", 10.00, 100),   # no earlier price change: sign 0
            ("09:30:01.000", 10.01, 200),   # uptick: buy
            ("09:30:02.000", 10.01, 300),   # zero tick: still a buy (last non-zero change)
            ("09:30:30.000", 10.00, 100),   # downtick: sell
            ("09:31:05.000", 10.02, 100),
            ("16:00:00.000", 11.00, 900)]   # the close auction print at 16:00 is after the session
    bars = tick_features.symbol_bars(tape(rows), DAY).collect()
    assert bars.height == tick_features.SESSION_MINUTES and bars["minute"].to_list() == list(range(390))
    first = bars.row(0, named=True)
    assert (first["volume"], first["trades"], first["close"]) == (700, 4, 10.00)
    assert first["signed_volume"] == 200 + 300 - 100
    assert first["imbalance_5"] == pytest.approx(400 / 700)
    # Ten-second samples of minute 0 end at 10.01 (09:30:0x) and 10.00 (09:30:3x): one return.
    assert first["rv"] == pytest.approx(math.log(10.00 / 10.01) ** 2)
    # Empty minutes carry the last close, have no volume, and zero variance.
    assert bars.row(5, named=True)["close"] == 10.02 and bars.row(5, named=True)["volume"] == 0


def test_target_is_the_next_five_minutes_and_features_never_look_ahead(lake):
    lk = tick_lake.Lake.open(lake)
    trades = tick_features.read_trades(lk, DAY, "SPY")
    bars = tick_features.symbol_bars(trades, DAY).collect()
    rv = bars["rv"].to_numpy()
    m = 100
    assert bars["target_log_rv"][m] == pytest.approx(np.log(rv[m + 1:m + 6].sum() + tick_features.EPS))
    assert bars["target_log_rv"][-5:].null_count() == 5
    # Cut the tape at minute 200: every feature of minutes before it must be unchanged.
    cut = trades.filter(pl.col("ts") < trades["ts"].min() + pl.duration(hours=7, minutes=20))  # ~11:50 NY
    truncated = tick_features.symbol_bars(cut, DAY).collect()
    last_full = int(cut["ts"].max().astimezone(__import__("zoneinfo").ZoneInfo("America/New_York")).hour
                    * 60 + cut["ts"].max().astimezone(__import__("zoneinfo").ZoneInfo("America/New_York")).minute
                    - tick_features.OPEN_MINUTE) - 1
    assert last_full > 60
    columns = [c for c in tick_features.FEATURES]
    assert truncated.head(last_full).select(columns).equals(bars.head(last_full).select(columns))


def test_building_a_missing_day_names_it(lake):
    with pytest.raises(DataValidationError, match="trades of 2026-01-03 are not complete"):
        tick_features.build_day(lake, date(2026, 1, 3))


def test_model_walk_forward_beats_persistence_on_simulated_days(lake):
    lk = tick_lake.Lake.open(lake)
    days = lk.days(tick_lake.TRADES)
    for day in days:
        tick_features.build_day(lake, day)
    result = tick_model.fit(tick_features.load_features(lk, days[:-1]), tick_model.ModelParams())
    evaluation = tick_model.evaluate(result.model, tick_features.load_features(lk, days[-1:]))
    m = evaluation.metrics
    assert m["rmse_log_rv"] < m["persistence_rmse_log_rv"]
    assert m["skill_vs_har"] == pytest.approx(1 - m["rmse_log_rv"] / m["har_rmse_log_rv"])
    assert m["qlike"] >= 0 and set(evaluation.frame.columns) >= {"realized", "model", "har", "persistence"}
    # Saved and loaded, the model predicts the same numbers.
    result.model.save(lk_path := __import__("pathlib").Path(lake).parent / "model")
    again = tick_model.HarXgbModel.load(lk_path)
    frame = tick_features.load_features(lk, days[-1:])
    np.testing.assert_allclose(again.predict(frame), result.model.predict(frame))
    np.testing.assert_allclose(again.predict(frame.to_pandas()), result.model.predict(frame))


def test_run_params_are_checked(tmp_path, monkeypatch):
    from datetime import datetime, timedelta, timezone

    from common import config
    from scripts.core.errors import ParameterError
    from scripts.tick import pipeline as tick_pipeline

    cfg = config.get("tick_model_training")
    params = tick_pipeline.model_params(cfg, {"trade_date": "2013-10-09", "max_bad_share": 0.1, "train_days": "5"})
    assert params.train_days == 5 and params.max_depth == tick_model.ModelParams().max_depth
    with pytest.raises(ParameterError, match=r"unknown tick_model_training params \['depth'\]"):
        tick_pipeline.model_params(cfg, {"depth": 3})
    with pytest.raises(ParameterError, match="trade_date '9/10/2013' is not YYYY-MM-DD"):
        tick_pipeline.trade_day(cfg, {"trade_date": "9/10/2013"}, None)
    close = datetime(2013, 10, 9, 17, 30, tzinfo=timezone(timedelta(hours=-4)))  # 17:30 New York (EDT)
    assert tick_pipeline.trade_day(cfg, {"trade_date": None}, close) == date(2013, 10, 9)
    # The first step checks every param before any work, and fixes the run's day, lake and limit.
    monkeypatch.setenv("TICK_LAKE", str(tmp_path / "lake"))
    assert tick_pipeline.start(cfg, dict(cfg.params), logical_date=close) == {
        "day": "2013-10-09", "lake": str(tmp_path / "lake"), "max_bad_share": tick_lake.MAX_BAD_SHARE}
    assert tick_pipeline.start(cfg, {"max_bad_share": "0.5"}, run_after=close, lake="s3://b/l") == {
        "day": "2013-10-09", "lake": "s3://b/l", "max_bad_share": 0.5}
    with pytest.raises(ParameterError, match="train_days"):
        tick_pipeline.start(cfg, {"train_days": 0}, logical_date=close)


def test_steps_hand_on_json_records_of_their_declared_type(lake):
    """validate and build_features return plain JSON dicts with exactly their TypedDict's keys,
    each carrying the day record (day, lake, limit) the later steps read."""
    import json

    from common import config
    from scripts.tick import pipeline as tick_pipeline

    day = tick_pipeline.start(config.get("tick_model_training"), {"trade_date": DAY.isoformat()}, lake=lake)
    validated = tick_pipeline.validate(day)
    built = tick_pipeline.build_features(validated)
    assert set(validated) == tick_pipeline.Validated.__required_keys__
    assert set(built) == tick_pipeline.Built.__required_keys__
    assert json.loads(json.dumps([validated, built])) == [validated, built]
    assert {k: built[k] for k in day} == day == {k: validated[k] for k in day}
    assert built["data_version"] == validated["data_version"] and built["trades_per_second"] > 0
