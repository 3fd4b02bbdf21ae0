"""A line of candidates scored in order (EXPO's alphas, whose score rises then falls), and when it stops.

One rule serves the plain search (`Search.score_stage(..., line=True)`) and racing's first round (`Racing`): a point
is *clearly below* the best before it when its gain over that best is below zero by more than the noise, and
*clearly above* it when the gain is above zero by more than the noise (`Noise`). A line stops at its first clear
fall; past its grid it goes on only while its newest point is clearly above the best before it (`walk_line`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from ..candidates import Candidate, best
from ..intervals import gain_interval

__all__ = ["Noise", "walk_line"]


@dataclass(frozen=True)
class Noise:
    """When one candidate is clearly better or clearly worse than another.

    With `weights` and per-item scores of every weighted metric on both candidates, the gain is the paired bootstrap
    interval of `gain_interval`, and "clearly" means the whole interval is on one side of zero. Otherwise (aggregate
    scores only) the gain is the difference of the two scores, and any strict difference is clear.

    Args:
        greater_is_better (`bool`): the direction of the score.
        weights (`Mapping[str, float]`, *optional*): each metric's weight in a gain (`Objective.gain_weights`).
        level (`float`, *optional*, defaults to 0.95): the interval's confidence level.
        seed (`int`, *optional*, defaults to 0): the bootstrap's seed.
    """

    greater_is_better: bool
    weights: Mapping[str, float] | None = None
    level: float = 0.95
    seed: int = 0

    def gain(self, candidate: Candidate, reference: Candidate) -> tuple[float, float]:
        """The gain of `candidate` over `reference` (two scored candidates), positive when better: the interval
        over their items, or the difference of their scores as both ends."""
        if self.weights and all(m in c.items for c in (candidate, reference) for m in self.weights):
            return gain_interval(candidate.items, reference.items, self.weights, self.level, seed=self.seed)
        gain = (candidate.score - reference.score) * (1.0 if self.greater_is_better else -1.0)
        return gain, gain

    def compare(self, candidate: Candidate, reference: Candidate) -> int:
        """`-1` when `candidate` is worse than `reference` by more than the noise (or has no finite score), `1` when
        it is better by more than the noise, `0` within it."""
        if not candidate.valid:
            return -1
        low, high = self.gain(candidate, reference)
        return -1 if high < 0 else 1 if low > 0 else 0

    def clearly_below(self, candidate: Candidate, reference: Candidate, margin: float = 0.0) -> bool:
        """Whether `candidate` is worse than `reference` by more than the noise (or has no finite score); with a
        `margin`, whether it cannot beat `reference` by more than the margin (the top of the gain below it)."""
        if not margin:
            return self.compare(candidate, reference) < 0
        return not candidate.valid or self.gain(candidate, reference)[1] < margin


def walk_line(
    line: Sequence[Candidate],
    score: Callable[[Candidate], object],
    noise: Noise,
    grid: int | None = None,
    bracket: bool = True,
) -> int:
    """Score the candidates of `line` in order, as far as the line goes; returns how many were scored (a prefix).

    The line's score is taken to rise then fall. Its first `grid` candidates (all of them by default) are its grid:
    each is scored, except that with `bracket` the line stops at the first one clearly below the best before it (a
    clear fall: the peak is behind). The rest extend the line past its grid: each is scored only while the newest
    point scored was clearly above the best before it (the score still rising by more than the noise; the line's
    first point counts as rising when it has a finite score), and the first clear fall stops it too. A point
    without a finite score is a clear fall.

    Args:
        line (`Sequence[Candidate]`): the points, in the line's order (EXPO: increasing alpha).
        score (`Callable[[Candidate], object]`): scores a candidate in place.
        noise (`Noise`): what "clearly" means.
        grid (`int`, *optional*): how many of the points are the line's grid; the rest is its extension.
        bracket (`bool`, *optional*, defaults to `True`): stop the grid at its first clear fall too.

    Example:

    ```python
    >>> line = [Candidate("expo", (1.0 + a,), hyper={"alpha1": a}) for a in (0.1, 0.3, 0.5, 0.8, 1.2, 2.0)]
    >>> def score(candidate):  # a peak at alpha = 0.8
    ...     candidate.score = -abs(candidate.alpha1 - 0.8)
    >>> walk_line(line, score, Noise(greater_is_better=True), grid=3, bracket=False)  # 1.2 falls: 2.0 not scored
    5
    ```
    """
    grid = len(line) if grid is None else grid
    leader, verdict = None, 1
    for position, candidate in enumerate(line):
        if position >= grid and verdict < 1:
            return position
        score(candidate)
        if position + 1 < len(line) and (bracket or position >= grid - 1):  # else nothing it shows changes the walk
            verdict = noise.compare(candidate, leader) if leader is not None else 1 if candidate.valid else -1
            if verdict < 0 and (bracket or position >= grid):
                return position + 1
        leader = best([c for c in (leader, candidate) if c is not None], noise.greater_is_better)
    return len(line)
