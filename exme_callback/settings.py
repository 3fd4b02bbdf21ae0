r"""`SearchSettings`: what the search tries and how it chooses, validated once.

The callback's search keyword arguments and `exme run`'s search options are both these fields: the command line
is generated from them (`cli.add_settings_options`), with each field's help text and default, so the two cannot
drift apart.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, fields

from .candidates import CHOOSE_FROM
from .errors import InputError, InputTypeError, MissingExtraError
from .intervals import check_level
from .kinship import METRICS
from .strategies import (
    AUTO,
    AUTO_EXTENSION,
    DEFAULT_ALPHAS,
    DEFAULT_BETAS,
    STRATEGIES,
    Baselines,
    Strategy,
    mixup_draws,
)

__all__ = ["SearchSettings", "validate_grid"]

PARTNERS = ("next", "kinship")
BETA_SEARCHES = ("grid", "mixup")
SEARCHES = ("grid", "racing")


def _option(default, help: str, group: str = "search", **cli):
    """A settings field and what its command-line option needs: its help, its group, argparse's extras (`word`: the
    option takes numbers or this word)."""
    factory = {"default_factory": lambda: default} if isinstance(default, list) else {"default": default}
    return field(**factory, metadata={"help": help, "group": group, **cli})


@dataclass(frozen=True)
class SearchSettings:
    r"""What the search tries and how it chooses; every setting is validated on creation.

    Args:
        alphas (`Sequence[float]` or `"auto"`, *optional*, defaults to `(0.1, ..., 0.5)`): EXPO's extrapolation
            strengths, >= 0; `"auto"`: the default grid, then each EXPO line on past it (0.6, 0.8, 1.0, 1.5, 2.0:
            `strategies.AUTO_EXTENSION`) while its score still rises by more than the noise (the confidence interval
            of the gain with per-item scores, any gain without), stopping at the first clear fall. The report
            records the alphas scored.
        betas (`Sequence[float]`, *optional*, defaults to `(0.1, ..., 0.9)`): ExMe's merge weights, in [0, 1].
        choose_from (`str`, *optional*, defaults to `"all"`): `"all"` candidates, or `"exme"` merges only.
        baselines (`bool`, *optional*, defaults to `False`): also score the weighted, TIES and DARE merges.
        search (`str`, *optional*, defaults to `"grid"`): how each stage of the search is scored (the alphas of
            EXPO-1, of EXPO-2, the betas; M^3's draws): `"grid"` scores every candidate on every item; `"racing"`
            scores them on growing subsets of the items and stops those clearly below the leader
            (`strategies.Racing`); needs an evaluator that scores a subset of its items. Not with
            `strategy="topk_greedy"`, which scores one merge at a time.
        racing_margin (`float`, *optional*, defaults to 0): with `search="racing"`, also stop a candidate that cannot
            beat the stage's leader by more than this (the top of its gain's interval is below it), in the selection
            score's units: fewer evaluations, and a choice within about this much of the grid's instead of the
            grid's own. 0 stops only the candidates clearly below the leader.
        confidence (`float`, *optional*, defaults to 0.95): the level of the gains' confidence intervals, in (0, 1).
        min_gain (`float` or `str`, *optional*): keep the best checkpoint unless a candidate beats it by more than
            this: a gain of the selection score (>= 0, in its units), or `"significant"`: the gain's confidence
            interval is above zero (needs per-item scores). The best candidate that clears it is chosen. Defaults
            to the paper's plain argmax.
        strategy (`str` or `Strategy`, *optional*, defaults to `"exme"`): `"exme"` (the paper's EXPO then merge
            search), `"mixup"` (M^3: \( \lambda \, \text{SFT-1} + (1 - \lambda) \, \text{SFT-2} \) with
            \( \lambda \sim \text{Beta}(a, a) \)), `"topk_greedy"` (Top-k greedy merging with model kinship), or a
            `strategies.Strategy` of your own.
        top_k (`int`, *optional*, defaults to 2): how many of the best checkpoints are kept (memory: `top_k` copies
            of the trainable tensors) and, for `"topk_greedy"`, how many of the best models each generation merges.
        partner (`str`, *optional*, defaults to `"next"`): SFT-2, the second model of the ExMe and M^3 merges:
            `"next"` is the second-best checkpoint; `"kinship"` the best-scoring kept checkpoint whose kinship with
            the best is below `kinship_threshold` (above it for the Euclidean distance), so the two are not
            near-copies (the second best when none is).
        kinship_metric (`str`, *optional*, defaults to `"pearson"`): `"pearson"`, `"cosine"` or `"euclidean"`.
        kinship_threshold (`float`, *optional*, defaults to 0.95): see `partner`; in [-1, 1] for the similarities,
            >= 0 for the distance.
        beta_search (`str`, *optional*, defaults to `"grid"`): ExMe's betas from the `betas` grid, or `"mixup"`:
            `mixup_draws` draws from `Beta(mixup_a, mixup_a)`.
        mixup_a (`float`, *optional*, defaults to 2.0): the `a` of `Beta(a, a)`, > 0 (< 1 favours ratios near 0
            and 1, > 1 near 0.5).
        mixup_draws (`int`, *optional*, defaults to 9): how many ratios are drawn (seeded by `seed`).
        dare (`float`, *optional*): M^3 with DARE: each task vector keeps this fraction of its entries (at random,
            rescaled, seeded) before the mixup; in (0, 1]. Such merges are off the span: saved as full models.
        budget (`int`, *optional*): `"topk_greedy"`: the most merges evaluated.
        seed (`int`, *optional*, defaults to 0): the seed of the draws, of the DARE masks and of the bootstrap.
    """

    alphas: Sequence[float] | str = _option(
        DEFAULT_ALPHAS,
        f"extrapolation strengths (default: {' '.join(f'{a:g}' for a in DEFAULT_ALPHAS)}), or {AUTO}: the default "
        f"grid, then each EXPO line on through {' '.join(f'{a:g}' for a in AUTO_EXTENSION)} while its score rises",
        word=AUTO,
        nargs="+",
    )
    betas: Sequence[float] = _option(DEFAULT_BETAS, "merge weights of EXPO-1", type=float, nargs="+")
    choose_from: str = _option("all", "candidates the final model is chosen among", choices=tuple(CHOOSE_FROM))
    baselines: bool = _option(False, "also score weighted, TIES and DARE merges for the report")
    search: str = _option("grid", "each stage on every item, or racing on growing subsets", choices=SEARCHES)
    racing_margin: float = _option(
        0.0, "racing: also stop candidates that cannot beat the leader by more than this", type=float
    )
    confidence: float = _option(0.95, "the level of the gains' confidence intervals", type=float)
    min_gain: float | str | None = _option(
        None,
        "keep the best checkpoint unless a candidate's gain clears this (default: the paper's argmax)",
        word="significant",
        metavar="GAIN|significant",
    )
    strategy: str | Strategy = _option(
        "exme", "the search: ExMe, M^3 or Top-k greedy", "strategy", choices=tuple(STRATEGIES)
    )
    top_k: int = _option(2, "how many of the best checkpoints are kept and merged", "strategy", type=int)
    partner: str = _option("next", "SFT-2: the next best, or by kinship", "strategy", choices=PARTNERS)
    kinship_metric: str = _option("pearson", "kinship for --partner", "strategy", choices=METRICS)
    kinship_threshold: float = _option(
        0.95, "--partner kinship: below it (above, for euclidean)", "strategy", type=float
    )
    beta_search: str = _option("grid", "ExMe's betas: grid or M^3", "strategy", choices=BETA_SEARCHES)
    mixup_a: float = _option(2.0, "M^3: lambda ~ Beta(a, a)", "strategy", type=float)
    mixup_draws: int = _option(9, "M^3: how many lambdas are drawn", "strategy", type=int)
    dare: float | None = _option(None, "M^3 with DARE: the density each task vector keeps", "strategy", type=float)
    budget: int | None = _option(None, "Top-k greedy: the most merges evaluated", "strategy", type=int)
    seed: int = _option(0, "seed of the draws and of the DARE masks", "strategy", type=int)

    def __post_init__(self):
        object.__setattr__(self, "alphas", validate_grid("alphas", self.alphas, low=0.0, auto=True))
        object.__setattr__(self, "betas", validate_grid("betas", self.betas, low=0.0, high=1.0))
        for f in fields(self):
            if "choices" in f.metadata and not (f.name == "strategy" and isinstance(self.strategy, Strategy)):
                _check_choice(f.name, getattr(self, f.name), f.metadata["choices"])
        if not isinstance(self.baselines, bool):
            raise InputTypeError(f"`baselines` must be a bool, got {self.baselines!r}")
        for name, low in {"top_k": 2, "mixup_draws": 1, "budget": 1}.items():  # `budget=None` means no limit
            value = getattr(self, name)
            if (name != "budget" or value is not None) and (_not_int(value) or value < low):
                raise InputError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if _not_int(self.seed):
            raise InputError(f"`seed` must be an integer, got {self.seed!r}")
        if _not_real(self.mixup_a) or not self.mixup_a > 0:
            raise InputError(f"`mixup_a` (the `a` of Beta(a, a)) must be a number > 0, got {self.mixup_a!r}")
        if self.dare is not None and (_not_real(self.dare) or not 0 < self.dare <= 1):
            raise InputError(f"`dare` (the density kept) must be in (0, 1], got {self.dare!r}")
        object.__setattr__(self, "confidence", check_level(self.confidence))
        if _not_real(self.racing_margin) or not 0 <= self.racing_margin < math.inf:
            raise InputError(
                f"`racing_margin` must be a number >= 0 (a gain of the selection score), got {self.racing_margin!r}"
            )
        if self.min_gain is not None and self.min_gain != "significant":
            if _not_real(self.min_gain) or not 0 <= self.min_gain < math.inf:
                raise InputError(
                    "`min_gain` must be a number >= 0 (a gain of the selection score) or 'significant', got "
                    f"{self.min_gain!r}"
                )
        self._check_combinations()

    def _check_combinations(self) -> None:
        """The settings that only make sense together."""
        low, high = (0.0, math.inf) if self.kinship_metric == "euclidean" else (-1.0, 1.0)
        if _not_real(self.kinship_threshold) or not low <= self.kinship_threshold <= high:
            raise InputError(
                f"`kinship_threshold` must be in [{low}, {high}] for `kinship_metric={self.kinship_metric!r}`, got "
                f"{self.kinship_threshold!r}"
            )
        if self.partner == "kinship" and self.top_k < 3:
            raise InputError(
                "`partner='kinship'` chooses SFT-2 among the kept checkpoints after the best, which needs a choice: "
                f"set `top_k` >= 3, got {self.top_k}"
            )
        if self.racing_margin and self.search != "racing":
            raise InputError(
                f"`racing_margin={self.racing_margin!r}` stops candidates in a race: set `search='racing'` too, or "
                "leave `racing_margin` at 0."
            )
        if self.search == "racing" and self.strategy == "topk_greedy":
            raise InputError(
                "`search='racing'` races a group of candidates scored together (ExMe's stages, M^3's draws); "
                "`strategy='topk_greedy'` scores its merges one at a time: use `search='grid'`."
            )
        if (self.baselines or self.dare is not None) and importlib.util.find_spec("peft") is None:
            raise MissingExtraError(
                "TIES and DARE merges (`baselines=True`, `dare=`) use PEFT: `pip install 'exme-callback[peft]'`."
            )

    def make_strategy(self) -> Strategy:
        """The strategy these settings run: a built-in one configured from them, or the one given."""
        if isinstance(self.strategy, Strategy):
            return self.strategy
        return STRATEGIES[self.strategy].from_settings(self)

    def make_baselines(self) -> Baselines | None:
        """The paper's baselines (`baselines=True`), else `None`."""
        return Baselines.from_settings(self) if self.baselines else None

    def merge_weights(self) -> tuple[float, ...]:
        """ExMe's betas: the grid, or with `beta_search="mixup"` the seeded draws from `Beta(mixup_a, mixup_a)`."""
        if self.beta_search == "mixup":
            return mixup_draws(self.mixup_a, self.mixup_draws, self.seed)
        return self.betas


def _check_choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise InputError(f"`{name}` must be one of {tuple(allowed)}, got {value!r}")


def _not_int(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool)


def _not_real(value) -> bool:
    return not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)


def validate_grid(
    name: str, values: Iterable[float] | str, low: float, high: float = math.inf, auto: bool = False
) -> tuple[float, ...] | str:
    """Check a hyper-parameter grid: a non-empty sequence of distinct finite numbers in `[low, high]` (or, with
    `auto`, the string `"auto"`, returned as it is)."""
    if auto and isinstance(values, str) and values == AUTO:
        return AUTO
    either = f" or {AUTO!r}" if auto else ""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise InputTypeError(f"`{name}` must be a sequence of numbers{either}, got {values!r}")
    grid = tuple(values)
    bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
    if not grid or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and low <= v <= high for v in grid
    ):
        raise InputError(f"`{name}` must be a non-empty sequence of finite numbers {bounds}{either}, got {values!r}")
    if len(set(grid)) != len(grid):
        raise InputError(f"`{name}` must not repeat a value, got {values!r}")
    return tuple(float(v) for v in grid)
