"""The merges the ExMe paper compares against (its Table 1), of the two best checkpoints; never chosen.

- Weighted: `lambda * SFT_1 + (1 - lambda) * SFT_2`, the point `(lambda, 1 - lambda)`, over a grid of `lambda`;
- TIES: TIES-merging of the two task vectors (trim to `density`, elect signs, disjoint mean);
- DARE: DARE on each task vector (drop to `density` at random, rescale), then their mean.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..candidates import Candidate, best
from ..merges import Merge
from .base import Search, Strategy
from .exme import DEFAULT_BETAS

__all__ = ["DEFAULT_DENSITIES", "Baselines"]

DEFAULT_DENSITIES = (0.3, 0.5, 0.7)
_LABELS = {"weighted": "Weighted", "ties": "TIES", "dare": "DARE"}
_WEIGHTS = {"ties": (1.0, 1.0), "dare": (0.5, 0.5)}  # TIES sums the elected entries; DARE averages


class Baselines(Strategy):
    """The paper's baselines, each over its grid (`baselines=True`); they fill the report's comparison rows.

    Args:
        lambdas (`Sequence[float]`, *optional*, defaults to the `betas` grid): the weights of SFT-1 tried.
        densities (`Sequence[float]`, *optional*, defaults to `(0.3, 0.5, 0.7)`): the fractions TIES and DARE keep.
        seed (`int`, *optional*, defaults to 0): the seed of DARE's masks.
    """

    name = "baselines"
    description = "and compared with the weighted, TIES and DARE merges"

    def __init__(
        self, lambdas: Sequence[float] = DEFAULT_BETAS, densities: Sequence[float] = DEFAULT_DENSITIES, seed: int = 0
    ):
        self.lambdas, self.densities, self.seed = tuple(lambdas), tuple(densities), seed

    @classmethod
    def from_settings(cls, settings) -> Baselines:
        return cls(settings.betas, DEFAULT_DENSITIES, settings.seed)

    def evaluations(self, k: int) -> int:
        return len(self.lambdas) + len(_WEIGHTS) * len(self.densities) if k >= 2 else 0

    def search(self, search: Search) -> None:
        if search.k < 2:
            return
        rest = [0.0] * (search.k - 2)
        for lam in self.lambdas:
            search.score(search.point("weighted", [lam, 1.0 - lam, *rest], {"lambda": lam}, uses=(0, 1)))
        for method, weights in _WEIGHTS.items():
            for density in self.densities:
                merge = Merge(method, (0, 1), weights, density, self.seed)
                search.score(search.off_span(method, merge, {"density": density}))

    def rows(self, candidates: Sequence[Candidate], greater_is_better: bool) -> list[tuple[str, Candidate]]:
        """The best weighted, TIES and DARE merge."""
        rows = [(label, best(candidates, greater_is_better, kinds=(kind,))) for kind, label in _LABELS.items()]
        return [(label, c) for label, c in rows if c is not None]
