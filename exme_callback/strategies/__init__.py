"""Search strategies: which points of the span (and which merges off it) a sweep evaluates.

A strategy is one small class that owns its candidates, its evaluation count and its report rows (`Strategy`), and
is found by name in `STRATEGIES`: `"exme"` (the paper's EXPO-then-merge search), `"mixup"` (M^3) and
`"topk_greedy"` (Top-k greedy merging with model kinship). `Baselines` (the paper's comparison rows) is one too,
whose candidates are never chosen. A strategy of your own is a subclass with a `search` method:

```python
import random
from exme_callback import ExMeCallback, Strategy

class RandomBox(Strategy):
    name = "random_box"  # its candidates' kind, and its row in the report

    def __init__(self, n=8, width=0.5, seed=0):
        self.n, self.width, self.seed = n, width, seed

    def evaluations(self, k):
        return self.n

    def search(self, search):
        rng = random.Random(self.seed)
        for _ in range(self.n):  # around the best checkpoint, c = (1, 0, ...)
            c = [float(i == 0) + rng.uniform(-self.width, self.width) for i in range(search.k)]
            search.score(search.point(self.name, c))

trainer.add_callback(ExMeCallback(trainer, strategy=RandomBox(n=8)))
```
"""

from .base import Search, Strategy, run_strategy
from .baselines import DEFAULT_DENSITIES, Baselines
from .exme import (
    AUTO,
    AUTO_CAP,
    AUTO_EXTENSION,
    DEFAULT_ALPHAS,
    DEFAULT_BETAS,
    ExMe,
    edge_notices,
    exme_coefficients,
    scored_alphas,
)
from .line import Noise, walk_line
from .mixup import Mixup, mixup_draws
from .racing import RACING_MIN_ITEMS, RACING_ROUNDS, Racing, racing_rounds
from .topk_greedy import TopkGreedy

__all__ = [
    "AUTO",
    "AUTO_CAP",
    "AUTO_EXTENSION",
    "DEFAULT_ALPHAS",
    "DEFAULT_BETAS",
    "DEFAULT_DENSITIES",
    "RACING_MIN_ITEMS",
    "RACING_ROUNDS",
    "STRATEGIES",
    "Baselines",
    "ExMe",
    "Mixup",
    "Noise",
    "Racing",
    "Search",
    "Strategy",
    "TopkGreedy",
    "edge_notices",
    "exme_coefficients",
    "mixup_draws",
    "racing_rounds",
    "run_strategy",
    "scored_alphas",
    "walk_line",
]

STRATEGIES: dict[str, type[Strategy]] = {"exme": ExMe, "mixup": Mixup, "topk_greedy": TopkGreedy}
"""The built-in strategies by name (`strategy="exme"`, `exme run --strategy exme`); each has `from_settings`."""
