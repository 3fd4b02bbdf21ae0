"""ExMe (Lin et al. 2025): extrapolate each of the two best checkpoints away from the base (EXPO), then merge.

1. SFT-1 and SFT-2: the two best checkpoints of training, `c = (1, 0)` and `(0, 1)`.
2. EXPO-i: `SFT_i + alpha * (SFT_i - base)`, `c_i = 1 + alpha`, for every `alpha` of the grid, for each checkpoint
   separately; the best alpha of each is kept. With `alphas="auto"` each line goes on past the grid
   (`AUTO_EXTENSION`, up to `AUTO_CAP`) while its score still rises by more than the noise.
3. ExMe: `beta * EXPO_1 + (1 - beta) * EXPO_2`, `c = (beta (1 + alpha1), (1 - beta)(1 + alpha2))`, for every `beta`.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence

from ..candidates import Candidate, best, is_better
from ..errors import InputError
from .base import Search, Strategy

__all__ = [
    "AUTO",
    "AUTO_CAP",
    "AUTO_EXTENSION",
    "DEFAULT_ALPHAS",
    "DEFAULT_BETAS",
    "ExMe",
    "edge_notices",
    "exme_coefficients",
    "scored_alphas",
]

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_BETAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
_ALPHAS = ("alpha1", "alpha2")
AUTO = "auto"
"""`alphas="auto"`: the default grid, then each EXPO line further (`AUTO_EXTENSION`) while its score rises."""
AUTO_CAP = 2.0
"""The largest alpha `alphas="auto"` tries: `c_i = 3`, three times the checkpoint's task vector."""
AUTO_EXTENSION = (0.6, 0.8, 1.0, 1.5, AUTO_CAP)
"""The alphas past the default grid that `alphas="auto"` scores, in order, each only while the line's newest point
beats the best before it by more than the noise (the interval of the gain with per-item scores, else any gain);
the first clear fall stops the line (`line.walk_line`)."""


def exme_coefficients(alpha1: float, alpha2: float, beta: float) -> tuple[float, float]:
    """`(c1, c2)` of `beta * EXPO_1(alpha1) + (1 - beta) * EXPO_2(alpha2)`."""
    return beta * (1.0 + alpha1), (1.0 - beta) * (1.0 + alpha2)


def scored_alphas(candidates: Sequence[Candidate]) -> tuple[float, ...]:
    """The alphas the EXPO candidates of `candidates` were scored at (any line; a stopped race counts, a point never
    scored does not), in increasing order: with `alphas="auto"`, how far the lines went."""
    scored = [c for c in candidates if c.kind == "expo" and c.score is not None]
    return tuple(sorted({c.hyper[name] for c in scored for name in _ALPHAS if name in c.hyper}))


def edge_notices(candidates: Sequence[Candidate], greater_is_better: bool) -> list[str]:
    """Where a stage's best sits at the edge of what it tried, the score still improving there: EXPO-i's best at the
    largest alpha its line scored (the grid's largest, or where `alphas="auto"` stopped it), or the best merge at
    the smallest or largest beta. One phrase each, like `"alpha1=0.5 is the largest alpha tried; the score was
    still rising"`; none for a stage whose best is inside, that scored fewer than two finite values, or whose best
    ties another.

    Args:
        candidates (`Sequence[Candidate]`): a search's candidates (`Report.candidates`): the `"expo"` ones with
            `alpha1` or `alpha2`, the `"exme"` ones with `beta`; a candidate never scored (`score=None`) was not
            tried, one stopped by racing was.
        greater_is_better (`bool`): the direction of the score ("rising" or "falling").
    """
    direction = "rising" if greater_is_better else "falling"
    notices = []
    for name in _ALPHAS:
        line = [(c.hyper[name], c) for c in candidates if c.kind == "expo" and name in c.hyper]
        edge = _edge(line, greater_is_better)
        if edge is not None and edge[0] == "largest":
            notices.append(f"{name}={edge[1]:g} is the largest alpha tried; the score was still {direction}")
    merges = [(c.hyper["beta"], c) for c in candidates if c.kind == "exme" and "beta" in c.hyper]
    edge = _edge(merges, greater_is_better)
    if edge is not None:
        where = "" if edge[0] == "largest" else " as beta decreased"
        notices.append(f"beta={edge[1]:g} is the {edge[0]} beta tried; the score was still {direction}{where}")
    return notices


def _edge(points: Sequence[tuple[float, Candidate]], greater_is_better: bool) -> tuple[str, float] | None:
    """`("largest" | "smallest", value)` when the best of a stage's `(value, candidate)` points is strictly better
    than every other and sits at the largest or smallest value tried."""
    tried = [(value, c) for value, c in points if c.score is not None]
    winner = best([c for _, c in tried], greater_is_better)
    if winner is None or sum(math.isfinite(c.score) for _, c in tried) < 2:
        return None
    if any(c is not winner and c.valid and not is_better(winner.score, c.score, greater_is_better) for _, c in tried):
        return None  # a tie: no slope
    value, values = next(v for v, c in tried if c is winner), [v for v, _ in tried]
    return ("largest", value) if value == max(values) else ("smallest", value) if value == min(values) else None


def _expo(search: Search, i: int, alpha: float) -> Candidate:
    """EXPO of the `i`-th kept checkpoint: `c_i = 1 + alpha`, the others 0."""
    return search.point("expo", [(1.0 + alpha) * (i == j) for j in range(search.k)], {f"alpha{i + 1}": alpha})


class ExMe(Strategy):
    """The ExMe paper's search, on the two best kept checkpoints (EXPO of the best alone with one checkpoint).

    Each stage (the alphas of EXPO-1, the alphas of EXPO-2, the betas) is scored with `Search.score_stage`, so it is
    raced with `search="racing"`; the alphas as a line, in increasing order.

    Args:
        alphas (`Sequence[float]` or `"auto"`, *optional*, defaults to `(0.1, ..., 0.5)`): the extrapolation grid,
            searched for each checkpoint separately; `"auto"`: the default grid, then each line on past it
            (`AUTO_EXTENSION`: 0.6, 0.8, 1.0, 1.5, 2.0) while its score still rises by more than the noise, stopping at
            the first clear fall.
        betas (`Sequence[float]`, *optional*, defaults to `(0.1, ..., 0.9)`): the merge grid between the two best
            EXPO models.
    """

    name, label = "exme", "ExMe"
    description = (
        "each extrapolated away from the base model ([EXPO](https://arxiv.org/abs/2404.16792)) and the two merged "
        "(Extrapolation Merging, [ExMe](https://arxiv.org/abs/2503.04834))"
    )

    def __init__(self, alphas: Sequence[float] | str = DEFAULT_ALPHAS, betas: Sequence[float] = DEFAULT_BETAS):
        if isinstance(alphas, str) and alphas != AUTO:
            raise InputError(f"`alphas` must be a sequence of numbers or {AUTO!r}, got {alphas!r}")
        self.auto = isinstance(alphas, str)
        self.alphas = DEFAULT_ALPHAS if self.auto else tuple(alphas)
        self.extension = AUTO_EXTENSION if self.auto else ()
        self.betas = tuple(betas)

    @classmethod
    def from_settings(cls, settings) -> ExMe:
        return cls(settings.alphas, settings.merge_weights())

    def evaluations(self, k: int) -> int | None:
        """The grid's count; `None` (unknown) with `alphas="auto"`, whose lines stop where their scores say."""
        if self.auto:
            return None
        return min(k, 2) * len(self.alphas) + (len(self.betas) if k >= 2 else 0)

    def search(self, search: Search) -> None:
        # 1. EXPO: each checkpoint's best alpha (0, the checkpoint itself, when no alpha scores a finite number).
        best_alphas = []
        for i in range(min(search.k, 2)):
            name = f"alpha{i + 1}"
            line = [_expo(search, i, alpha) for alpha in sorted(self.alphas)]
            extension = [_expo(search, i, alpha) for alpha in self.extension]
            winner = search.best(search.score_stage(line, line=True, extension=extension))
            best_alphas.append(0.0 if winner is None else winner.hyper[name])
        if search.k >= 2:  # 2. ExMe: merges of the two EXPO models, with their best alphas.
            alpha1, alpha2 = best_alphas
            merges = []
            for beta in self.betas:
                c = [*exme_coefficients(alpha1, alpha2, beta), *[0.0] * (search.k - 2)]
                hyper = {"alpha1": alpha1, "alpha2": alpha2, "beta": beta}
                merges.append(search.point("exme", c, hyper, uses=(0, 1)))
            search.score_stage(merges)
        notices = edge_notices(search.candidates, search.greater_is_better)
        if notices:
            hint = "" if self.auto or not notices[0].startswith("alpha") else '; `alphas="auto"` extends the lines'
            logger.warning(f"ExMe: at the edge of the search: {'; '.join(notices)} (the best may lie beyond{hint}).")

    def rows(self, candidates: Sequence[Candidate], greater_is_better: bool) -> list[tuple[str, Candidate]]:
        """EXPO-1 and EXPO-2 (the best alpha of each), then the best ExMe merge."""
        rows = []
        for i in range(2):
            expo = [c for c in candidates if c.kind == "expo" and f"alpha{i + 1}" in c.hyper]
            rows.append((f"EXPO-{i + 1}", best(expo, greater_is_better)))
        rows.append((self.label, best(candidates, greater_is_better, kinds=("exme",))))
        return [(label, c) for label, c in rows if c is not None]
