"""Features, fit and scoring of the power model (no MLflow); the run-parameter path and XCom
types of its pipeline and command line (no server: they fail before any MLflow call)."""

from __future__ import annotations

import dataclasses
import json
from datetime import date
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from common import config
from scripts.core.errors import ParameterError, TrainingError
from scripts.power import cli as power_cli
from scripts.power import data as power_data
from scripts.power import model as power_model
from scripts.power import pipeline as power_pipeline

CFG = config.get("power_lgbm_training")

SMALL = dict(eval_weeks=2, validation_weeks=2, num_boost_round=200)


@pytest.fixture(scope="module")
def hourly(synthetic_uci, tmp_path_factory) -> pd.DataFrame:
    snap = power_data.prepare(synthetic_uci, tmp_path_factory.mktemp("snaps"))
    return power_data.load_snapshot(snap["uri"])


def test_features_use_only_days_before_the_forecast_day(hourly):
    table = power_model.build_features(hourly)
    day = table.day.unique()[60]
    changed = hourly.copy()
    changed.loc[day:, :] = changed.loc[day:, :] * 3 + 1  # rewrite the forecast day and after
    after = power_model.build_features(changed)
    rows = (table.day == day).to_numpy()
    pd.testing.assert_frame_equal(table.features[rows], after.features[rows])
    assert not np.allclose(table.target[rows], after.target[rows])


def test_baselines_are_the_same_hour_one_day_and_one_week_earlier(hourly):
    table = power_model.build_features(hourly)
    i = 24 * 50 + 13  # day 50, 13:00
    y = hourly[power_model.TARGET].to_numpy()
    assert table.baselines["same_hour_yesterday"][i] == pytest.approx(y[i - 24], nan_ok=True)
    assert table.baselines["same_hour_last_week"][i] == pytest.approx(y[i - 168], nan_ok=True)


def test_fit_beats_seasonal_naive_on_a_patterned_household(hourly):
    params = dataclasses.replace(power_model.ModelParams(), **SMALL)
    table = power_model.build_features(hourly)
    result = power_model.fit(table, params)
    assert result.window_start == table.day.iloc[-1] - pd.Timedelta(days=13)
    evaluation = power_model.score(result.booster.predict, table, result.window_start)
    m = evaluation.metrics
    assert m["baseline_mae"] == min(m["baseline_mae_same_hour_yesterday"], m["baseline_mae_same_hour_last_week"])
    assert m["skill_mae"] == pytest.approx(1 - m["mae"] / m["baseline_mae"])
    assert m["skill_mae"] > 0.1
    assert evaluation.frame["timestamp"].min() >= result.window_start
    assert evaluation.frame["actual"].notna().all()


def test_too_little_history_is_a_training_error(hourly):
    table = power_model.build_features(hourly.iloc[: 24 * 60])
    with pytest.raises(TrainingError, match="not enough history"):
        power_model.fit(table, power_model.ModelParams())


def test_french_holidays():
    days = power_model.french_holidays(range(2009, 2010))
    assert date(2009, 4, 13) in days  # Easter Monday 2009
    assert date(2009, 5, 21) in days  # Ascension
    assert date(2009, 7, 14) in days and date(2009, 7, 15) not in days


def test_pipeline_params_reject_unknown_keys_and_cast_types():
    params = power_pipeline.model_params(CFG, {"num_boost_round": "50", "learning_rate": "0.1"})
    assert (params.num_boost_round, params.learning_rate) == (50, 0.1)
    with pytest.raises(ValueError, match="num_boost_rounds"):
        power_pipeline.model_params(CFG, {"num_boost_rounds": 5})


def test_prepare_and_the_cli_refuse_a_bad_param_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("VTM_DATA_DIR", str(tmp_path))  # nothing may be fetched or written there
    with pytest.raises(ParameterError, match="num_boost_rounds"):
        power_pipeline.prepare(CFG, {"num_boost_rounds": 5}, tmp_path / "missing.zip")
    with pytest.raises(ParameterError, match="learning_rate"):
        power_cli.main(["--source", str(tmp_path / "missing.zip"), "--param", "learning_rate=-1"])
    with pytest.raises(SystemExit) as exit_:
        power_cli.main(["--param", "num_boost_round"])  # no "=": a usage error, not a traceback
    assert exit_.value.code == 2
    assert not any(tmp_path.iterdir())


def test_snapshot_xcom_is_a_plain_dict_of_the_manifest_and_its_uri(synthetic_uci, tmp_path, monkeypatch):
    monkeypatch.setenv("VTM_DATA_DIR", str(tmp_path))
    snapshot = power_pipeline.prepare(CFG, {"seed": "3"}, synthetic_uci)
    assert list(snapshot) == list(power_pipeline.Snapshot.__annotations__)
    assert type(snapshot) is dict and snapshot["uri"].startswith(str(tmp_path.resolve()))
    manifest = json.loads((Path(snapshot["uri"]) / power_data.MANIFEST_FILE).read_text())
    assert manifest == {k: v for k, v in snapshot.items() if k != "uri"}


def test_last_year_features_look_only_at_days_before_the_forecast_day():
    """Over more than a year, so the features a year back are filled in, and leakage would show."""
    rng = np.random.default_rng(3)
    index = pd.date_range("2008-01-01", periods=24 * 420, freq="h")
    hours = np.arange(len(index))
    hourly = pd.DataFrame({power_model.TARGET: 1 + np.sin(hours / 24 * 2 * np.pi) ** 2 + rng.random(len(index)),
                           **{c: rng.random(len(index)) for c in power_model.SIDE_COLUMNS}}, index=index)
    table = power_model.build_features(hourly)
    day = table.day.unique()[400]
    rows = (table.day == day).to_numpy()
    last_year = [c for c in table.columns if c.startswith("last_year_")]
    assert last_year and table.features.loc[rows, last_year].notna().all().all()
    changed = hourly.copy()
    changed.loc[day:, :] = changed.loc[day:, :] * 3 + 1
    pd.testing.assert_frame_equal(table.features[rows], power_model.build_features(changed).features[rows])


def test_averaged_boosters_predict_the_mean_of_their_members():
    import lightgbm as lgb

    rng = np.random.default_rng(0)
    X = pd.DataFrame(rng.random((400, 4)), columns=["a", "b", "c", "d"])
    y = 3 * X["a"] + rng.random(400)
    members = [lgb.train({"objective": "l1", "num_leaves": 8, "bagging_fraction": 0.7, "bagging_freq": 1,
                          "feature_fraction": 0.7, "seed": seed, "verbosity": -1},
                         lgb.Dataset(X, y), num_boost_round=30) for seed in range(3)]
    merged = power_model.average_boosters(members)
    assert merged.num_trees() == 90 and merged.feature_name() == ["a", "b", "c", "d"]
    expected = np.mean([m.predict(X) for m in members], axis=0)
    np.testing.assert_allclose(merged.predict(X), expected, rtol=0, atol=1e-9)
    # And it survives LightGBM's own save/load, as MLflow stores it.
    reloaded = lgb.Booster(model_str=merged.model_to_string())
    np.testing.assert_allclose(reloaded.predict(X), expected, rtol=0, atol=1e-9)
