import json
import math

import pytest
import torch

from exme_callback.candidates import Candidate, Checkpoint, best
from exme_callback.strategies import (
    RACING_ROUNDS,
    Baselines,
    ExMe,
    Mixup,
    Noise,
    Racing,
    TopkGreedy,
    exme_coefficients,
    mixup_draws,
    racing_rounds,
    run_strategy,
    scored_alphas,
    walk_line,
)


def sweep(score, kept, alphas, betas, greater_is_better=False):
    """The ExMe strategy run with `score` standing for the live model's evaluation."""
    return run_strategy(ExMe(alphas, betas), kept, score, greater_is_better)


def topk_greedy(score, kept, kinship, k=2, budget=None, greater_is_better=False, distance=False):
    metric = "euclidean" if distance else "pearson"
    strategy = TopkGreedy(k, budget, metric)
    return run_strategy(strategy, kept, score, greater_is_better, kinship=lambda a, b, _: kinship(a, b))


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
    assert ExMe((0.2,), (0.5,)).evaluations(1) == len(calls)
    assert ExMe((0.1, 0.2), (0.5, 0.6, 0.7)).evaluations(2) == 7


@pytest.mark.parametrize("n", [1, 2])
def test_baselines_on_their_grids_and_counted(n):
    baselines = Baselines(lambdas=(0.25, 0.75), densities=(0.5,))
    results = run_strategy(baselines, checkpoints()[:n], lambda c: c)[n:]
    assert len(results) == baselines.evaluations(n) == (0 if n == 1 else 4)
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


def test_a_search_needs_a_checkpoint():
    with pytest.raises(ValueError, match="needs at least one kept checkpoint"):
        sweep(quadratic(), [], (0.1,), (0.5,))


def test_exme_coefficients():
    assert exme_coefficients(0.2, 0.4, 0.3) == pytest.approx((0.36, 0.98))
    assert exme_coefficients(0.0, 0.0, 1.0) == (1.0, 0.0)


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
    middle = sum(d for x, d in zip(grid, density, strict=True) if 1 / 3 <= x <= 2 / 3) / sum(density)
    assert sum(1 / 3 <= x <= 2 / 3 for x in draws) / len(draws) == pytest.approx(middle, abs=0.01)


def test_sweep_mixup_points_and_dare_candidates():
    (a, b) = mixup_draws(2.0, 2, seed=5)
    results = run_strategy(Mixup(2.0, 2, seed=5), checkpoints(), lambda c: c)[2:]
    assert [(c.kind, c.coefficients, c.hyper) for c in results] == [
        ("mixup", (a, pytest.approx(1 - a)), {"lambda": a}),
        ("mixup", (b, pytest.approx(1 - b)), {"lambda": b}),
    ]
    sparse = run_strategy(Mixup(2.0, 1, seed=5, density=0.5), checkpoints(), lambda c: c)[2:]
    assert sparse[0].coefficients is None and sparse[0].hyper == {"lambda": a, "density": 0.5}
    assert sparse[0].steps == (40, 30)
    merge = sparse[0].merge
    assert (merge.method, merge.checkpoints, merge.weights, merge.density, merge.seed) == (
        "dare",
        (0, 1),
        (a, 1 - a),
        0.5,
        5,
    )


def cosine(a, b):
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    return dot / math.sqrt(sum(x * x for x in a) * sum(y * y for y in b))


def test_topk_greedy_reaches_a_known_optimum_explores_and_stops():
    target = (0.5, 0.0, 0.5)  # the midpoint of the first and third checkpoints

    def score(candidate):
        candidate.score = -sum((x - t) ** 2 for x, t in zip(candidate.coefficients, target, strict=True))
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


def test_topk_greedy_explores_with_the_farthest_model_for_a_distance():
    target = (0.5, 0.0, 0.5)

    def score(candidate):
        candidate.score = -sum((x - t) ** 2 for x, t in zip(candidate.coefficients, target, strict=True))
        return candidate

    def distance(a, b):
        return math.dist(a, b)

    kept = [Checkpoint(10, -0.5), Checkpoint(20, -1.5), Checkpoint(30, -0.5)]
    results = topk_greedy(score, kept, distance, k=2, greater_is_better=True, distance=True)
    explored = [c for c in results if c.hyper.get("exploration")]
    assert [c.parents for c in explored] == [(3, 1)]  # the farthest from the best: step 20, at distance 1.22
    assert explored[0].hyper["kinship"] == pytest.approx(math.dist((0.5, 0.0, 0.5), (0.0, 1.0, 0.0)))


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
    assert len(rounds) == 3 and all(0.5 in betas for betas in rounds.values())  # 50 items are too few a round
    # The survivors are scored on every item, back in the items' own order: the grid's scores, exactly.
    grid, _ = bernoulli_scorer(accuracies)
    for candidate in group:
        if candidate.valid:
            assert candidate.items["acc"] == grid(candidate, {"acc": list(range(400))})["acc"]
            assert candidate.score == pytest.approx(sum(candidate.items["acc"]) / 400)


def test_a_racing_margin_stops_the_candidates_tied_with_the_leader():
    """Candidates near one another (0.78, 0.79, 0.80) with unpaired item noise: 400 items cannot tell them apart, so
    without a margin all three are scored on every item; with a margin of 0.1 the two that cannot beat the leader by
    more than 0.1 stop after the first round, and the survivor's score is its grid score."""
    accuracies = {0.1: 0.55, 0.3: 0.78, 0.5: 0.80, 0.7: 0.79, 0.9: 0.60}

    def evaluate(candidate, request):
        beta = candidate.hyper["beta"]
        difficulty = torch.rand(400, generator=torch.Generator().manual_seed(round(10 * beta))).tolist()
        return {"acc": [float(u < accuracies[beta]) for u in (difficulty[i] for i in request["acc"])]}

    races = {}
    for margin in (0.0, 0.1):
        race = Racing(evaluate, {"acc": 400}, lambda m: m["acc"], {"acc": 1.0}, greater_is_better=True, margin=margin)
        group = [Candidate("exme", (b, 1 - b), hyper={"beta": b}) for b in accuracies]
        race(group)
        races[margin] = race, group
    race, group = races[0.0]
    assert [c.valid for c in group] == [False, True, True, True, False]  # the tied three go to the end
    assert race.item_evaluations == 2 * 100 + 3 * 400
    grid = {c.hyper["beta"]: c.score for c in group if c.valid}
    race, group = races[0.1]
    survivors = [c for c in group if c.valid]
    assert len(survivors) == 1 and survivors[0].hyper["beta"] in (0.3, 0.5, 0.7)
    assert survivors[0].score == grid[survivors[0].hyper["beta"]]
    assert race.item_evaluations == 4 * 100 + 400
    stopped = [c.error for c in group if not c.valid]
    assert all(e == "stopped by racing after 100 of 400 items: not above the leader by more than 0.1" for e in stopped)


def test_rounds_of_too_few_items_are_skipped():
    assert racing_rounds({"acc": 400}) == [0.25, 0.5, 1.0]  # the first round would score 50 items
    assert racing_rounds({"a": 256, "b": 256}) == [0.125, 0.25, 0.5, 1.0]  # 32 + 32 items
    assert racing_rounds({"a": 64, "b": 64}) == [0.5, 1.0] and racing_rounds({"acc": 100}) == [1.0]
    assert racing_rounds({"acc": 400}, min_items=1) == list(RACING_ROUNDS)


def test_mixup_draws_are_one_stage_raced():
    lambdas = mixup_draws(2.0, 9, seed=0)
    accuracies = {lam: 0.8 - 1.5 * (lam - 0.5) ** 2 for lam in lambdas}  # best at the draw nearest 0.5
    calls = []

    def evaluate(candidate, request):
        calls.append(candidate.hyper["lambda"])
        p, difficulty = (
            accuracies[candidate.hyper["lambda"]],
            torch.rand(400, generator=torch.Generator().manual_seed(1)),
        )
        return {"acc": [float(difficulty[i] < p) for i in request["acc"]]}

    race = Racing(evaluate, {"acc": 400}, lambda m: m["acc"], {"acc": 1.0}, greater_is_better=True)
    kept = [Checkpoint(10, score=0.6), Checkpoint(20, score=0.5)]
    scored = run_strategy(Mixup(draws=9), kept, lambda c: c, greater_is_better=True, race=race)
    draws = scored[2:]
    assert [c.hyper["lambda"] for c in draws] == list(lambdas)
    nearest = min(lambdas, key=lambda lam: abs(lam - 0.5))
    assert best(draws, True).hyper["lambda"] == nearest
    assert race.item_evaluations < 9 * 400 and any(c.error and "stopped by racing" in c.error for c in draws)
    assert sorted(set(calls)) == sorted(lambdas)  # every draw scored on the first round


def test_bracketing_stops_a_line_once_the_score_falls_clearly():
    accuracies = {0.1: 0.70, 0.2: 0.85, 0.3: 0.50, 0.4: 0.30, 0.5: 0.20}  # rises, then falls
    evaluate, calls = bernoulli_scorer(accuracies)
    race = Racing(evaluate, {"acc": 400}, lambda m: m["acc"], {"acc": 1.0}, greater_is_better=True)
    group = [Candidate("exme", (1.0 + b, 0.0), hyper={"beta": b}) for b in accuracies]
    race(group, line=True)
    assert best(group, True).hyper["beta"] == 0.2
    assert {beta for beta, _ in calls} == {0.1, 0.2, 0.3}  # 0.3 falls clearly below 0.2: 0.4, 0.5 never scored
    assert [c.error for c in group[3:]] == ["not scored: bracketing stopped the line at beta=0.3"] * 2


def test_a_line_stops_at_its_first_clear_fall_and_extends_only_while_clearly_rising():
    heights = {0.1: 1.0, 0.2: 3.0, 0.3: 2.0, 0.4: 4.0, 0.5: 5.0, 0.6: 6.0, 0.8: 6.0, 1.0: 9.0}
    line = [Candidate("expo", (1.0 + a,), hyper={"alpha1": a}) for a in heights]
    calls = []

    def score(candidate):
        calls.append(candidate.alpha1)
        candidate.score = heights[candidate.alpha1]

    noise = Noise(greater_is_better=True)
    assert walk_line(line, score, noise, grid=5, bracket=False) == 7  # 0.8 only ties 0.6: 1.0 is never scored
    assert calls == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8]
    calls.clear()
    assert walk_line(line, score, noise, grid=5) == 3 and calls == [0.1, 0.2, 0.3]  # 0.3 falls below 0.2
    calls.clear()
    assert walk_line(line, score, Noise(greater_is_better=False), grid=2, bracket=False) == 2  # a loss: 0.2 fell


def test_noise_is_the_gain_interval_with_items_and_the_score_difference_without():
    a = Candidate("expo", (1.1,), score=0.75, items={"acc": [1.0, 1.0, 0.0, 1.0] * 50})
    b = Candidate("expo", (1.2,), score=0.5, items={"acc": [1.0, 0.0, 0.0, 1.0] * 50})
    noisy = Candidate("expo", (1.3,), score=0.76, items={"acc": [1.0, 1.0, 1.0, 0.0] * 50})
    with_items = Noise(True, {"acc": 1.0})
    assert (with_items.compare(a, b), with_items.compare(b, a)) == (1, -1) and with_items.clearly_below(b, a)
    assert with_items.compare(noisy, a) == 0 and not with_items.clearly_below(noisy, a)  # a gain in the noise
    low, high = with_items.gain(noisy, a)
    assert with_items.clearly_below(noisy, a, margin=high + 1e-9) and not with_items.clearly_below(noisy, a, high)
    without = Noise(True)  # no weights: the scores decide, any difference is clear
    assert without.compare(noisy, a) == 1 and without.gain(noisy, a) == pytest.approx((0.01, 0.01))
    assert without.clearly_below(Candidate("expo", (1.4,), score=math.nan, error="non-finite"), a)


# ---- alphas="auto": a line that follows the score ---------------------------------------------------------------

LINE1 = {0.1: 0.50, 0.2: 0.55, 0.3: 0.60, 0.4: 0.65, 0.5: 0.70, 0.6: 0.75, 0.8: 0.80, 1.0: 0.85, 1.5: 0.60, 2.0: 0.4}
LINE2 = {0.1: 0.60, 0.2: 0.65, 0.3: 0.62, 0.4: 0.55, 0.5: 0.50}  # its peak is inside the grid


def accuracy(candidate, line1=LINE1):
    """Known accuracies: EXPO-1's peak at alpha = 1.0, beyond the default grid; EXPO-2's at 0.2; merges by beta."""
    if "beta" in candidate.hyper:
        return 0.5 + 0.1 * candidate.beta
    return line1[candidate.alpha1] if "alpha1" in candidate.hyper else LINE2[candidate.alpha2]


def accuracy_scorer(items=True, n=400, line1=LINE1):
    """0/1 scores of `n` items of evenly spread difficulties, item j solved when its difficulty is below the
    accuracy (shared by all candidates: the comparisons are paired); with `items=False` only their mean."""
    difficulty = [(j + 0.5) / n for j in range(n)]
    calls = []

    def score(candidate):
        calls.append(dict(candidate.hyper))
        solved = [float(u < accuracy(candidate, line1)) for u in difficulty]
        candidate.score, candidate.items = sum(solved) / n, ({"acc": solved} if items else {})
        return candidate

    return score, calls


def auto_sweep(score, **search):
    kept = [Checkpoint(40, 0.45, items={"acc": [1.0] * 180 + [0.0] * 220}), Checkpoint(30, 0.40)]
    return run_strategy(ExMe("auto"), kept, score, True, weights={"acc": 1.0}, **search)


@pytest.mark.parametrize("items", [True, False], ids=["per-item", "aggregate"])
def test_auto_alphas_follow_the_score_past_the_grid_and_stop_at_the_first_clear_fall(items):
    score, calls = accuracy_scorer(items)
    results = auto_sweep(score)
    line1 = [c.alpha1 for c in results if c.kind == "expo" and "alpha1" in c.hyper]
    line2 = [c.alpha2 for c in results if c.kind == "expo" and "alpha2" in c.hyper]
    assert line1 == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5]  # 1.5 falls clearly: 2.0 is never scored
    assert line2 == [0.1, 0.2, 0.3, 0.4, 0.5]  # the grid's last point fell: no extension
    assert len(calls) == 9 + 5 + 9 and ExMe("auto").evaluations(2) is None
    merges = [c for c in results if c.kind == "exme"]
    assert {(m.alpha1, m.alpha2) for m in merges} == {(1.0, 0.2)}  # the optimum beyond the grid is reached
    assert scored_alphas(results) == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5)
    grid = run_strategy(ExMe(), [Checkpoint(40, 0.45), Checkpoint(30, 0.40)], accuracy_scorer(items)[0], True)
    assert best([c for c in grid if c.kind == "expo"], True).alpha1 == 0.5 and len(grid) == 2 + 19  # the edge


def test_auto_alphas_stop_at_a_rise_within_the_noise_of_the_items():
    plateau = {**LINE1, 0.6: 0.7025}  # one item more than 0.5: a gain, but not more than the noise of 400 items
    with_items, calls = accuracy_scorer(line1=plateau)
    line1 = [c.alpha1 for c in auto_sweep(with_items) if c.kind == "expo" and "alpha1" in c.hyper]
    assert line1 == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6] and len(calls) == 6 + 5 + 9
    aggregate, calls = accuracy_scorer(items=False, line1=plateau)  # without items any gain goes on
    line1 = [c.alpha1 for c in auto_sweep(aggregate) if c.kind == "expo" and "alpha1" in c.hyper]
    assert line1 == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5] and len(calls) == 9 + 5 + 9


def test_racing_with_auto_alphas_brackets_and_extends_the_same_line():
    n = 2000  # the first round's eighth of the items (250) sees the 0.05 steps of LINE1 clearly
    difficulty = [(j + 0.5) / n for j in range(n)]
    calls = []

    def evaluate(candidate, request):
        calls.append(dict(candidate.hyper))
        return {"acc": [float(difficulty[i] < accuracy(candidate)) for i in request["acc"]]}

    race = Racing(evaluate, {"acc": n}, lambda m: m["acc"], {"acc": 1.0}, greater_is_better=True)
    results = auto_sweep(lambda c: c, race=race)
    line1 = [c for c in results if c.kind == "expo" and "alpha1" in c.hyper]
    line2 = [c for c in results if c.kind == "expo" and "alpha2" in c.hyper]
    assert [c.alpha1 for c in line1] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5]
    assert best(line1, True).alpha1 == 1.0 and best(line1, True).score == pytest.approx(0.85)
    # EXPO-2 falls clearly at 0.3 in the first round: 0.4 and 0.5 are never scored, nor is the line extended.
    assert [c.error for c in line2[3:]] == ["not scored: bracketing stopped the line at alpha2=0.3"] * 2
    assert {c["alpha2"] for c in calls if "alpha2" in c} == {0.1, 0.2, 0.3}
    assert not any(c.get("alpha1") == 2.0 for c in calls)
    assert {(m.alpha1, m.alpha2) for m in results if m.kind == "exme"} == {(1.0, 0.2)}


def test_the_log_warns_of_a_best_at_the_edge_and_auto_alphas_take_the_alpha_off_it(caplog):
    kept = [Checkpoint(40, 0.45), Checkpoint(30, 0.40)]
    with caplog.at_level("WARNING", logger="exme_callback.strategies.exme"):
        run_strategy(ExMe(), kept, accuracy_scorer(items=False)[0], True)
    assert caplog.messages == [
        "ExMe: at the edge of the search: alpha1=0.5 is the largest alpha tried; the score was still rising; "
        "beta=0.9 is the largest beta tried; the score was still rising (the best may lie beyond; "
        '`alphas="auto"` extends the lines).'
    ]
    caplog.clear()
    with caplog.at_level("WARNING", logger="exme_callback.strategies.exme"):
        auto_sweep(accuracy_scorer()[0])
    assert caplog.messages == [
        "ExMe: at the edge of the search: beta=0.9 is the largest beta tried; the score was still rising (the best "
        "may lie beyond)."
    ]
