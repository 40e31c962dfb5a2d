"""The one definition of a round's training settings and its command-line flags."""
from __future__ import annotations

import argparse

import pytest

from processor import codec
from processor.training import UPDATE_DTYPES, TrainingSettings


def parser(**kwargs) -> argparse.ArgumentParser:
    cli = argparse.ArgumentParser()
    TrainingSettings.add_flags(cli, **kwargs)
    return cli


def test_the_flags_default_to_the_dataclass_and_round_trip():
    assert TrainingSettings.from_args(parser().parse_args([])) == TrainingSettings()
    chosen = TrainingSettings(epochs=3, batch_size=16, learning_rate=0.1, ewc_lambda=100.0, update_dtype="float32")
    assert TrainingSettings.from_args(parser().parse_args(chosen.as_flags())) == chosen


def test_flags_can_be_left_out_or_given_other_defaults():
    args = parser(defaults=TrainingSettings(epochs=2), exclude=("ewc_lambda",)).parse_args([])
    assert TrainingSettings.from_args(args, ewc_lambda=5.0) == TrainingSettings(epochs=2, ewc_lambda=5.0)
    with pytest.raises(SystemExit):
        parser(exclude=("ewc_lambda",)).parse_args(["--ewc-lambda", "1"])
    assert "--ewc-lambda" not in TrainingSettings().as_flags(exclude=("ewc_lambda",))


def test_the_update_dtypes_are_the_codecs():
    assert set(UPDATE_DTYPES) == set(codec.STORED_DTYPES)


@pytest.mark.parametrize("changes", [{"epochs": 0}, {"batch_size": 0}, {"learning_rate": 0.0},
                                     {"ewc_lambda": -1.0}, {"regularizer": "l2"}, {"update_dtype": "int8"}])
def test_impossible_settings_are_refused(changes):
    with pytest.raises(ValueError):
        TrainingSettings(**changes)


def test_the_regularizer_round_trips_through_the_flags_and_the_plans_json():
    chosen = TrainingSettings(ewc_lambda=0.1, regularizer="fedcurv")
    assert TrainingSettings.from_args(parser().parse_args(chosen.as_flags())) == chosen
    assert TrainingSettings.from_json(chosen.to_json()) == chosen
    assert TrainingSettings().regularizer == "ewc"
    with pytest.raises(SystemExit):
        parser().parse_args(["--regularizer", "l2"])


@pytest.mark.parametrize("value, message", [('"l2"', "unknown regularizer"), ("3", "not a str")])
def test_a_plan_with_a_bad_regularizer_is_refused(value, message):
    text = TrainingSettings().to_json().replace('"regularizer": "ewc"', f'"regularizer": {value}')
    assert text != TrainingSettings().to_json()
    with pytest.raises(ValueError, match=message):
        TrainingSettings.from_json(text)
