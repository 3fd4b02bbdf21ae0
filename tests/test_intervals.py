"""Paired bootstrap intervals of gains: closed forms, pairing, grouping by task, coverage at the stated level."""

import pytest
import torch

from exme_callback.intervals import check_level, gain_interval


def test_a_constant_paired_difference_is_its_own_interval():
    reference = torch.rand(50, generator=torch.Generator().manual_seed(0)).tolist()
    candidate = [x + 0.25 for x in reference]  # every item gains 0.25: no draw can say otherwise
    low, high = gain_interval({"m": candidate}, {"m": reference}, {"m": 1.0})
    assert low == pytest.approx(0.25) and high == pytest.approx(0.25)
    low, high = gain_interval({"m": candidate}, {"m": reference}, {"m": -0.5})  # lower is better, one of two
    assert low == pytest.approx(-0.125) and high == pytest.approx(-0.125)


def test_metrics_of_one_task_are_drawn_together():
    generator = torch.Generator().manual_seed(1)
    swing = torch.randn(40, generator=generator).tolist()
    zero = [0.0] * 40
    candidate = {"task/a": swing, "task/b": [-x for x in swing]}  # a's gain is b's loss on every item
    reference = {"task/a": zero, "task/b": zero}
    weights = {"task/a": 0.5, "task/b": 0.5}
    assert gain_interval(candidate, reference, weights) == pytest.approx((0.0, 0.0), abs=1e-12)
    # Drawn apart (two tasks), the two halves no longer cancel in every draw.
    apart = {"one/a": swing, "two/b": [-x for x in swing]}
    low, high = gain_interval(apart, {"one/a": zero, "two/b": zero}, {"one/a": 0.5, "two/b": 0.5})
    assert low < -0.01 and high > 0.01


def test_seeded_and_symmetric_in_the_reference():
    generator = torch.Generator().manual_seed(2)
    a, b = torch.rand(30, generator=generator).tolist(), torch.rand(30, generator=generator).tolist()
    forward = gain_interval({"m": a}, {"m": b}, {"m": 1.0}, seed=7)
    assert gain_interval({"m": a}, {"m": b}, {"m": 1.0}, seed=7) == forward
    backward = gain_interval({"m": b}, {"m": a}, {"m": 1.0}, seed=7)  # the same draws, the gain negated
    assert backward == pytest.approx((-forward[1], -forward[0]))


@pytest.mark.parametrize("level", [0.8, 0.95])
def test_intervals_cover_a_known_paired_difference_at_the_stated_rate(level):
    """Items with a known mean difference (0.1, normal per-item noise, shared item difficulty): over 300 data sets
    the interval holds the true difference about `level` of the time (the percentile bootstrap is a little narrow
    on 100 items: allowed 5 points below, 3 above, about 2.5 standard errors of the count)."""
    generator = torch.Generator().manual_seed(3)
    covered, trials = 0, 300
    for trial in range(trials):
        difficulty = torch.randn(100, generator=generator)
        reference = difficulty + 0.3 * torch.randn(100, generator=generator)
        candidate = difficulty + 0.1 + 0.3 * torch.randn(100, generator=generator)
        low, high = gain_interval(
            {"m": candidate.tolist()}, {"m": reference.tolist()}, {"m": 1.0}, level, iterations=1000, seed=trial
        )
        covered += low <= 0.1 <= high
    assert level - 0.05 <= covered / trials <= level + 0.03


def test_items_that_differ_between_evaluations_are_refused():
    with pytest.raises(ValueError, match="`m` differ between two evaluations.*same items, in the same order"):
        gain_interval({"m": [1.0, 0.0, 1.0]}, {"m": [1.0, 0.0]}, {"m": 1.0})


@pytest.mark.parametrize("level", [0.0, 1.0, 95, "0.95", True, float("nan")])
def test_a_level_outside_zero_one_is_refused(level):
    with pytest.raises(ValueError, match=r"`confidence` must be a number in \(0, 1\)"):
        check_level(level)
