"""The search on coefficient vectors: which candidates to evaluate, in which order, and which one wins.

No transformers: every candidate is a point `theta(c) = base + sum_i c_i * d_i` of the span of the kept checkpoints'
task vectors `d_i = theta_i - base` (see `span`), and a search only asks a caller-supplied function for the
score of each point. The ExMe search follows the paper, on the two best checkpoints:

1. SFT-1 and SFT-2: the two best checkpoints of training, `c = (1, 0)` and `(0, 1)`.
2. EXPO-i: `SFT_i + alpha * (SFT_i - base)` for every `alpha` of the grid, for each checkpoint separately; the best
   alpha of each is kept.
3. ExMe: `beta * EXPO_1 + (1 - beta) * EXPO_2` for every `beta` of the grid.

Each stage (the alphas of EXPO-1, of EXPO-2, the betas) is a grid, or with `search="racing"` a race (`Racing`) that
stops the candidates clearly below the leader on a subset of the items. Ranking the checkpoints of a run
(`rank_checkpoints`) and the final choice (`choose`) live here too, so the callback and the `exme` command rank and
choose the same way.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field

import torch

from .intervals import check_level, gain_interval

__all__ = [
    "CHOOSE_FROM",
    "DEFAULT_ALPHAS",
    "DEFAULT_BETAS",
    "DEFAULT_DENSITIES",
    "Candidate",
    "Checkpoint",
    "SearchSettings",
    "best",
    "RACING_ROUNDS",
    "Racing",
    "checkpoint_rows",
    "choose",
    "count_baselines",
    "count_candidates",
    "exme_coefficients",
    "is_better",
    "item_group",
    "mixup_draws",
    "rank_checkpoints",
    "sweep",
    "sweep_baselines",
    "sweep_mixup",
    "topk_greedy",
    "validate_grid",
]

logger = logging.getLogger(__name__)

DEFAULT_ALPHAS = (0.1, 0.2, 0.3, 0.4, 0.5)
DEFAULT_BETAS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
DEFAULT_DENSITIES = (0.3, 0.5, 0.7)
KINDS = ("base", "sft", "expo", "exme", "mixup", "topk", "weighted", "ties", "dare")
OFF_SPAN = ("ties", "dare")  # sparsified merges: not points of the span, `coefficients` is None
CHOOSE_FROM = {"all": ("sft", "expo", "exme", "mixup", "topk"), "exme": ("exme",)}  # what `choose_from` picks among
EXME_HYPER = ("alpha1", "alpha2", "beta")


@dataclass
class Checkpoint:
    """A training evaluation: the global step, its selection score, the metrics it came from and, when the evaluator
    gives them, the per-item scores of the score's metrics (for confidence intervals)."""

    step: int
    score: float
    metrics: dict[str, float] = field(default_factory=dict)
    items: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Candidate:
    """One evaluated model: a point `base + sum_i c_i * d_i` of the span of the kept checkpoints, or a baseline
    merge off it.

    Args:
        kind (`str`): one of `"base"`, `"sft"`, `"expo"`, `"exme"`, `"weighted"`, `"ties"`, `"dare"`.
        coefficients (`tuple[float, ...]`, *optional*): `(c_1, ..., c_k)`, one per kept checkpoint, best first;
            `None` for merges off the span (TIES, DARE).
        steps (`tuple[int | None, ...]`, *optional*): the training step of each kept checkpoint the candidate
            uses (`None` where it does not).
        hyper (`dict[str, float]`, *optional*): the hyper-parameters that made it (`alpha1`, `alpha2` and `beta`
            of the ExMe paper, `lambda` of a weighted merge, `density` of TIES and DARE).
        score (`float`, *optional*): the selection score; `metrics` the evaluation it came from.
        error (`str`, *optional*): why the score is not used for selection (a non-finite score); such a candidate
            is never chosen.
        heldout_score (`float`, *optional*): the report evaluator's score (rows of the final table only), with
            `heldout_metrics`.
        items, heldout_items (`dict[str, list[float]]`, *optional*): the per-item scores of the selection and
            held-out scores' metrics, when the evaluators give them (kept in memory, not in the report's JSON).
        interval, heldout_interval (`tuple[float, float]`, *optional*): the confidence interval of the gain over the
            best checkpoint (positive when better), from the per-item scores (`intervals.gain_interval`).

    With two kept checkpoints the ExMe paper's names read the fields: `c1`, `c2`, `step1`, `step2`, `alpha1`,
    `alpha2`, `beta`.
    """

    kind: str
    coefficients: tuple[float, ...] | None
    steps: tuple[int | None, ...] = ()
    hyper: dict[str, float] = field(default_factory=dict)
    score: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    heldout_score: float | None = None
    heldout_metrics: dict[str, float] = field(default_factory=dict)
    parents: tuple[int, ...] = ()  # Top-k greedy: the positions of the merged candidates in the results
    items: dict[str, list[float]] = field(default_factory=dict, repr=False)
    heldout_items: dict[str, list[float]] = field(default_factory=dict, repr=False)
    interval: tuple[float, float] | None = None
    heldout_interval: tuple[float, float] | None = None

    def __post_init__(self):
        if self.coefficients is not None:
            self.coefficients = tuple(float(c) for c in self.coefficients)
        self.steps = tuple(self.steps)
        self.parents = tuple(self.parents)
        for name in ("interval", "heldout_interval"):
            if getattr(self, name) is not None:
                setattr(self, name, tuple(getattr(self, name)))

    @property
    def valid(self) -> bool:
        return self.error is None and self.score is not None and math.isfinite(self.score)

    @property
    def on_span(self) -> bool:
        """Whether the candidate is a point `base + sum_i c_i * d_i` (TIES and DARE merges are not)."""
        return self.coefficients is not None

    def coefficient(self, i: int) -> float | None:
        """`c_{i+1}`: 0 beyond the kept checkpoints, `None` off the span."""
        if self.coefficients is None:
            return None
        return self.coefficients[i] if i < len(self.coefficients) else 0.0

    def step(self, i: int) -> int | None:
        """The step of the `i`-th kept checkpoint (from 0) when the candidate uses it."""
        return self.steps[i] if i < len(self.steps) else None

    c1 = property(lambda self: self.coefficient(0), doc="The coefficient of the first kept checkpoint.")
    c2 = property(lambda self: self.coefficient(1), doc="The coefficient of the second kept checkpoint.")
    step1 = property(lambda self: self.step(0), doc="The step of SFT-1, when the candidate uses it.")
    step2 = property(lambda self: self.step(1), doc="The step of SFT-2, when the candidate uses it.")
    alpha1 = property(lambda self: self.hyper.get("alpha1"), doc="EXPO-1's extrapolation strength.")
    alpha2 = property(lambda self: self.hyper.get("alpha2"), doc="EXPO-2's extrapolation strength.")
    beta = property(lambda self: self.hyper.get("beta"), doc="ExMe's weight of EXPO-1.")

    def log_values(self) -> dict[str, float]:
        """The score, coefficients and hyper-parameters under `exme/<kind>/` keys, for a trainer's logs."""
        values = {"score": self.score, **{f"c{i + 1}": c for i, c in enumerate(self.coefficients or ())}}
        return {f"exme/{self.kind}/{k}": v for k, v in {**values, **self.hyper}.items()}

    def to_dict(self) -> dict:
        """The JSON form: the fields, plus `c1, c2, ...`, `step1, step2, ...` and the ExMe paper's `alpha1`,
        `alpha2`, `beta` flat, for readers of the report."""
        k = max(2, len(self.steps), len(self.coefficients or ()))
        data = {k: v for k, v in asdict(self).items() if k not in ("items", "heldout_items")}
        data["coefficients"] = None if self.coefficients is None else list(self.coefficients)
        data["steps"] = list(self.steps)
        data["parents"] = list(self.parents)
        data.update({f"c{i + 1}": self.coefficient(i) for i in range(k)})
        data.update({f"step{i + 1}": self.step(i) for i in range(k)})
        data.update({name: self.hyper.get(name) for name in EXME_HYPER})
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        """The inverse of `to_dict`."""
        return cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})


STRATEGIES = ("exme", "mixup", "topk_greedy")
PARTNERS = ("next", "kinship")
BETA_SEARCHES = ("grid", "mixup")
SEARCHES = ("grid", "racing")


@dataclass(frozen=True)
class SearchSettings:
    r"""What the search tries and how it chooses; every setting is validated on creation.

    Args:
        alphas (`Sequence[float]`, *optional*, defaults to `(0.1, ..., 0.5)`): EXPO's extrapolation strengths, >= 0.
        betas (`Sequence[float]`, *optional*, defaults to `(0.1, ..., 0.9)`): ExMe's merge weights, in [0, 1].
        choose_from (`str`, *optional*, defaults to `"all"`): `"all"` candidates, or `"exme"` merges only.
        baselines (`bool`, *optional*, defaults to `False`): also score the weighted, TIES and DARE merges.
        strategy (`str`, *optional*, defaults to `"exme"`): `"exme"` (the paper's EXPO then merge search),
            `"mixup"` (M^3: \( \lambda \, \text{SFT-1} + (1 - \lambda) \, \text{SFT-2} \) with
            \( \lambda \sim \text{Beta}(a, a) \)), or `"topk_greedy"` (Top-k greedy merging with model kinship,
            `search.topk_greedy`).
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
        confidence (`float`, *optional*, defaults to 0.95): the level of the gains' confidence intervals, in (0, 1).
        min_gain (`float` or `str`, *optional*): keep the best checkpoint unless a candidate beats it by more than
            this: a gain of the selection score (>= 0, in its units), or `"significant"`: the gain's confidence
            interval is above zero (needs per-item scores). The best candidate that clears it is chosen. Defaults
            to the paper's plain argmax.
        search (`str`, *optional*, defaults to `"grid"`): how the ExMe strategy scores each stage (the alphas of
            EXPO-1, of EXPO-2, the betas): `"grid"` scores every candidate on every item; `"racing"` scores them on
            growing subsets of the items and stops those clearly below the leader (`Racing`); needs an evaluator
            that scores a subset of its items.
    """

    alphas: Sequence[float] = DEFAULT_ALPHAS
    betas: Sequence[float] = DEFAULT_BETAS
    choose_from: str = "all"
    baselines: bool = False
    strategy: str = "exme"
    top_k: int = 2
    partner: str = "next"
    kinship_metric: str = "pearson"
    kinship_threshold: float = 0.95
    beta_search: str = "grid"
    mixup_a: float = 2.0
    mixup_draws: int = 9
    dare: float | None = None
    budget: int | None = None
    seed: int = 0
    confidence: float = 0.95
    min_gain: float | str | None = None
    search: str = "grid"

    def __post_init__(self):
        object.__setattr__(self, "alphas", validate_grid("alphas", self.alphas, low=0.0))
        object.__setattr__(self, "betas", validate_grid("betas", self.betas, low=0.0, high=1.0))
        for name, allowed in (
            ("choose_from", tuple(CHOOSE_FROM)),
            ("strategy", STRATEGIES),
            ("partner", PARTNERS),
            ("kinship_metric", ("pearson", "cosine", "euclidean")),
            ("beta_search", BETA_SEARCHES),
            ("search", SEARCHES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"`{name}` must be one of {allowed}, got {getattr(self, name)!r}")
        if not isinstance(self.baselines, bool):
            raise TypeError(f"`baselines` must be a bool, got {self.baselines!r}")
        counts = {"top_k": 2, "mixup_draws": 1, **({"budget": 1} if self.budget is not None else {})}
        for name, low in counts.items():  # `budget=None` means no limit
            value = getattr(self, name)
            if _not_int(value) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
        if _not_real(self.mixup_a) or not self.mixup_a > 0:
            raise ValueError(f"`mixup_a` (the `a` of Beta(a, a)) must be a number > 0, got {self.mixup_a!r}")
        if self.dare is not None and (_not_real(self.dare) or not 0 < self.dare <= 1):
            raise ValueError(f"`dare` (the density kept) must be in (0, 1], got {self.dare!r}")
        low, high = (0.0, math.inf) if self.kinship_metric == "euclidean" else (-1.0, 1.0)
        if _not_real(self.kinship_threshold) or not low <= self.kinship_threshold <= high:
            raise ValueError(
                f"`kinship_threshold` must be in [{low}, {high}] for `kinship_metric={self.kinship_metric!r}`, got "
                f"{self.kinship_threshold!r}"
            )
        if self.partner == "kinship" and self.top_k < 3:
            raise ValueError(
                "`partner='kinship'` chooses SFT-2 among the kept checkpoints after the best, which needs a choice: "
                f"set `top_k` >= 3, got {self.top_k}"
            )
        if _not_int(self.seed):
            raise ValueError(f"`seed` must be an integer, got {self.seed!r}")
        if self.search == "racing" and self.strategy != "exme":
            raise ValueError(f"`search='racing'` races the ExMe strategy's stages, not `strategy={self.strategy!r}`.")
        object.__setattr__(self, "confidence", check_level(self.confidence))
        if self.min_gain is not None and self.min_gain != "significant":
            if _not_real(self.min_gain) or not 0 <= self.min_gain < math.inf:
                raise ValueError(
                    "`min_gain` must be a number >= 0 (a gain of the selection score) or 'significant', got "
                    f"{self.min_gain!r}"
                )
        if (self.baselines or self.dare is not None) and importlib.util.find_spec("peft") is None:
            raise ImportError(
                "TIES and DARE merges (`baselines=True`, `dare=`) use PEFT: `pip install 'exme-callback[peft]'`."
            )


def _not_int(value) -> bool:
    return not isinstance(value, int) or isinstance(value, bool)


def _not_real(value) -> bool:
    return not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value)


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


def rank_checkpoints(
    checkpoints: Iterable[Checkpoint], greater_is_better: bool, keep: int | None = None
) -> list[Checkpoint]:
    """The evaluated checkpoints of a run, best first: the ones ExMe keeps are the first `keep`.

    A step evaluated twice counts with its last evaluation; checkpoints with a non-finite score are left out; on a
    tie the checkpoint evaluated (or kept) first ranks first.

    Args:
        checkpoints (`Iterable[Checkpoint]`): in the order they were evaluated (or kept, then the new one).
        greater_is_better (`bool`): the direction of the score.
        keep (`int`, *optional*): return only the best `keep`.

    Example:

    ```python
    >>> ranked = rank_checkpoints([Checkpoint(10, 0.9), Checkpoint(20, 0.7), Checkpoint(30, 0.8)], False, keep=2)
    >>> [c.step for c in ranked]
    [20, 30]
    ```
    """
    latest = {c.step: c for c in checkpoints}  # the last evaluation of each step, in first-seen order
    finite = [c for c in latest.values() if is_better(c.score, None, greater_is_better)]
    ranked = sorted(finite, key=lambda c: -c.score if greater_is_better else c.score)  # stable: ties keep order
    return ranked if keep is None else ranked[:keep]


def choose(
    candidates: Sequence[Candidate],
    greater_is_better: bool,
    choose_from: str = "all",
    min_gain: float | str | None = None,
) -> Candidate:
    """The final model: the best valid candidate among `CHOOSE_FROM[choose_from]`.

    `"all"` picks among the checkpoints, EXPO and ExMe candidates, so the result is never worse than the best
    checkpoint on the selection score; `"exme"` picks the best ExMe merge, as the paper reports it, and falls back
    to `"all"` (with a warning) when no merge was scored. Baselines are never chosen. When no candidate has a
    finite score, the first checkpoint is kept.

    With `min_gain` the best checkpoint is kept unless a candidate beats it by more than `min_gain` (a gain of the
    selection score), or with `"significant"` unless the confidence interval of its gain (`Candidate.interval`) is
    above zero; the best candidate that does is chosen.
    """
    if choose_from not in CHOOSE_FROM:
        raise ValueError(f"`choose_from` must be one of {tuple(CHOOSE_FROM)}, got {choose_from!r}")
    reference = best(candidates, greater_is_better, kinds=("sft",))
    if min_gain is not None and reference is not None:
        sign = 1.0 if greater_is_better else -1.0
        if min_gain == "significant":
            clears = lambda c: c.interval is not None and c.interval[0] > 0  # noqa: E731
        else:
            clears = lambda c: sign * (c.score - reference.score) > min_gain  # noqa: E731
        cleared = [c for c in candidates if c.valid and clears(c)]
        return best(cleared, greater_is_better, kinds=CHOOSE_FROM[choose_from]) or reference
    final = best(candidates, greater_is_better, kinds=CHOOSE_FROM[choose_from])
    if final is None and choose_from != "all":
        logger.warning("ExMe: no ExMe merge was scored (one checkpoint, or none finite); choosing among all.")
        final = best(candidates, greater_is_better, kinds=CHOOSE_FROM["all"])
    if final is None:  # only reachable when every candidate failed: keep the best checkpoint
        final = next(c for c in candidates if c.kind == "sft")
    return final


def count_candidates(n_checkpoints: int, alphas: Sequence[float], betas: Sequence[float]) -> int:
    """How many evaluations `sweep` runs."""
    return min(n_checkpoints, 2) * len(alphas) + (len(betas) if n_checkpoints >= 2 else 0)


def count_baselines(n_checkpoints: int, lambdas: Sequence[float], densities: Sequence[float]) -> int:
    """How many evaluations `sweep_baselines` runs."""
    return len(lambdas) + len(OFF_SPAN) * len(densities) if n_checkpoints >= 2 else 0


def _point(k: int, steps: Sequence[int], **coefficients: float) -> dict:
    """The `coefficients` and `steps` fields of a point with `c_i` given by name (`c1=1.2`), zero elsewhere."""
    c = [0.0] * k
    for name, value in coefficients.items():
        c[int(name[1:]) - 1] = value
    return {"coefficients": tuple(c), "steps": tuple(s if x != 0.0 else None for s, x in zip(steps, c))}


def checkpoint_rows(checkpoints: Sequence[Checkpoint]) -> list[Candidate]:
    """The kept checkpoints as candidates (`kind="sft"`, the unit coefficient vectors), with the scores they got
    when they were evaluated."""
    steps = [c.step for c in checkpoints]
    return [
        Candidate(
            "sft",
            **_point(len(steps), steps, **{f"c{i + 1}": 1.0}),
            score=c.score,
            metrics=dict(c.metrics),
            items=dict(c.items),
        )
        for i, c in enumerate(checkpoints)
    ]


def sweep_baselines(
    score: Callable[[Candidate], Candidate],
    checkpoints: Sequence[Checkpoint],
    lambdas: Sequence[float] = DEFAULT_BETAS,
    densities: Sequence[float] = DEFAULT_DENSITIES,
    results: list[Candidate] | None = None,
) -> list[Candidate]:
    """The merges the ExMe paper compares against, each over its grid, of the two best checkpoints.

    - `weighted`: `lambda * SFT_1 + (1 - lambda) * SFT_2`, the point `(lambda, 1 - lambda)`;
    - `ties`: TIES-merging of the two task vectors (trim to `density`, elect signs, disjoint mean);
    - `dare`: DARE (drop to `density` at random, rescale) and average the two task vectors.

    Args:
        score (`Callable[[Candidate], Candidate]`): as for `sweep`; TIES and DARE candidates have no
            `coefficients` and their `density` in `hyper`.
        checkpoints (`Sequence[Checkpoint]`): the kept checkpoints, best first; nothing is run for fewer than two.
        lambdas (`Sequence[float]`): the weights of SFT-1 tried.
        densities (`Sequence[float]`): the fractions of each task vector kept by TIES and DARE.
        results (`list[Candidate]`, *optional*): appended to as candidates are scored.
    """
    results = [] if results is None else results
    if len(checkpoints) < 2:
        return results
    k, steps = len(checkpoints), [c.step for c in checkpoints]
    for lam in lambdas:
        point = _point(k, steps, c1=lam, c2=1.0 - lam)
        point["steps"] = (steps[0], steps[1], *point["steps"][2:])  # both, also at lambda = 0 or 1
        results.append(score(Candidate("weighted", **point, hyper={"lambda": lam})))
    for kind in OFF_SPAN:
        for density in densities:
            off_span = (steps[0], steps[1], *[None] * (k - 2))
            results.append(score(Candidate(kind, None, off_span, hyper={"density": density})))
    return results


def sweep(
    score: Callable[[Candidate], Candidate],
    checkpoints: Sequence[Checkpoint],
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    betas: Sequence[float] = DEFAULT_BETAS,
    greater_is_better: bool = False,
    results: list[Candidate] | None = None,
    race: Callable[[list[Candidate]], None] | None = None,
) -> list[Candidate]:
    """Run the ExMe search on the two best of the kept checkpoints and return every candidate in the order
    evaluated.

    Args:
        score (`Callable[[Candidate], Candidate]`): evaluates the model at `candidate.coefficients` and returns
            the candidate with `score` and `metrics` set (or `error` when it could not be scored).
        checkpoints (`Sequence[Checkpoint]`): the kept checkpoints, best first (their scores are the SFT rows').
            The coefficient vectors have one entry per checkpoint; EXPO and ExMe use the first two.
        alphas (`Sequence[float]`): the extrapolation grid, searched for each checkpoint separately.
        betas (`Sequence[float]`): the merge grid between the two best EXPO models.
        greater_is_better (`bool`): the direction of the score.
        results (`list[Candidate]`, *optional*): the list to append candidates to as they are scored (and to
            return), so that a caller still has the finished part when scoring raises.
        race (`Callable[[list[Candidate]], None]`, *optional*): scores each stage's candidates together in place
            (`Racing`; the alphas as a line, bracketed) instead of each with `score`.

    Returns:
        `list[Candidate]`: SFT, then EXPO, then ExMe candidates. With one checkpoint there is no ExMe step.
    """
    if not checkpoints:
        raise ValueError("The sweep needs one or two checkpoints (it merges the best two of those given), got none.")
    k, steps = len(checkpoints), [c.step for c in checkpoints]
    results = [] if results is None else results

    # 1. The checkpoints, with the scores they got during training (from the same evaluation).
    results += checkpoint_rows(checkpoints)

    def stage(group: list[Candidate], line: bool = False) -> list[Candidate]:
        if race is not None:
            results.extend(group)  # scored in place
            race(group, line=line)
            return group
        first = len(results)
        for candidate in group:
            results.append(score(candidate))  # one by one: a failure leaves the scored part in `results`
        return results[first:]

    # 2. EXPO: each checkpoint's best alpha (0, the checkpoint itself, when no alpha scores a finite number).
    best_alphas = []
    for i in range(min(k, 2)):
        name = f"alpha{i + 1}"
        group = [Candidate("expo", **_point(k, steps, **{f"c{i + 1}": 1.0 + a}), hyper={name: a}) for a in alphas]
        if race is not None:  # a line, in increasing alpha, for bracketing
            group.sort(key=lambda c: c.hyper[name])
        winner = best(stage(group, line=True), greater_is_better)
        best_alphas.append(0.0 if winner is None else winner.hyper[name])

    # 3. ExMe: merges of the two EXPO models.
    if k >= 2:
        alpha1, alpha2 = best_alphas
        group = []
        for beta in betas:
            c1, c2 = exme_coefficients(alpha1, alpha2, beta)
            point = _point(k, steps, c1=c1, c2=c2)
            point["steps"] = (steps[0], steps[1], *point["steps"][2:])
            group.append(Candidate("exme", **point, hyper={"alpha1": alpha1, "alpha2": alpha2, "beta": beta}))
        stage(group)
    return results


RACING_ROUNDS = (0.125, 0.25, 0.5, 1.0)  # the share of each group's items every candidate still racing is scored on


def _hyper_text(candidate: Candidate) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in candidate.hyper.items())


def item_group(metric: str) -> str:
    """The items a metric is measured on: its task (the name's prefix before `/`, as `LMEvalEvaluator` names
    metrics), or the metric itself."""
    return metric.split("/", 1)[0] if "/" in metric else metric


@dataclass
class Racing:
    """Racing (`search="racing"`): the candidates of a stage are scored on growing subsets of the items, and those
    whose gain over the leader has a confidence interval below zero stop early; the rest are scored on every item.

    Each group of items (a task) is drawn in one seeded order; round `r` scores every candidate still racing on the
    first `RACING_ROUNDS[r]` of each group's items in that order (only the items it was not scored on yet), so all
    candidates compared are scored on the same items, and a candidate is never dropped on items the leader was not
    scored on. The last round is all items: the survivors' scores are the grid's, and the stage's winner is the
    grid's unless the grid's winner was stopped while inside the noise of a smaller subset.

    Args:
        evaluate (`Callable[[Candidate, dict[str, list[int]]], dict[str, list[float]]]`): scores `candidate` on the
            items given (group -> item indices, ascending) and returns each metric's per-item scores, in that order.
        sizes (`dict[str, int]`): each group's number of items.
        objective (`Callable[[Mapping[str, float]], float]`): the score of per-metric means.
        weights (`Mapping[str, float]`): each metric's weight in a gain (`Objective.gain_weights`).
        greater_is_better (`bool`): the direction of the score.
        level (`float`, *optional*, defaults to 0.95): the confidence level that stops a candidate.
        seed (`int`, *optional*, defaults to 0): the order the items are drawn in.
    """

    evaluate: Callable[[Candidate, dict[str, list[int]]], dict[str, list[float]]]
    sizes: dict[str, int]
    objective: Callable[[dict[str, float]], float]
    weights: dict[str, float]
    greater_is_better: bool
    level: float = 0.95
    seed: int = 0
    item_evaluations: int = 0  # items scored so far, over every candidate

    def __call__(self, group: list[Candidate], line: bool = False) -> None:
        """Race `group`, scoring its candidates in place. With `line=True` the candidates lie along a line whose
        score rises then falls (EXPO's alphas, in increasing order): the first round brackets the peak, scoring
        them in order until one is clearly below the best so far and stopping the rest there unscored."""
        generator = torch.Generator().manual_seed(self.seed)
        order = {g: torch.randperm(n, generator=generator).tolist() for g, n in sorted(self.sizes.items())}
        scored = {g: [] for g in order}  # the items scored so far, in the order they were scored
        racing = list(group)
        for share in RACING_ROUNDS:
            request = {g: sorted(order[g][len(scored[g]) : math.ceil(share * len(order[g]))]) for g in order}
            for position, candidate in enumerate(racing):
                self._score(candidate, request)
                leader = best(racing[: position + 1], self.greater_is_better)
                if line and share == RACING_ROUNDS[0] and candidate is not leader:
                    seen = {g: scored[g] + request[g] for g in order}
                    if self._clearly_below(candidate, leader, seen, stop=False):
                        for later in racing[position + 1 :]:
                            later.error = f"not scored: bracketing stopped the line at {_hyper_text(candidate)}"
                        racing = racing[: position + 1]
                        break
            for g, items in request.items():
                scored[g] += items
            leader = best(racing, self.greater_is_better)
            if share < 1.0 and leader is not None:
                racing = [c for c in racing if c is leader or not self._clearly_below(c, leader, scored)]
        for candidate in racing:  # every item: back in the items' own order, paired with other evaluations
            for metric, items in candidate.items.items():
                position = scored[item_group(metric)]
                candidate.items[metric] = [v for _, v in sorted(zip(position, items))]

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

    def _clearly_below(self, candidate, leader, scored: dict[str, list[int]], stop: bool = True) -> bool:
        """Whether `candidate`'s gain over `leader`, on the items both were scored on, has its interval below zero
        (or it has no finite score); with `stop`, mark it stopped."""
        if candidate.valid:
            high = gain_interval(candidate.items, leader.items, self.weights, self.level, seed=self.seed)[1]
            if high >= 0:
                return False
        if stop:
            n = sum(map(len, scored.values()))
            candidate.error = f"stopped by racing after {n} of {sum(self.sizes.values())} items: below the leader"
            candidate.items = {}  # a subset's scores: not comparable with other evaluations
        return True


def mixup_draws(a: float, draws: int, seed: int = 0) -> tuple[float, ...]:
    """`draws` merge ratios `lambda ~ Beta(a, a)`, seeded (M^3, Mixup Model Merge, arXiv 2502.15434)."""
    rng = random.Random(seed)
    return tuple(rng.betavariate(a, a) for _ in range(draws))


def sweep_mixup(
    score: Callable[[Candidate], Candidate],
    checkpoints: Sequence[Checkpoint],
    lambdas: Sequence[float],
    pair: tuple[int, int] = (0, 1),
    density: float | None = None,
    results: list[Candidate] | None = None,
) -> list[Candidate]:
    """M^3: `lambda * SFT_a + (1 - lambda) * SFT_b` for each drawn `lambda`, as the paper merges two fine-tuned
    models. With `density`, both task vectors are first sparsified by DARE (drop to `density` at random, rescale);
    such a model is off the span (`coefficients` is None) and its masks are seeded by the plane's caller."""
    results = [] if results is None else results
    for lam in lambdas:
        point = _point(len(checkpoints), [c.step for c in checkpoints], **{f"c{pair[0] + 1}": lam})
        c = list(point["coefficients"])
        c[pair[1]] = 1.0 - lam
        steps = [c_.step if i in pair else None for i, c_ in enumerate(checkpoints)]
        hyper = {"lambda": lam} if density is None else {"lambda": lam, "density": density}
        coefficients = tuple(c) if density is None else None
        results.append(score(Candidate("mixup", coefficients, steps, hyper=hyper)))
    return results


def topk_greedy(
    score: Callable[[Candidate], Candidate],
    checkpoints: Sequence[Checkpoint],
    kinship: Callable[[Sequence[float], Sequence[float]], float],
    k: int = 2,
    budget: int | None = None,
    greater_is_better: bool = False,
    results: list[Candidate] | None = None,
    distance: bool = False,
) -> list[Candidate]:
    """Top-k greedy merging with model kinship (Hu et al. 2024), on coefficient vectors.

    The pool starts with the kept checkpoints (their training scores). Each generation:

    1. merges every pair of the pool's `k` best models and scores the merges, which join the pool;
    2. when the best score did not improve, explores: merges the best model with its least related model of the
       pool (the lowest `kinship`, or the largest with `distance=True`), and scores it;
    3. stops after a generation whose merges (exploration included) did not improve the best score, when no new
       merge is left, or when `budget` evaluations are spent.

    Differences from the paper: the merge operator is the midpoint of the two models (a linear merge with equal
    weights: their coefficient vectors averaged), so every model stays a point of the span, switched in place and
    never written to disk; the paper merges with mergekit (SLERP in its experiments), which is not linear in the
    weights. A merge already in the pool is not evaluated twice.

    Args:
        score (`Callable[[Candidate], Candidate]`): evaluates a point (see `sweep`).
        checkpoints (`Sequence[Checkpoint]`): the kept checkpoints, best first.
        kinship (`Callable`): the kinship of two coefficient vectors (`kinship.Gram.kinship`).
        k (`int`, *optional*, defaults to 2): how many of the best models each generation merges pairwise.
        budget (`int`, *optional*): the most evaluations; unlimited when `None`.
        greater_is_better (`bool`): the direction of the score.
        results (`list[Candidate]`, *optional*): appended to as candidates are scored.
        distance (`bool`, *optional*, defaults to `False`): whether `kinship` is a distance (Euclidean).

    Returns:
        `list[Candidate]`: the checkpoints, then the merges (`kind="topk"`, `hyper["generation"]`,
        `hyper["kinship"]` of the parents, `hyper["exploration"] = 1` for exploration merges, `parents`).
    """
    results = [] if results is None else results
    steps, first = [c.step for c in checkpoints], len(results)
    results += checkpoint_rows(checkpoints)
    seen = {c.coefficients for c in results[first:]}
    evaluations, generation = 0, 0

    def merge(i: int, j: int, **hyper) -> Candidate | None:
        nonlocal evaluations
        a, b = results[i].coefficients, results[j].coefficients
        c = tuple((x + y) / 2 for x, y in zip(a, b))
        if c in seen or (budget is not None and evaluations >= budget):
            return None
        seen.add(c)
        evaluations += 1
        used = tuple(s if x != 0.0 else None for s, x in zip(steps, c))
        hyper = {"generation": generation, "kinship": kinship(a, b), **hyper}
        results.append(score(Candidate("topk", c, used, hyper=hyper, parents=(i, j))))
        return results[-1]

    while budget is None or evaluations < budget:
        generation += 1
        pool = [i for i in range(first, len(results)) if results[i].valid]
        leader = best((results[i] for i in pool), greater_is_better)
        if leader is None:  # no model with a finite score to merge from
            break
        top = sorted(pool, key=lambda i: -results[i].score if greater_is_better else results[i].score)[:k]
        merged = [merge(i, j) for a, i in enumerate(top) for j in top[a + 1 :]]
        new_best = best((results[i] for i in range(first, len(results))), greater_is_better)
        if new_best is leader:  # 2. no gain: explore with the least related model of the pool
            index = results.index(leader)
            others = [i for i in pool if i != index]
            sign = -1.0 if distance else 1.0  # least related first: the lowest similarity, the largest distance
            others.sort(key=lambda i: sign * kinship(leader.coefficients, results[i].coefficients))
            explored = next((m for m in (merge(index, i, exploration=1) for i in others) if m is not None), None)
            merged.append(explored)
            new_best = best((results[i] for i in range(first, len(results))), greater_is_better)
        if new_best is leader or not any(merged):  # 3. a generation without gain (or nothing new): stop
            break
    return results
