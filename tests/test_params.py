"""The one run-parameter parser (scripts.core.params) behind all three workflows: every bad value is a
ParameterError naming its field, before any work; strings from the command lines are cast."""

from __future__ import annotations

import math

import pytest

from common import config
from scripts.core import params
from scripts.core.errors import ParameterError
from scripts.image import pipeline as image_pipeline
from scripts.image.base import TrainConfig
from scripts.power import pipeline as power_pipeline
from scripts.tick import pipeline as tick_pipeline


@pytest.mark.parametrize(("conf", "field"), [
    ({"epochs": -5}, "epochs"),
    ({"epochs": 0}, "epochs"),  # not "the profile's": 0 is an error, None is the default
    ({"epochs": "x"}, "epochs"),
    ({"epochs": True}, "epochs"),  # a bool is not an integer
    ({"epochs": 2.5}, "epochs"),
    ({"batch_size": 0}, "batch_size"),
    ({"learning_rate": -1}, "learning_rate"),
    ({"learning_rate": 0}, "learning_rate"),
    ({"learning_rate": math.nan}, "learning_rate"),
    ({"profile": "huge"}, "profile"),
    ({"framework": "jax"}, "framework"),
    ({"device": "tpu"}, "device"),
    ({"seed": -1}, "seed"),
    ({"epoch": 3}, "epoch"),  # unknown key: a typo never trains with the default
])
def test_image_params_rejected_naming_the_field(conf, field):
    with pytest.raises(ParameterError) as err:
        image_pipeline.train_config(config.get("mnist_cnn_training"), "mnist", {"profile": "smoke", **conf})
    assert err.value.field == field
    assert field in str(err.value) and "mnist_cnn_training" in str(err.value)


@pytest.mark.parametrize(("conf", "field"), [
    ({"num_boost_round": -5}, "num_boost_round"),
    ({"num_boost_round": 0}, "num_boost_round"),
    ({"learning_rate": -1}, "learning_rate"),
    ({"feature_fraction": 1.5}, "feature_fraction"),
    ({"num_leaves": 1}, "num_leaves"),
    ({"seed": False}, "seed"),
    ({"num_boost_rounds": 5}, "num_boost_rounds"),
])
def test_power_params_rejected_naming_the_field(conf, field):
    with pytest.raises(ParameterError) as err:
        power_pipeline.model_params(config.get("power_lgbm_training"), conf)
    assert err.value.field == field and field in str(err.value)


@pytest.mark.parametrize(("conf", "field"), [
    ({"max_bad_share": 1.5}, "max_bad_share"),
    ({"trade_date": "2013-02-30"}, "trade_date"),
    ({"trade_date": "20131009"}, "trade_date"),
    ({"train_days": 0}, "train_days"),
    ({"max_depth": 0}, "max_depth"),
    ({"depth": 3}, "depth"),
])
def test_tick_params_rejected_naming_the_field(conf, field):
    with pytest.raises(ParameterError) as err:
        tick_pipeline.model_params(config.get("tick_model_training"), conf)
    assert err.value.field == field and field in str(err.value)


def test_trade_day_checks_its_format():
    with pytest.raises(ParameterError, match="trade_date"):
        tick_pipeline.trade_day(config.get("tick_model_training"), {"trade_date": "2013-10-32"}, None)
    assert str(tick_pipeline.trade_day(config.get("tick_model_training"), {"trade_date": "2013-10-09"},
                                       None)) == "2013-10-09"


def test_valid_values_are_typed_and_cli_strings_cast():
    cfg = image_pipeline.train_config(config.get("cifar10_cnn_training"), "cifar10",
                                      {"profile": "smoke", "epochs": "3", "learning_rate": "0.05",
                                       "batch_size": None, "seed": 3.0})
    assert (cfg.epochs, cfg.learning_rate, cfg.seed, cfg.recipe.batch_size) == (3, 0.05, 3, 32)
    assert isinstance(cfg.seed, int)
    mp = power_pipeline.model_params(config.get("power_lgbm_training"),
                                     {"num_boost_round": "300", "learning_rate": "0.1", "lambda_l2": 0})
    assert (mp.num_boost_round, mp.learning_rate, mp.lambda_l2) == (300, 0.1, 0.0)
    assert isinstance(mp.lambda_l2, float)
    # The whole of a run's params (what Airflow hands a task: every default filled in) parses.
    for dag_id in config.WORKFLOWS:
        params.parse(config.get(dag_id).run_params, config.get(dag_id).params, dag_id)


def test_boolean_and_string_types():
    flag = params.ParamSpec("flag", "boolean", False, "a flag")
    assert params.check(flag, "true") is True and params.check(flag, False) is False
    with pytest.raises(ParameterError, match="flag"):
        params.check(flag, 1)
    name = params.ParamSpec("name", "string", "a", "a name")
    with pytest.raises(ParameterError, match="name"):
        params.check(name, 3)
    with pytest.raises(ParameterError, match="name"):
        params.check(name, None)  # not nullable: its default is not None


def test_zero_epochs_no_longer_means_the_profile_default():
    assert TrainConfig("mnist", "smoke", epochs=None).recipe.epochs == 2
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig("mnist", "smoke", epochs=0)
