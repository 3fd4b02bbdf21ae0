import json
import logging
import math

import pytest

from exme_callback.candidates import (
    Candidate,
    Checkpoint,
    best,
    choose,
    is_better,
    rank_checkpoints,
    set_intervals,
)
from exme_callback.intervals import gain_interval


def test_best_prefers_direction_then_earliest_and_skips_invalid():
    a = Candidate("sft", (1, 0), score=1.0)
    b = Candidate("expo", (1.1, 0), score=1.0)
    c = Candidate("exme", (0.5, 0.5), score=0.5)
    d = Candidate("exme", (0.4, 0.6), score=math.nan)
    assert best([a, b, c, d], greater_is_better=True) is a
    assert best([a, b, c, d], greater_is_better=False) is c
    assert best([a, b, d], greater_is_better=True, kinds=("exme",)) is None
    assert not d.valid and not Candidate("exme", (0, 0), score=1.0, error="x").valid


def test_is_better():
    assert is_better(1.0, None, True) and not is_better(math.inf, None, True)
    assert is_better(1.0, 2.0, False) and not is_better(2.0, 2.0, False)


def test_rank_checkpoints_direction_ties_reevaluation_non_finite_and_keep():
    evaluated = [
        Checkpoint(10, 0.5),
        Checkpoint(20, 0.3),
        Checkpoint(30, 0.5),  # ties with step 10, evaluated later
        Checkpoint(40, math.nan),
        Checkpoint(50, math.inf),
        Checkpoint(60, -math.inf),
        Checkpoint(20, 0.9),  # step 20 evaluated again: its last evaluation counts
    ]
    up = rank_checkpoints(evaluated, greater_is_better=True)
    assert [(c.step, c.score) for c in up] == [(20, 0.9), (10, 0.5), (30, 0.5)]
    down = rank_checkpoints(evaluated, greater_is_better=False)
    assert [(c.step, c.score) for c in down] == [(10, 0.5), (30, 0.5), (20, 0.9)]
    assert [c.step for c in rank_checkpoints(evaluated, False, keep=2)] == [10, 30]
    assert [c.step for c in rank_checkpoints(evaluated, True, keep=1)] == [20]
    assert rank_checkpoints([Checkpoint(5, math.nan)], True) == [] and rank_checkpoints([], True, keep=2) == []
    # The callback's use: the kept ones, then the new one; a tie keeps the kept one first.
    kept = rank_checkpoints([Checkpoint(10, 0.5), Checkpoint(30, 0.4)], True, keep=2)
    assert [c.step for c in rank_checkpoints([*kept, Checkpoint(40, 0.5)], True, keep=2)] == [10, 40]


def test_choose_exme_falls_back_to_all_with_a_warning_and_never_picks_baselines(caplog):
    sft1 = Candidate("sft", (1.0, 0.0), (40, None), score=0.5)
    sft2 = Candidate("sft", (0.0, 1.0), (None, 30), score=0.4)
    expo = Candidate("expo", (1.2, 0.0), (40, None), hyper={"alpha1": 0.2}, score=0.6)
    failed = Candidate("exme", (0.6, 0.4), (40, 30), score=math.nan, error="non-finite score nan")
    baselines = [
        Candidate("weighted", (0.5, 0.5), (40, 30), hyper={"lambda": 0.5}, score=0.99),
        Candidate("ties", None, (40, 30), hyper={"density": 0.5}, score=0.98),
        Candidate("dare", None, (40, 30), hyper={"density": 0.5}, score=0.97),
        Candidate("base", (0.0, 0.0), score=0.96),
    ]
    candidates = [sft1, sft2, expo, failed, *baselines]
    with caplog.at_level(logging.WARNING, logger="exme_callback.candidates"):
        assert choose(candidates, greater_is_better=True, choose_from="exme") is expo
    assert "no ExMe merge was scored" in caplog.text and "choosing among all" in caplog.text
    assert choose(candidates, greater_is_better=True) is expo
    assert choose(candidates, greater_is_better=False) is sft2
    merge = Candidate("exme", (0.5, 0.5), (40, 30), score=0.1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exme_callback.candidates"):
        assert choose([*candidates, merge], greater_is_better=True, choose_from="exme") is merge
    assert caplog.text == ""
    # Nothing valid: the first checkpoint is kept.
    invalid = [Candidate(c.kind, c.coefficients, c.steps, score=math.nan) for c in (sft1, sft2, expo)]
    assert choose(invalid, greater_is_better=True) is invalid[0]
    with pytest.raises(ValueError, match="`choose_from` must be one of .*got 'best'"):
        choose(candidates, True, choose_from="best")


def test_candidate_to_dict_and_from_dict_round_trip_with_flat_keys():
    merge = Candidate(
        "exme",
        (0.36, 0.98),
        (40, 30),
        hyper={"alpha1": 0.2, "alpha2": 0.4, "beta": 0.3},
        score=0.7,
        metrics={"eval_accuracy": 0.7},
        heldout_score=0.6,
        heldout_metrics={"heldout": 0.6},
    )
    data = merge.to_dict()
    flat = {"c1": 0.36, "c2": 0.98, "step1": 40, "step2": 30, "alpha1": 0.2, "alpha2": 0.4, "beta": 0.3}
    assert {key: data[key] for key in flat} == flat
    assert data["coefficients"] == [0.36, 0.98] and data["steps"] == [40, 30]
    assert Candidate.from_dict(data) == merge
    assert Candidate.from_dict(json.loads(json.dumps(data))) == merge  # through the report's JSON

    expo = Candidate("expo", (0.0, 1.3), (None, 30), hyper={"alpha2": 0.3}, score=0.5)
    flat = {"c1": 0.0, "c2": 1.3, "step1": None, "step2": 30, "alpha1": None, "alpha2": 0.3, "beta": None}
    assert {key: expo.to_dict()[key] for key in flat} == flat
    assert Candidate.from_dict(json.loads(json.dumps(expo.to_dict()))) == expo

    ties = Candidate("ties", None, (40, 30), hyper={"density": 0.5}, score=0.4)
    assert (ties.to_dict()["c1"], ties.to_dict()["c2"], ties.to_dict()["coefficients"]) == (None, None, None)
    assert Candidate.from_dict(json.loads(json.dumps(ties.to_dict()))) == ties

    three = Candidate("exme", (0.2, 0.3, 0.5), (40, 30, 20), score=0.1)
    assert (three.to_dict()["c3"], three.to_dict()["step3"]) == (0.5, 20)
    assert Candidate.from_dict(three.to_dict()) == three


def test_min_gain_keeps_the_best_checkpoint_unless_a_candidate_clears_it():
    sft = [Candidate("sft", (1.0, 0.0), score=0.70), Candidate("sft", (0.0, 1.0), score=0.60)]
    expo = Candidate("expo", (1.2, 0.0), score=0.74, interval=(-0.01, 0.09))  # the argmax, within the noise
    exme = Candidate("exme", (0.6, 0.5), score=0.73, interval=(0.01, 0.05))  # smaller, but clear of it
    candidates = [*sft, expo, exme]
    assert choose(candidates, True) is expo  # the paper's argmax
    assert choose(candidates, True, min_gain=0.0) is expo
    assert choose(candidates, True, min_gain=0.035) is expo  # gains 0.04 and 0.03
    assert choose(candidates, True, min_gain=0.05) is sft[0]
    assert choose(candidates, True, min_gain="significant") is exme
    assert choose(candidates, True, "exme", min_gain="significant") is exme
    exme.interval = (-0.02, 0.05)
    assert choose(candidates, True, min_gain="significant") is sft[0]
    assert choose(candidates, True, "exme", min_gain="significant") is sft[0]  # nothing clears: the checkpoint
    # Lower is better: a gain is a decrease.
    losses = [Candidate("sft", (1.0, 0.0), score=1.0), Candidate("expo", (1.1, 0.0), score=0.9)]
    assert choose(losses, False, min_gain=0.05) is losses[1]
    assert choose(losses, False, min_gain=0.2) is losses[0]


def test_set_intervals_gives_each_scored_candidate_its_gain_over_the_reference():
    reference = Candidate("sft", (1, 0), score=0.5, items={"acc": [1.0, 0.0, 1.0, 0.0]})
    shifted = Candidate("exme", (0.5, 0.5), score=0.7, items={"acc": [1.2, 0.2, 1.2, 0.2]})  # +0.2 on every item
    noisy = Candidate("expo", (1.1, 0), score=0.75, items={"acc": [1.0, 1.0, 1.0, 0.0]})
    aggregate = Candidate("exme", (0.4, 0.6), score=0.6)  # no per-item scores: no interval
    reference.heldout_score, reference.heldout_items = 0.5, {"acc": [0.0, 1.0]}
    shifted.heldout_score, shifted.heldout_items = 1.0, {"acc": [1.0, 1.0]}
    set_intervals([reference, shifted, noisy, aggregate], reference, {"acc": 1.0}, level=0.9, seed=3)
    assert shifted.interval == pytest.approx((0.2, 0.2))  # every paired difference is the gain
    assert noisy.interval == gain_interval(noisy.items, reference.items, {"acc": 1.0}, 0.9, seed=3)
    assert reference.interval is None and aggregate.interval is None and shifted.heldout_interval is None
    set_intervals([reference, shifted], reference, {"acc": 1.0}, level=0.9, seed=3, heldout=True)
    assert shifted.heldout_interval == gain_interval(
        shifted.heldout_items, reference.heldout_items, {"acc": 1.0}, 0.9, seed=3
    )
    set_intervals([noisy], None, {"acc": 1.0})  # no reference: nothing to compare with
