"""The `Strategy` interface and the `Search` a strategy is given."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from ..candidates import Candidate, Checkpoint, best
from ..errors import InputError, UnsupportedError
from ..merges import Merge
from .line import Noise, walk_line

__all__ = ["Search", "Strategy", "run_strategy"]


class Strategy:
    """A search over the span of the kept checkpoints: which candidates to evaluate, and what the report shows.

    Subclass it and implement `search`; the rest has defaults. `search` is called once, after the kept checkpoints
    are scored, with a `Search`: it builds candidates (`search.point(kind, coefficients)`, or `search.off_span` for a
    merge off the span) and has them evaluated (`search.score(candidate)` one by one, or `search.score_stage(group)`
    for a group scored together, raced with `search="racing"`), reading each one's score to decide what to try
    next. Every candidate it scores may be chosen (with `choose_from="all"`), is logged, and is in the report.

    Attributes:
        name (`str`): the strategy's name, the report's `strategy`, and the `kind` of its candidates by default.
        label (`str`, *optional*): the label of its row in the report's table (its best candidate); defaults to
            `name`.
        description (`str`): what it did, in the words of the model card ("..., each extrapolated ...").
    """

    name: str = "custom"
    label: str | None = None
    description: str = "and searched their span with a custom strategy"

    def search(self, search: Search) -> None:
        """Propose candidates and score them through `search` (see the class docstring)."""
        raise UnsupportedError(f"{type(self).__name__} must implement `search(self, search)`.")

    def evaluations(self, k: int) -> int | None:
        """How many evaluations `search` runs with `k` kept checkpoints, for the progress bar (`None`: unknown)."""
        return None

    def rows(self, candidates: Sequence[Candidate], greater_is_better: bool) -> list[tuple[str, Candidate]]:
        """The report's rows for this strategy (label, candidate): by default its best candidate of kind `name`."""
        winner = best(candidates, greater_is_better, kinds=(self.name,))
        return [] if winner is None else [(self.label or self.name, winner)]

    def notes(self, candidates: Sequence[Candidate]) -> list[str]:
        """Markdown lines the report adds after its table (Top-k greedy lists its generations); none by default."""
        return []


class Search:
    """What a strategy works with: the kept checkpoints, candidates to build and score, and their kinship.

    Args:
        checkpoints (`Sequence[Checkpoint]`): the kept checkpoints, scored, best first (`k` of them).
        greater_is_better (`bool`): the direction of the score.
        score (`Callable[[Candidate], Candidate]`): evaluates a candidate in place (score, metrics, items; `error`
            for a non-finite score).
        race (`Callable[..., list[Candidate]]`, *optional*): scores a group of candidates together, `race(group,
            line=..., extension=...)`, and returns the stage's candidates (`Racing`); without it, a stage is scored
            one candidate at a time.
        kinship (`Callable[[Sequence[float], Sequence[float], str], float]`, *optional*): the kinship of two points
            of the span (`kinship.Gram.kinship`).
        weights (`Mapping[str, float]`, *optional*): each metric's weight in a gain (`Objective.gain_weights`): with
            per-item scores, a line's points are compared by the confidence interval of their gain (`line.Noise`);
            without, by their scores.
        level (`float`, *optional*, defaults to 0.95): that interval's confidence level.
        seed (`int`, *optional*, defaults to 0): its bootstrap's seed.

    Attributes:
        checkpoints (`list[Checkpoint]`): as given.
        candidates (`list[Candidate]`): every candidate scored so far, in order, starting with the kept checkpoints
            as `"sft"` candidates (unit coefficient vectors, with their training scores); positions in this list are
            what `Candidate.parents` refer to.
    """

    def __init__(
        self,
        checkpoints: Sequence[Checkpoint],
        greater_is_better: bool,
        score: Callable[[Candidate], Candidate],
        race: Callable[..., list[Candidate]] | None = None,
        kinship: Callable[[Sequence[float], Sequence[float], str], float] | None = None,
        weights: Mapping[str, float] | None = None,
        level: float = 0.95,
        seed: int = 0,
    ):
        if not checkpoints:
            raise InputError("A search needs at least one kept checkpoint, got none.")
        self.checkpoints, self.greater_is_better = list(checkpoints), greater_is_better
        self._score, self._race, self._kinship = score, race, kinship
        self.noise = Noise(greater_is_better, weights, level, seed)
        self.steps = [c.step for c in self.checkpoints]
        self.candidates: list[Candidate] = [
            Candidate(
                "sft",
                _unit(self.k, i),
                _steps(self.steps, (i,)),
                score=c.score,
                metrics=dict(c.metrics),
                items=dict(c.items),
            )
            for i, c in enumerate(self.checkpoints)
        ]

    @property
    def k(self) -> int:
        """The number of kept checkpoints: the length of every coefficient vector."""
        return len(self.checkpoints)

    def point(
        self, kind: str, coefficients: Sequence[float], hyper: dict | None = None, uses: Sequence[int] | None = None
    ) -> Candidate:
        """The candidate `base + sum_i coefficients[i] * d_i`; it names the steps of the checkpoints it uses (those
        with a nonzero coefficient, or `uses`)."""
        if len(coefficients) != self.k:
            raise InputError(f"`coefficients` must have one entry per kept checkpoint ({self.k}), got {coefficients}")
        used = [i for i, c in enumerate(coefficients) if c != 0.0] if uses is None else uses
        return Candidate(kind, tuple(coefficients), _steps(self.steps, used), dict(hyper or {}))

    def off_span(self, kind: str, merge: Merge, hyper: dict | None = None) -> Candidate:
        """The candidate `base + merge([d_1, ..., d_k])` (TIES, DARE: `merges.Merge`)."""
        return Candidate(kind, None, _steps(self.steps, merge.checkpoints), dict(hyper or {}), merge=merge)

    def score(self, candidate: Candidate) -> Candidate:
        """Evaluate `candidate` (score, metrics; `error` when its score is not finite) and record it."""
        self._score(candidate)
        self.candidates.append(candidate)
        return candidate

    def score_stage(
        self, group: list[Candidate], line: bool = False, extension: Sequence[Candidate] = ()
    ) -> list[Candidate]:
        """Evaluate a group of candidates that compete with each other (a stage of a search); returns the stage's
        candidates (`group`, then the points of `extension` that were scored).

        With `search="racing"` they are raced on growing subsets of the items and the clearly worse stop early
        (`error` set). `line=True` says the group lies along a line whose score rises then falls, in order
        (`line.walk_line`): a race stops it at the first clear fall (`error` set on the points after it), and the
        points of `extension` continue it past the group only while the newest point scored is clearly above the
        best before it (more than the noise: the interval of the gain with per-item scores, any gain without),
        stopping at the first clear fall; the points never reached are not recorded. Otherwise each is scored in
        turn."""
        if extension and not line:
            raise InputError("`extension` continues a line: give `line=True` with it.")
        if self._race is None and not line:
            return [self.score(candidate) for candidate in group]
        if self._race is None:  # the grid is scored whole, the extension as far as the line still rises
            stage = [*group, *extension]
            return stage[: walk_line(stage, self.score, self.noise, len(group), bracket=False)]
        self.candidates.extend(group)  # scored in place
        stage = self._race(group, line=line, extension=extension)
        self.candidates.extend(stage[len(group) :])
        return stage

    def best(self, candidates: Sequence[Candidate] | None = None) -> Candidate | None:
        """The best valid candidate of `candidates` (of everything scored so far by default)."""
        return best(self.candidates if candidates is None else candidates, self.greater_is_better)

    def kinship(self, a: Sequence[float], b: Sequence[float], metric: str = "pearson") -> float:
        """The kinship of the points `a` and `b` of the span (coefficient vectors): `"pearson"`, `"cosine"` or
        `"euclidean"` (a distance)."""
        if self._kinship is None:
            raise InputError("This search was built without the kept checkpoints' Gram matrix: no kinship.")
        return self._kinship(a, b, metric)


def run_strategy(
    strategy: Strategy,
    checkpoints: Sequence[Checkpoint],
    score: Callable[[Candidate], Candidate],
    greater_is_better: bool = False,
    **search,
) -> list[Candidate]:
    """Run `strategy` on its own, with `score` standing for the evaluation of the live model (a closed form in a
    test, say): every candidate it scored, after the kept checkpoints'. `search` takes `Search`'s `race`,
    `kinship`, `weights`, `level` and `seed`.

    Example:

    ```python
    >>> def score(candidate):  # a known optimum at c = (1.3, 0.2)
    ...     candidate.score = -((candidate.c1 - 1.3) ** 2) - (candidate.c2 - 0.2) ** 2
    ...     return candidate
    >>> kept = [Checkpoint(40, score=-0.13), Checkpoint(30, score=-2.33)]  # their scores at (1, 0) and (0, 1)
    >>> best(run_strategy(ExMe(), kept, score, greater_is_better=True), True).hyper
    {'alpha1': 0.3, 'alpha2': 0.1, 'beta': 0.9}
    ```
    """
    run = Search(checkpoints, greater_is_better, score, **search)
    strategy.search(run)
    return run.candidates


def _unit(k: int, i: int) -> tuple[float, ...]:
    return tuple(float(i == j) for j in range(k))


def _steps(steps: Sequence[int], used: Sequence[int]) -> tuple[int | None, ...]:
    return tuple(step if i in used else None for i, step in enumerate(steps))
