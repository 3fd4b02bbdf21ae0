import json
import math

import pytest
import torch

from exme_callback.search import (
    Candidate,
    Checkpoint,
    best,
    choose,
    count_baselines,
    count_candidates,
    exme_coefficients,
    is_better,
    sweep,
    sweep_baselines,
    validate_grid,
)


def quadratic(target=(1.7, 0.4)):
    """A score with a known maximum on the plane: -(c1 - t1)^2 - (c2 - t2)^2."""

    def score(candidate: Candidate) -> Candidate:
        candidate.score = -((candidate.c1 - target[0]) ** 2) - (candidate.c2 - target[1]) ** 2
        return candidate

    return score


def checkpoints():
    return [Checkpoint(40, -0.5, {"m": 1.0}), Checkpoint(30, -0.6)]


def test_sweep_order_coefficients_and_best_alphas():
    results = sweep(quadratic(), checkpoints(), alphas=(0.1, 0.3, 0.5), betas=(0.25, 0.75), greater_is_better=True)
    assert [c.kind for c in results] == ["sft", "sft"] + ["expo"] * 6 + ["exme"] * 2
    sft1, sft2 = results[:2]
    assert (sft1.c1, sft1.c2, sft1.step1, sft1.score, sft1.metrics) == (1.0, 0.0, 40, -0.5, {"m": 1.0})
    assert (sft2.c1, sft2.c2, sft2.step2, sft2.score) == (0.0, 1.0, 30, -0.6)
    assert [(c.c1, c.c2) for c in results[2:5]] == [(1.1, 0.0), (1.3, 0.0), (1.5, 0.0)]
    assert [(c.c1, c.c2) for c in results[5:8]] == [(0.0, 1.1), (0.0, 1.3), (0.0, 1.5)]
    # Each EXPO's best alpha on its own axis: c1 = 1.5 is nearest 1.7, c2 = 1.1 nearest 0.4.
    merges = results[8:]
    assert all((m.alpha1, m.alpha2, m.step1, m.step2) == (0.5, 0.1, 40, 30) for m in merges)
    assert [m.beta for m in merges] == [0.25, 0.75]
    assert (merges[0].c1, merges[0].c2) == pytest.approx((0.25 * 1.5, 0.75 * 1.1))


def test_sweep_with_one_checkpoint_is_expo_only():
    calls = []

    def score(candidate):
        calls.append((candidate.c1, candidate.c2))
        return quadratic()(candidate)

    results = sweep(score, checkpoints()[:1], alphas=(0.2,), betas=(0.5,))
    assert calls == [(1.2, 0.0)]  # the checkpoint keeps its training score
    assert [c.kind for c in results] == ["sft", "expo"] and results[0].score == -0.5
    assert count_candidates(1, (0.2,), (0.5,)) == len(calls)
    assert count_candidates(2, (0.1, 0.2), (0.5,) * 3) == 7


@pytest.mark.parametrize("n", [1, 2])
def test_baselines_on_their_grids_and_counted(n):
    results = sweep_baselines(lambda c: c, checkpoints()[:n], lambdas=(0.25, 0.75), densities=(0.5,))
    assert len(results) == count_baselines(n, (0.25, 0.75), (0.5,)) == (0 if n == 1 else 4)
    if n == 2:
        assert [(c.kind, c.c1, c.c2) for c in results[:2]] == [("weighted", 0.25, 0.75), ("weighted", 0.75, 0.25)]
        assert [(c.kind, c.hyper) for c in results[2:]] == [("ties", {"density": 0.5}), ("dare", {"density": 0.5})]


def test_non_finite_alpha_scores_fall_back_to_the_checkpoint():
    def score(candidate):
        candidate.score = math.nan if candidate.kind == "expo" and candidate.c1 > 0 else -candidate.c2
        if not math.isfinite(candidate.score):
            candidate.error = "non-finite score nan"
        return candidate

    results = sweep(score, checkpoints(), alphas=(0.1, 0.2), betas=(0.5,), greater_is_better=True)
    merge = results[-1]
    assert (merge.alpha1, merge.alpha2) == (0.0, 0.1)


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


def test_exme_coefficients():
    assert exme_coefficients(0.2, 0.4, 0.3) == pytest.approx((0.36, 0.98))
    assert exme_coefficients(0.0, 0.0, 1.0) == (1.0, 0.0)


def test_validate_grid():
    assert validate_grid("alphas", [0, 0.5], low=0.0) == (0.0, 0.5)
    for bad in ([], [math.inf], [True], ["0.1"], [0.2, 0.2]):
        with pytest.raises(ValueError, match="`alphas`"):
            validate_grid("alphas", bad, low=0.0)
    with pytest.raises(TypeError, match="`betas` must be a sequence"):
        validate_grid("betas", 0.5, low=0.0, high=1.0)
    with pytest.raises(ValueError, match="sweep needs one or two checkpoints"):
        sweep(quadratic(), [])


def test_rank_checkpoints_direction_ties_reevaluation_non_finite_and_keep():
    from exme_callback.search import rank_checkpoints

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
    import logging

    from exme_callback.search import choose

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
    with caplog.at_level(logging.WARNING, logger="exme_callback.search"):
        assert choose(candidates, greater_is_better=True, choose_from="exme") is expo
    assert "no ExMe merge was scored" in caplog.text and "choosing among all" in caplog.text
    assert choose(candidates, greater_is_better=True) is expo
    assert choose(candidates, greater_is_better=False) is sft2
    merge = Candidate("exme", (0.5, 0.5), (40, 30), score=0.1)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="exme_callback.search"):
        assert choose([*candidates, merge], greater_is_better=True, choose_from="exme") is merge
    assert caplog.text == ""
    # Nothing valid: the first checkpoint is kept.
    invalid = [Candidate(c.kind, c.coefficients, c.steps, score=math.nan) for c in (sft1, sft2, expo)]
    assert choose(invalid, greater_is_better=True) is invalid[0]
    with pytest.raises(ValueError, match="`choose_from` must be one of .*got 'best'"):
        choose(candidates, True, choose_from="best")


def test_candidate_to_dict_and_from_dict_round_trip_with_flat_keys():
    import json

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


# ---- the other strategies: M^3 and Top-k greedy merging ----------------------------------------------------------

from exme_callback.search import SearchSettings, mixup_draws, sweep_mixup, topk_greedy  # noqa: E402


@pytest.mark.parametrize("a", [0.5, 2.0])
def test_mixup_draws_are_seeded_and_follow_beta(a):
    draws = mixup_draws(a, 20000, seed=3)
    assert draws == mixup_draws(a, 20000, seed=3) and draws != mixup_draws(a, 20000, seed=4)
    mean = sum(draws) / len(draws)
    variance = sum((x - mean) ** 2 for x in draws) / len(draws)
    assert mean == pytest.approx(0.5, abs=0.01)
    assert variance == pytest.approx(1 / (4 * (2 * a + 1)), rel=0.05)  # Var of Beta(a, a)
    # Beta(a, a)'s mass in the middle third, by a Riemann sum of its density
    grid = [i / 10000 for i in range(1, 10000)]
    density = [(x * (1 - x)) ** (a - 1) for x in grid]
    middle = sum(d for x, d in zip(grid, density) if 1 / 3 <= x <= 2 / 3) / sum(density)
    assert sum(1 / 3 <= x <= 2 / 3 for x in draws) / len(draws) == pytest.approx(middle, abs=0.01)


def test_sweep_mixup_points_and_dare_candidates():
    results = sweep_mixup(lambda c: c, checkpoints(), (0.3, 0.8))
    assert [(c.kind, c.coefficients, c.hyper) for c in results] == [
        ("mixup", (0.3, 0.7), {"lambda": 0.3}),
        ("mixup", (0.8, pytest.approx(0.2)), {"lambda": 0.8}),
    ]
    sparse = sweep_mixup(lambda c: c, checkpoints(), (0.3,), density=0.5)
    assert sparse[0].coefficients is None and sparse[0].hyper == {"lambda": 0.3, "density": 0.5}
    assert sparse[0].steps == (40, 30)


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_topk_greedy_reaches_a_known_optimum_explores_and_stops():
    target = (0.5, 0.0, 0.5)  # the midpoint of the first and third checkpoints

    def score(candidate):
        candidate.score = -sum((x - t) ** 2 for x, t in zip(candidate.coefficients, target))
        return candidate

    kept = [Checkpoint(10, -0.5), Checkpoint(20, -1.5), Checkpoint(30, -0.5)]
    results = topk_greedy(score, kept, cosine, k=2, greater_is_better=True)
    merges = results[3:]
    # Generation 1 merges the two best (steps 10 and 30): the optimum.
    assert merges[0].coefficients == target and merges[0].score == 0.0 and merges[0].parents == (0, 2)
    assert merges[0].hyper["generation"] == 1 and merges[0].hyper["kinship"] == 0.0
    # Generation 2 merges the two best again, gains nothing, explores with the least related (step 20), and stops.
    assert [m.hyper["generation"] for m in merges[1:]] == [2, 2]
    assert merges[1].parents == (3, 0) and "exploration" not in merges[1].hyper
    assert merges[2].parents == (3, 1) and merges[2].hyper["exploration"] == 1
    assert max(results, key=lambda c: c.score) is merges[0]
    assert len(topk_greedy(score, kept, cosine, k=2, budget=1, greater_is_better=True)) == 4  # the budget


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"top_k": 1}, "`top_k` must be an integer >= 2"),
        ({"kinship_threshold": 1.5}, r"`kinship_threshold` must be in \[-1.0, 1.0\]"),
        ({"kinship_metric": "euclidean", "kinship_threshold": -1.0}, r"must be in \[0.0, inf\]"),
        ({"mixup_a": 0.0}, "`mixup_a`"),
        ({"mixup_draws": 0}, "`mixup_draws` must be an integer >= 1"),
        ({"dare": 0.0}, r"`dare` \(the density kept\) must be in \(0, 1\]"),
        ({"dare": 1.5}, "`dare`"),
        ({"strategy": "evolve"}, "`strategy` must be one of"),
        ({"partner": "random"}, "`partner` must be one of"),
        ({"budget": 0}, "`budget` must be an integer >= 1"),
        ({"partner": "kinship"}, "set `top_k` >= 3"),
        ({"confidence": 1.0}, r"`confidence` must be a number in \(0, 1\)"),
        ({"confidence": "95%"}, "`confidence`"),
        ({"min_gain": -0.01}, "`min_gain` must be a number >= 0"),
        ({"min_gain": "noise"}, "or 'significant'"),
        ({"min_gain": float("inf")}, "`min_gain`"),
    ],
)
def test_bad_search_settings_are_refused_naming_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SearchSettings(**kwargs)


def test_topk_greedy_explores_with_the_farthest_model_for_a_distance():
    target = (0.5, 0.0, 0.5)

    def score(candidate):
        candidate.score = -sum((x - t) ** 2 for x, t in zip(candidate.coefficients, target))
        return candidate

    def distance(a, b):
        return math.dist(a, b)

    kept = [Checkpoint(10, -0.5), Checkpoint(20, -1.5), Checkpoint(30, -0.5)]
    results = topk_greedy(score, kept, distance, k=2, greater_is_better=True, distance=True)
    explored = [c for c in results if c.hyper.get("exploration")]
    assert [c.parents for c in explored] == [(3, 1)]  # the farthest from the best: step 20, at distance 1.22
    assert explored[0].hyper["kinship"] == pytest.approx(math.dist((0.5, 0.0, 0.5), (0.0, 1.0, 0.0)))


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


def bernoulli_scorer(accuracies, n=400, seed=0):
    """Per-item 0/1 scores of candidates with known accuracies; item i is solved by every candidate whose accuracy
    exceeds its difficulty `u_i` (shared by all: the comparisons are paired)."""
    difficulty = torch.rand(n, generator=torch.Generator().manual_seed(seed)).tolist()
    calls = []

    def evaluate(candidate, request):
        calls.append((candidate.hyper["beta"], {g: list(v) for g, v in request.items()}))
        p = accuracies[candidate.hyper["beta"]]
        return {"acc": [float(difficulty[i] < p) for i in request["acc"]]}

    return evaluate, calls


def test_racing_finds_the_known_best_with_fewer_item_evaluations():
    from exme_callback.search import Racing

    accuracies = {0.1: 0.50, 0.2: 0.60, 0.3: 0.70, 0.4: 0.78, 0.5: 0.80, 0.6: 0.74, 0.7: 0.65, 0.8: 0.55, 0.9: 0.45}
    evaluate, calls = bernoulli_scorer(accuracies)
    mean = lambda metrics: metrics["acc"]  # noqa: E731
    race = Racing(evaluate, {"acc": 400}, mean, {"acc": 1.0}, greater_is_better=True, level=0.95, seed=0)
    group = [Candidate("exme", (b, 1 - b), hyper={"beta": b}) for b in accuracies]
    race(group)

    winner = best(group, True)
    assert winner.hyper["beta"] == 0.5 and winner.score == pytest.approx(0.80, abs=0.03)
    assert race.item_evaluations < len(group) * 400 / 2  # at least 2x fewer than the grid
    stopped = [c for c in group if not c.valid]
    assert {c.hyper["beta"] for c in stopped} >= {0.1, 0.2, 0.8, 0.9}  # the clearly worse stop early
    assert all(c.error.startswith("stopped by racing after") and not c.items for c in stopped)

    # Every round scores every candidate still racing on the same items: a candidate is never dropped on items
    # the leader was not scored on.
    rounds = {}
    for beta, request in calls:
        rounds.setdefault(json.dumps(request), set()).add(beta)
    assert len(rounds) == 4 and all(0.5 in betas for betas in rounds.values())
    # The survivors are scored on every item, back in the items' own order: the grid's scores, exactly.
    grid, _ = bernoulli_scorer(accuracies)
    for candidate in group:
        if candidate.valid:
            assert candidate.items["acc"] == grid(candidate, {"acc": list(range(400))})["acc"]
            assert candidate.score == pytest.approx(sum(candidate.items["acc"]) / 400)


def test_racing_needs_the_exme_strategy():
    with pytest.raises(ValueError, match="`search='racing'` races the ExMe strategy's stages"):
        SearchSettings(strategy="mixup", search="racing")
    with pytest.raises(ValueError, match="`search` must be one of"):
        SearchSettings(search="bandit")


def test_bracketing_stops_a_line_once_the_score_falls_clearly():
    from exme_callback.search import Racing

    accuracies = {0.1: 0.70, 0.2: 0.85, 0.3: 0.50, 0.4: 0.30, 0.5: 0.20}  # rises, then falls
    evaluate, calls = bernoulli_scorer(accuracies)
    race = Racing(evaluate, {"acc": 400}, lambda m: m["acc"], {"acc": 1.0}, greater_is_better=True)
    group = [Candidate("exme", (1.0 + b, 0.0), hyper={"beta": b}) for b in accuracies]
    race(group, line=True)
    assert best(group, True).hyper["beta"] == 0.2
    assert {beta for beta, _ in calls} == {0.1, 0.2, 0.3}  # 0.3 falls clearly below 0.2: 0.4, 0.5 never scored
    assert [c.error for c in group[3:]] == ["not scored: bracketing stopped the line at beta=0.3"] * 2
