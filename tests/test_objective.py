import math

import pytest
import torch

from exme_callback.objective import Objective, item_group, metric_key, numeric_metrics


def test_objective_defaults_follow_the_trainer():
    assert Objective.from_spec().metrics == {"eval_loss": False}
    assert Objective.from_spec(None, "accuracy", True).metrics == {"accuracy": True}
    assert Objective.from_spec(None, "loss", False).greater_is_better is False
    assert Objective.from_spec(["eval_loss", "eval_acc"]).metrics == {"eval_loss": False, "eval_acc": True}


def test_objective_same_direction_is_plain_mean():
    objective = Objective.from_spec({"a": "max", "b": "max"})
    assert objective.greater_is_better and objective.name == "mean(a, b)"
    assert objective({"eval_a": 0.5, "b": 0.8, "c": 9}) == pytest.approx(0.65)
    lower = Objective.from_spec({"x_loss": "min", "y_loss": "min"})
    assert lower.greater_is_better is False and lower({"x_loss": 1.0, "y_loss": 3.0}) == 2.0


def test_objective_mixed_directions_negate_lower_is_better():
    objective = Objective.from_spec({"acc": "max", "loss": "min"})
    assert objective.greater_is_better and objective.name == "mean(acc, -loss)"
    assert objective({"acc": 0.8, "loss": 0.4}) == pytest.approx(0.2)


def test_objective_values_and_errors():
    objective = Objective.from_spec("loss")
    assert objective.values({"eval_loss": torch.tensor(0.25)}) == {"eval_loss": 0.25}
    assert math.isnan(objective({"eval_loss": math.nan}))
    with pytest.raises(KeyError, match=r"'loss' is not in the evaluation's output, which has \['eval_acc'\]"):
        objective({"eval_acc": 1.0})
    with pytest.raises(TypeError, match="'eval_loss' must be a real number"):
        objective({"eval_loss": [1.0]})
    with pytest.raises(ValueError, match="`metrics` must not repeat"):
        Objective.from_spec(["a", "a"])
    with pytest.raises(ValueError, match="at least one metric"):
        Objective({})


def test_numeric_metrics_drops_timings():
    metrics = {"eval_loss": 1, "eval_runtime": 0.1, "eval_samples_per_second": 9.0, "epoch": 2.0, "note": "x"}
    assert numeric_metrics(metrics) == {"eval_loss": 1.0}


def test_metric_key_tries_the_trainers_prefix_first_then_the_name_as_given():
    assert metric_key("loss", {"loss": 2.1, "eval_loss": 2.4}) == "eval_loss"  # a run's history: the evaluation's
    assert metric_key("loss", {"loss"}) == "loss"
    assert metric_key("eval_loss", {"eval_loss", "loss"}) == "eval_loss"
    assert metric_key("eval_loss", {"eval_eval_loss", "loss"}) is None  # an `eval_` name only as given
    assert metric_key("toy_choice/acc", {"toy_choice/acc": [1.0]}) == "toy_choice/acc"
    assert metric_key("exme/checkpoint/score", {"exme/checkpoint/score", "eval_loss"}) == "exme/checkpoint/score"
    assert metric_key("f1", {"eval_loss"}) is None
    # The objective reads the same key.
    assert Objective({"loss": False}).values({"loss": 2.1, "eval_loss": 2.4}) == {"eval_loss": 2.4}


def test_objective_refuses_two_names_of_one_metric():
    # `loss` is looked up as `eval_loss`: both would read one value, and the mean over two names would halve it.
    with pytest.raises(ValueError, match=r"names 'loss' and 'eval_loss', which are one metric, 'eval_loss'.*once"):
        Objective({"loss": False, "eval_loss": False})
    with pytest.raises(ValueError, match=r"names 'acc' and 'eval_acc', which are one metric, 'eval_acc'.*once"):
        Objective.from_spec(["eval_acc", "acc"])
    assert Objective({"loss": False, "eval_acc": True})({"eval_loss": 1.0, "eval_acc": 0.5}) == pytest.approx(-0.25)


def test_item_group_is_the_task_of_a_task_metric_name_or_the_metric():
    assert item_group("arc_easy/acc") == "arc_easy"
    assert item_group("gsm8k/exact_match,strict-match") == "gsm8k"
    assert item_group("eval_accuracy") == "eval_accuracy"


def test_the_modules_example():
    objective = Objective.from_spec({"arc/acc": "max", "gsm8k/exact_match": "max"})
    assert objective({"arc/acc": 0.5, "gsm8k/exact_match": 0.3}) == 0.4
    assert objective.gain_weights() == {"arc/acc": 0.5, "gsm8k/exact_match": 0.5}
