"""The ExMe search on the `(c1, c2)` plane: which candidates to evaluate, in which order, and which one wins.

Pure Python: a candidate is a point `theta(c1, c2) = base + c1 * d1 + c2 * d2` (see `arithmetic`), and the sweep
only asks a caller-supplied function for the score of each point. The steps follow the ExMe paper:

1. SFT-1 and SFT-2: the two best checkpoints of training, `(1, 0)` and `(0, 1)`.
2. EXPO-i: `SFT_i + alpha * (SFT_i - base)` for every `alpha` of the grid, for each checkpoint separately; the best
   alpha of each is kept.
3. ExMe: `beta * EXPO_1 + (1 - beta) * EXPO_2` for every `beta` of the grid.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

__all__ = [
    "DEFAULT_ALPHAS",
    "DEFAULT_BETAS",
    "Candidate",
    "Checkpoint",
    "best",
    "sweep_baselines",
    "count_candidates",
    "exme_coefficients",
    "is_better",
    "sweep",
    "validate_grid",
]

DEFAULT_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_BETAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_DENSITIES = (0.3, 0.5, 0.7)
KINDS = ("base", "sft", "expo", "exme", "weighted", "ties", "dare")
OFF_PLANE = ("ties", "dare")  # sparsified merges: not points of the plane, `c1`/`c2` are None


@dataclass
class Checkpoint:
    """A training evaluation: the global step, its selection score and the metrics it came from."""

    step: int
    score: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Candidate:
    """One evaluated model: a point of the plane, or a baseline merge. Fields that do not apply are `None`.

    `hyper` holds a baseline's hyper-parameters (`lambda` of a weighted merge, `density` of TIES and DARE).
    `error` says why the score was not used for selection (a non-finite score); such a candidate is never chosen.
    `heldout_score` and `heldout_metrics` come from the report evaluator, for the rows of the final table.
    """

    kind: str
    c1: float | None
    c2: float | None
    step1: int | None = None
    step2: int | None = None
    alpha1: float | None = None
    alpha2: float | None = None
    beta: float | None = None
    hyper: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    heldout_score: float | None = None
    heldout_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def valid(self) -> bool:
        return self.error is None and self.score is not None and math.isfinite(self.score)

    def to_dict(self) -> dict:
        return asdict(self)


def exme_coefficients(alpha1: float, alpha2: float, beta: float) -> tuple[float, float]:
    """`(c1, c2)` of `beta * EXPO_1(alpha1) + (1 - beta) * EXPO_2(alpha2)`."""
    return beta * (1.0 + alpha1), (1.0 - beta) * (1.0 + alpha2)


def validate_grid(name: str, values: Iterable[float], low: float, high: float = math.inf) -> tuple[float, ...]:
    """Check a hyper-parameter grid: a non-empty sequence of distinct finite numbers in `[low, high]`."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"`{name}` must be a sequence of numbers, got {values!r}")
    grid = tuple(values)
    bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
    if not grid or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high for v in grid
    ):
        raise ValueError(f"`{name}` must be a non-empty sequence of finite numbers {bounds}, got {values!r}")
    if len(set(grid)) != len(grid):
        raise ValueError(f"`{name}` must not repeat a value, got {values!r}")
    return tuple(float(v) for v in grid)


def is_better(score: float, other: float | None, greater_is_better: bool) -> bool:
    """Whether `score` beats `other` (`None` is beaten by any finite score); ties are not better."""
    if not math.isfinite(score):
        return False
    if other is None:
        return True
    return score > other if greater_is_better else score < other


def best(candidates: Iterable[Candidate], greater_is_better: bool, kinds: Sequence[str] = KINDS) -> Candidate | None:
    """The best valid candidate of the given kinds; on a tie the earliest (the simplest model) wins."""
    winner = None
    for candidate in candidates:
        if candidate.kind in kinds and candidate.valid:
            if winner is None or is_better(candidate.score, winner.score, greater_is_better):
                winner = candidate
    return winner


def count_candidates(n_checkpoints: int, alphas: Sequence[float], betas: Sequence[float]) -> int:
    """How many evaluations `sweep` runs."""
    return n_checkpoints * len(alphas) + (len(betas) if n_checkpoints == 2 else 0)


def count_baselines(n_checkpoints: int, lambdas: Sequence[float], densities: Sequence[float]) -> int:
    """How many evaluations `sweep_baselines` runs."""
    return len(lambdas) + len(OFF_PLANE) * len(densities) if n_checkpoints == 2 else 0


def sweep_baselines(
    score: Callable[[Candidate], Candidate],
    checkpoints: Sequence[Checkpoint],
    lambdas: Sequence[float] = DEFAULT_BETAS,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    results: list[Candidate] | None = None,
) -> list[Candidate]:
    """The merges the ExMe paper compares against, each over its grid.

    - `weighted`: `lambda * SFT_1 + (1 - lambda) * SFT_2`, the point `(lambda, 1 - lambda)` of the plane;
    - `ties`: TIES-merging of the two task vectors (trim to `density`, elect signs, disjoint mean);
    - `dare`: DARE (drop to `density` at random, rescale) and average the two task vectors.

    Args:
        score (`Callable[[Candidate], Candidate]`): as for `sweep`; TIES and DARE candidates have `c1 = c2 = None`
            and their `density` in `hyper`.
        checkpoints (`Sequence[Checkpoint]`): the two kept checkpoints.
        lambdas (`Sequence[float]`): the weights of SFT-1 tried.
        densities (`Sequence[float]`): the fractions of each task vector kept by TIES and DARE.
        results (`list[Candidate]`, *optional*): appended to as candidates are scored.
    """
    results = [] if results is None else results
    if len(checkpoints) != 2:
        return results
    steps = {"step1": checkpoints[0].step, "step2": checkpoints[1].step}
    for lam in lambdas:
        results.append(score(Candidate("weighted", lam, 1.0 - lam, hyper={"lambda": lam}, **steps)))
    for kind in OFF_PLANE:
        for density in densities:
            results.append(score(Candidate(kind, None, None, hyper={"density": density}, **steps)))
    return results


def sweep(
    score: Callable[[Candidate], Candidate],
    checkpoints: Sequence[Checkpoint],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] = DEFAULT_BETAS,
    greater_is_better: bool = False,
    results: list[Candidate] | None = None,
) -> list[Candidate]:
    """Run the ExMe search and return every candidate in the order evaluated.

    Args:
        score (`Callable[[Candidate], Candidate]`): evaluates the model at `(candidate.c1, candidate.c2)` and
            returns the candidate with `score` and `metrics` set (or `error` when it could not be scored).
        checkpoints (`Sequence[Checkpoint]`): the kept checkpoints, best first: one or two.
        alphas (`Sequence[float]`): the extrapolation grid, searched for each checkpoint separately.
        betas (`Sequence[float]`): the merge grid between the two best EXPO models.
        greater_is_better (`bool`): the direction of the score.
        results (`list[Candidate]`, *optional*): the list to append candidates to as they are scored (and to
            return), so that a caller still has the finished part when scoring raises.

    Returns:
        `list[Candidate]`: SFT, then EXPO, then ExMe candidates. With one checkpoint there is no ExMe step.
    """
    if len(checkpoints) not in (1, 2):
        raise ValueError(f"The sweep needs one or two checkpoints, got {len(checkpoints)}.")
    steps = [c.step for c in checkpoints]
    results = [] if results is None else results

    def point(i: int, scale: float, **fields) -> Candidate:
        c = (scale, 0.0) if i == 0 else (0.0, scale)
        return Candidate(c1=c[0], c2=c[1], **{f"step{i + 1}": steps[i]}, **fields)

    # 1. The SFT checkpoints, with the scores they got during training (from the same evaluation).
    for i, checkpoint in enumerate(checkpoints):
        candidate = point(i, 1.0, kind="sft", score=checkpoint.score, metrics=dict(checkpoint.metrics))
        results.append(candidate)

    # 2. EXPO: each checkpoint's best alpha (0, the checkpoint itself, when no alpha scores a finite number).
    best_alphas = []
    for i in range(len(checkpoints)):
        first = len(results)
        for alpha in alphas:
            results.append(score(point(i, 1.0 + alpha, kind="expo", **{f"alpha{i + 1}": alpha})))
        winner = best(results[first:], greater_is_better)
        best_alphas.append(0.0 if winner is None else (winner.alpha1 if i == 0 else winner.alpha2))

    # 3. ExMe: merges of the two EXPO models.
    if len(checkpoints) == 2:
        alpha1, alpha2 = best_alphas
        for beta in betas:
            c1, c2 = exme_coefficients(alpha1, alpha2, beta)
            candidate = Candidate("exme", c1, c2, steps[0], steps[1], alpha1, alpha2, beta)
            results.append(score(candidate))
    return results
