"""M^3, Mixup Model Merge (arXiv 2502.15434): `lambda * SFT-1 + (1 - lambda) * SFT-2` with `lambda ~ Beta(a, a)`,
optionally after DARE sparsifies both task vectors."""

from __future__ import annotations

import random

from ..merges import Merge
from .base import Search, Strategy

__all__ = ["Mixup", "mixup_draws"]


def mixup_draws(a: float, draws: int, seed: int = 0) -> tuple[float, ...]:
    """`draws` merge ratios `lambda ~ Beta(a, a)`, seeded."""
    rng = random.Random(seed)
    return tuple(rng.betavariate(a, a) for _ in range(draws))


class Mixup(Strategy):
    """M^3: `lambda * SFT_a + (1 - lambda) * SFT_b` for each drawn `lambda`, as the paper merges two fine-tuned models
    (the two best kept checkpoints). With `density`, both task vectors are first sparsified by DARE (keep `density`
    of the entries at random, rescale; masks seeded by `seed`); such models are off the span.

    Args:
        a (`float`, *optional*, defaults to 2.0): the `a` of `Beta(a, a)`.
        draws (`int`, *optional*, defaults to 9): how many ratios are drawn.
        seed (`int`, *optional*, defaults to 0): the seed of the draws and of the DARE masks.
        density (`float`, *optional*): M^3 with DARE: the fraction of each task vector kept.
    """

    name, label = "mixup", "M^3"
    description = (
        "and the two best merged with ratios drawn from Beta(a, a) (Mixup Model Merge, "
        "[M^3](https://arxiv.org/abs/2502.15434))"
    )

    def __init__(self, a: float = 2.0, draws: int = 9, seed: int = 0, density: float | None = None):
        self.a, self.draws, self.seed, self.density = a, draws, seed, density

    @classmethod
    def from_settings(cls, settings) -> Mixup:
        return cls(settings.mixup_a, settings.mixup_draws, settings.seed, settings.dare)

    def evaluations(self, k: int) -> int:
        return self.draws if k >= 2 else 0

    def search(self, search: Search) -> None:
        if search.k < 2:
            return
        draws = []
        for lam in mixup_draws(self.a, self.draws, self.seed):
            if self.density is None:
                c = [lam, 1.0 - lam, *[0.0] * (search.k - 2)]
                draws.append(search.point(self.name, c, {"lambda": lam}, uses=(0, 1)))
            else:
                merge = Merge("dare", (0, 1), (lam, 1.0 - lam), self.density, self.seed)
                draws.append(search.off_span(self.name, merge, {"lambda": lam, "density": self.density}))
        search.score_stage(draws)  # one stage: raced with `search="racing"`
