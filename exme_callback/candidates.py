"""What a sweep evaluates and chooses among: `Checkpoint`, `Candidate`, ranking and the final choice.

Pure data and ordering: no tensors are touched here. A candidate is a point `base + sum_i c_i * d_i` of the span of
the kept checkpoints' task vectors (its `coefficients`), or a merge off it (its `merge`: TIES, DARE); the search
strategies make candidates, the pipeline scores them, and `choose` picks the final model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

from .errors import InputError
from .intervals import gain_interval
from .merges import Merge

__all__ = [
    "CHOOSE_FROM",
    "Candidate",
    "Checkpoint",
    "best",
    "choose",
    "is_better",
    "rank_checkpoints",
    "set_intervals",
]

logger = logging.getLogger(__name__)

EXME_HYPER = ("alpha1", "alpha2", "beta")  # the ExMe paper's names, flat in the JSON form
CHOOSE_FROM = {"all": None, "exme": ("exme",)}  # the kinds `choose_from` picks among (None: every kind)
REFERENCES = ("base", "weighted", "ties", "dare")  # the Base row and the paper's baselines: compared, never chosen


@dataclass
class Checkpoint:
    """A training evaluation: the global step, its selection score (`None` until scored), the metrics it came from
    and, when the evaluator gives them, the per-item scores of the score's metrics (for confidence intervals)."""

    step: int
    score: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    items: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Candidate:
    """One evaluated model: a point `base + sum_i c_i * d_i` of the span of the kept checkpoints, or a merge off it.

    Args:
        kind (`str`): what made it: `"base"`, `"sft"` (a kept checkpoint), a strategy's own kind (`"expo"`,
            `"exme"`, `"mixup"`, `"topk"`, or a custom strategy's `name`), or a baseline (`"weighted"`, `"ties"`,
            `"dare"`).
        coefficients (`tuple[float, ...]`, *optional*): `(c_1, ..., c_k)`, one per kept checkpoint, best first;
            `None` for merges off the span.
        steps (`tuple[int | None, ...]`, *optional*): the training step of each kept checkpoint the candidate
            uses (`None` where it does not).
        hyper (`dict[str, float]`, *optional*): the hyper-parameters that made it (`alpha1`, `alpha2` and `beta`
            of the ExMe paper, `lambda` of a weighted merge, `density` of TIES and DARE).
        score (`float`, *optional*): the selection score; `metrics` the evaluation it came from.
        error (`str`, *optional*): why the score is not used for selection (a non-finite score, a stopped race);
            such a candidate is never chosen.
        heldout_score (`float`, *optional*): the report evaluator's score (rows of the final table only), with
            `heldout_metrics`.
        parents (`tuple[int, ...]`, *optional*): Top-k greedy: the positions of the merged candidates in the sweep.
        items, heldout_items (`dict[str, list[float]]`, *optional*): the per-item scores of the selection and
            held-out scores' metrics, when the evaluators give them.
        interval, heldout_interval (`tuple[float, float]`, *optional*): the confidence interval of the gain over the
            best checkpoint (positive when better), from the per-item scores (`intervals.gain_interval`).
        merge (`merges.Merge`, *optional*): the merge off the span that makes the model, when `coefficients` is
            `None`.

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
    parents: tuple[int, ...] = ()
    items: dict[str, list[float]] = field(default_factory=dict, repr=False)
    heldout_items: dict[str, list[float]] = field(default_factory=dict, repr=False)
    interval: tuple[float, float] | None = None
    heldout_interval: tuple[float, float] | None = None
    merge: Merge | None = None

    def __post_init__(self):
        if self.coefficients is not None:
            self.coefficients = tuple(float(c) for c in self.coefficients)
        self.steps, self.parents = tuple(self.steps), tuple(self.parents)
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

    def record(self, score: float, metrics: dict, items: dict, heldout: bool = False) -> Candidate:
        """Take an evaluation into the selection fields (the held-out ones with `heldout=True`); a non-finite
        selection score marks the candidate as not choosable."""
        if heldout:
            self.heldout_score, self.heldout_metrics, self.heldout_items = score, metrics, items
        else:
            self.score, self.metrics, self.items = score, metrics, items
            if not math.isfinite(score):
                self.error = f"non-finite score {score}"
        return self

    def log_values(self) -> dict[str, float]:
        """The score, coefficients and hyper-parameters under `exme/<kind>/` keys, for a trainer's logs."""
        values = {"score": self.score, **{f"c{i + 1}": c for i, c in enumerate(self.coefficients or ())}}
        return {f"exme/{self.kind}/{k}": v for k, v in {**values, **self.hyper}.items()}

    def to_dict(self) -> dict:
        """The JSON form: the fields, plus `c1, c2, ...`, `step1, step2, ...` and the ExMe paper's `alpha1`,
        `alpha2`, `beta` flat, for readers of the report."""
        k = max(2, len(self.steps), len(self.coefficients or ()))
        data = {k: v for k, v in asdict(self).items() if k not in ("items", "heldout_items", "merge")}
        data["coefficients"] = None if self.coefficients is None else list(self.coefficients)
        data["steps"], data["parents"] = list(self.steps), list(self.parents)
        data["merge"] = None if self.merge is None else self.merge.to_dict()
        data.update({f"c{i + 1}": self.coefficient(i) for i in range(k)})
        data.update({f"step{i + 1}": self.step(i) for i in range(k)})
        data.update({name: self.hyper.get(name) for name in EXME_HYPER})
        return data

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        """The inverse of `to_dict`."""
        fields = {name: data[name] for name in cls.__dataclass_fields__ if name in data}
        if fields.get("merge") is not None:
            fields["merge"] = Merge.from_dict(fields["merge"])
        return cls(**fields)


def is_better(score: float, other: float | None, greater_is_better: bool) -> bool:
    """Whether `score` beats `other` (`None` is beaten by any finite score); ties are not better."""
    if not math.isfinite(score):
        return False
    if other is None:
        return True
    return score > other if greater_is_better else score < other


def best(
    candidates: Iterable[Candidate], greater_is_better: bool, kinds: Sequence[str] | None = None
) -> Candidate | None:
    """The best valid candidate (of the given kinds, when given); on a tie the earliest (the simplest) wins."""
    winner = None
    for candidate in candidates:
        if (kinds is None or candidate.kind in kinds) and candidate.valid:
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


def set_intervals(
    candidates: Iterable[Candidate],
    reference: Candidate | None,
    weights: Mapping[str, float],
    level: float = 0.95,
    seed: int = 0,
    heldout: bool = False,
) -> None:
    """Set each candidate's confidence interval of its gain over `reference` (the best checkpoint), where both have
    per-item scores (`intervals.gain_interval` with `weights`, `level` and `seed`): `interval` of the selection
    score, or with `heldout` `heldout_interval` of the held-out score."""
    items = "heldout_items" if heldout else "items"
    if reference is None or not getattr(reference, items):
        return
    for candidate in candidates:
        scored = (candidate.heldout_score if heldout else candidate.score) is not None
        if candidate is not reference and scored and getattr(candidate, items):
            interval = gain_interval(getattr(candidate, items), getattr(reference, items), weights, level, seed=seed)
            setattr(candidate, "heldout_interval" if heldout else "interval", interval)


def choose(
    candidates: Sequence[Candidate],
    greater_is_better: bool,
    choose_from: str = "all",
    min_gain: float | str | None = None,
) -> Candidate:
    """The final model: the best valid candidate of those `choose_from` names (`CHOOSE_FROM`).

    The choice falls on the checkpoints and the strategy's candidates, never on the Base row or the paper's
    baselines (`REFERENCES`). `"all"` picks among all of them, so the result is never worse than the best
    checkpoint on the selection score; `"exme"` picks the best ExMe merge, as the paper reports it, and falls back
    to `"all"` (with a warning) when no merge was scored. When no candidate has a finite score, the first
    checkpoint is kept.

    With `min_gain` the best checkpoint is kept unless a candidate beats it by more than `min_gain` (a gain of the
    selection score), or with `"significant"` unless the confidence interval of its gain (`Candidate.interval`) is
    above zero; the best candidate that does is chosen.
    """
    if choose_from not in CHOOSE_FROM:
        raise InputError(f"`choose_from` must be one of {tuple(CHOOSE_FROM)}, got {choose_from!r}")
    kinds = CHOOSE_FROM[choose_from]
    candidates = [c for c in candidates if c.kind not in REFERENCES]
    reference = best(candidates, greater_is_better, kinds=("sft",))
    if min_gain is not None and reference is not None:
        sign = 1.0 if greater_is_better else -1.0
        if min_gain == "significant":
            cleared = [c for c in candidates if c.valid and c.interval is not None and c.interval[0] > 0]
        else:
            cleared = [c for c in candidates if c.valid and sign * (c.score - reference.score) > min_gain]
        return best(cleared, greater_is_better, kinds) or reference
    final = best(candidates, greater_is_better, kinds)
    if final is None and kinds is not None:
        logger.warning("ExMe: no ExMe merge was scored (one checkpoint, or none finite); choosing among all.")
        final = best(candidates, greater_is_better)
    if final is None:  # only reachable when every candidate failed: keep the best checkpoint
        final = next(c for c in candidates if c.kind == "sft")
    return final
