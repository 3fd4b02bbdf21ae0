import math

import pytest

from exme_callback.search import (
    Candidate,
    Checkpoint,
    best,
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
