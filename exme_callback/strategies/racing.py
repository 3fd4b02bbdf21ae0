"""Racing (`search="racing"`): a stage's candidates scored on growing subsets of the items, the clearly worse
stopped early. A way a strategy's stage is scored (`Search.score_stage`), not a strategy of its own."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial

import torch

from ..candidates import Candidate, best
from ..objective import item_group
from .line import Noise, walk_line

__all__ = ["RACING_MIN_ITEMS", "RACING_ROUNDS", "Racing", "racing_rounds"]

RACING_ROUNDS = (0.125, 0.25, 0.5, 1.0)  # the share of each group's items every candidate still racing is scored on
RACING_MIN_ITEMS = 64  # the fewest new items a round scores per candidate (over all groups), but the last


def racing_rounds(sizes: dict[str, int], min_items: int | None = None) -> list[float]:
    """The shares of `RACING_ROUNDS` a race over groups of `sizes` items uses: those that score at least `min_items`
    (defaults to `RACING_MIN_ITEMS`) new items per candidate, and the last (every item). Each evaluator call has a
    fixed cost (the candidate's switch, the call itself) besides its items' forward passes; rounds of too few items
    would be mostly that cost.

    Example:

    ```python
    >>> racing_rounds({"arc": 256, "mmlu": 256}), racing_rounds({"arc": 64, "mmlu": 64})
    ([0.125, 0.25, 0.5, 1.0], [0.5, 1.0])
    ```
    """
    min_items = RACING_MIN_ITEMS if min_items is None else min_items
    shares, done = [], 0
    for share in RACING_ROUNDS:
        reached = sum(math.ceil(share * n) for n in sizes.values())
        if share == 1.0 or reached - done >= min_items:
            shares.append(share)
            done = reached
    return shares


def _hyper_text(candidate: Candidate) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in candidate.hyper.items())


@dataclass
class Racing:
    """Racing (`search="racing"`): the candidates of a stage are scored on growing subsets of the items, and those
    whose gain over the leader has a confidence interval below zero stop early; the rest are scored on every item.
    With a `margin`, those whose interval is below the margin stop too: a candidate that cannot beat the leader by
    more than the margin (an indifference zone), so the stage's winner is within about the margin of the grid's
    winner rather than the grid's winner itself.

    Each group of items (a task) is drawn in one seeded order; round `r` scores every candidate still racing on the
    first `RACING_ROUNDS[r]` of each group's items in that order (only the items it was not scored on yet; rounds of
    fewer than `RACING_MIN_ITEMS` new items are skipped: `racing_rounds`), so all
    candidates compared are scored on the same items, and a candidate is never dropped on items the leader was not
    scored on. The last round is all items: the survivors' scores are the grid's, and the stage's winner is the
    grid's unless the grid's winner was stopped while inside the noise of a smaller subset. A line (EXPO's alphas)
    is walked in the first round as the plain search walks it (`line.walk_line`), with the same rule for a clear
    fall: its points past the first clear fall are never scored.

    Args:
        evaluate (`Callable[[Candidate, dict[str, list[int]]], dict[str, list[float]]]`): scores `candidate` on the
            items given (group -> item indices, ascending) and returns each metric's per-item scores, in that order.
        sizes (`dict[str, int]`): each group's number of items.
        objective (`Callable[[Mapping[str, float]], float]`): the score of per-metric means.
        weights (`Mapping[str, float]`): each metric's weight in a gain (`Objective.gain_weights`).
        greater_is_better (`bool`): the direction of the score.
        level (`float`, *optional*, defaults to 0.95): the confidence level that stops a candidate.
        seed (`int`, *optional*, defaults to 0): the order the items are drawn in.
        margin (`float`, *optional*, defaults to 0): the gain over the leader, in the score's units, a candidate must
            be able to reach (the top of its interval) to go on racing; 0 stops only the clearly worse.
    """

    evaluate: Callable[[Candidate, dict[str, list[int]]], dict[str, list[float]]]
    sizes: dict[str, int]
    objective: Callable[[dict[str, float]], float]
    weights: dict[str, float]
    greater_is_better: bool
    level: float = 0.95
    seed: int = 0
    margin: float = 0.0
    item_evaluations: int = 0  # items scored so far, over every candidate

    def __call__(
        self, group: list[Candidate], line: bool = False, extension: Sequence[Candidate] = ()
    ) -> list[Candidate]:
        """Race `group`, scoring its candidates in place; returns the stage's candidates (`group`, then the points of
        `extension` it scored). With `line=True` the candidates lie along a line whose score rises then falls (EXPO's
        alphas, in increasing order): the first round walks the line (`line.walk_line`), scoring them in order until
        one is clearly below the best so far and marking the rest unscored, and past the group scores the points of
        `extension` while the newest is clearly above the best before it, on that round's items."""
        generator = torch.Generator().manual_seed(self.seed)
        order = {g: torch.randperm(n, generator=generator).tolist() for g, n in sorted(self.sizes.items())}
        scored = {g: [] for g in order}  # the items scored so far, in the order they were scored
        racing = [*group, *extension]
        stage = list(racing)
        shares = racing_rounds(self.sizes)
        for share in shares:
            request = {g: sorted(order[g][len(scored[g]) : math.ceil(share * len(order[g]))]) for g in order}
            if line and share == shares[0]:
                n = walk_line(racing, partial(self._score, request=request), self.noise, len(group))
                for later in racing[n : len(group)]:
                    later.error = f"not scored: bracketing stopped the line at {_hyper_text(racing[n - 1])}"
                racing = racing[:n]
                stage = [*group, *racing[len(group) :]]
            else:
                for candidate in racing:
                    self._score(candidate, request)
            for g, items in request.items():
                scored[g] += items
            leader = best(racing, self.greater_is_better)
            if share < 1.0 and leader is not None:
                racing = [c for c in racing if c is leader or not self._stops(c, leader, scored)]
        for candidate in racing:  # every item: back in the items' own order, paired with other evaluations
            for metric, items in candidate.items.items():
                position = scored[item_group(metric)]
                candidate.items[metric] = [v for _, v in sorted(zip(position, items, strict=True))]
        return stage

    @property
    def noise(self) -> Noise:
        """What "clearly below" means: the gain's interval over the items both were scored on is below zero."""
        return Noise(self.greater_is_better, self.weights, self.level, self.seed)

    def _score(self, candidate: Candidate, request: dict[str, list[int]]) -> None:
        """Score `candidate` on the items of `request` too; its score is over every item it was scored on."""
        values = self.evaluate(candidate, request)
        self.item_evaluations += sum(map(len, request.values()))
        for metric, items in values.items():
            candidate.items.setdefault(metric, []).extend(items)
        candidate.metrics = {m: math.fsum(v) / len(v) for m, v in candidate.items.items()}
        candidate.score = self.objective(candidate.metrics)
        if not math.isfinite(candidate.score):
            candidate.error = f"non-finite score {candidate.score}"

    def _stops(self, candidate, leader, scored: dict[str, list[int]]) -> bool:
        """Whether `candidate` stops: clearly below `leader` on the items both were scored on, or with a `margin`
        unable to beat it by more than the margin (`Noise.clearly_below`); if so, mark it stopped."""
        if not self.noise.clearly_below(candidate, leader, self.margin):
            return False
        n = sum(map(len, scored.values()))
        why = "below the leader" if not self.margin else f"not above the leader by more than {self.margin:g}"
        candidate.error = f"stopped by racing after {n} of {sum(self.sizes.values())} items: {why}"
        candidate.items = {}  # a subset's scores: not comparable with other evaluations
        return True
