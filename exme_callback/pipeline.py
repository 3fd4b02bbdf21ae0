"""The ExMe pipeline: one sweep over the kept checkpoints, from their scores to the published result.

The callback (`ExMeCallback.on_train_end`) and the `exme` command are two doors onto `run`: both build a plane
(`planes.make_plane`) over the live model and hand it over with the kept checkpoints; `run` does the rest, in
named steps over one `Sweep`:

1. score the rows: the kept checkpoints not scored yet (`exme run`; the callback's were scored during training)
   and the base model;
2. plan: the kinship of the kept checkpoints (one pass over their tensors) and the merge partner;
3. search: the strategy's candidates (and the paper's baselines), each written into the live model and scored
   in-process;
4. choose: the gains' confidence intervals and the final model (`candidates.choose`);
5. held-out: the rows of the report's table scored by the report evaluator, when there is one;
6. publish: the chosen model, its tokenizer, the report, the model card and the mergekit recipe, written to the
   output folder atomically.

Every evaluation of the sweep goes through the journal (`journal.Journal`, `<output>-journal.jsonl`): a sweep
started again over the same output after a kill or a failure takes what the journal holds and evaluates only the
rest. A failure writes what was evaluated, with the error, to `<output>-failed/`, never over an earlier result, and
the plane always puts the trained weights back (unless asked to keep the chosen model).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from tqdm.auto import tqdm

from . import sharding
from .candidates import Candidate, Checkpoint, choose, set_intervals
from .io import publish_dir
from .journal import JOURNAL_SUFFIX, Evaluation, Journal, fingerprint
from .kinship import METRICS, Gram
from .merges import Merge
from .objective import item_group
from .planes import Plane
from .preflight import check_items
from .report import Report
from .scoring import Scorer
from .settings import SearchSettings
from .strategies import AUTO, Racing, Search, scored_alphas

__all__ = ["Output", "Sweep", "evaluate_base", "run", "search_order"]

logger = logging.getLogger(__name__)


@dataclass
class Output:
    """Where a sweep's result goes and who hears about it.

    Args:
        destination (`str`): the output folder (`<output_dir>/exme`), replaced atomically.
        processing_class (*optional*): the tokenizer, saved beside the model.
        sources (`dict`, *optional*): what the model card and the mergekit recipe name: `base_model` (an id or
            folder), `checkpoints` (the kept checkpoints' folders, best first), `adapter` (LoRA adapters or not).
        write (`bool`, *optional*, defaults to `True`): whether this process writes files (the main process).
        keep_chosen (`bool`, *optional*, defaults to `False`): leave the chosen model in the live model instead of
            the trained weights.
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over the evaluations.
        log (`Callable[[dict[str, float]], None]`, *optional*): receives each scored candidate's values and the
            result under `exme/` keys (`trainer.log`: TensorBoard, W&B, ...).
    """

    destination: str
    processing_class: Any = None
    sources: dict = field(default_factory=dict)
    write: bool = True
    keep_chosen: bool = False
    show_progress: bool = True
    log: Callable[[dict[str, float]], None] | None = None


def run(
    model: torch.nn.Module,
    plane: Plane,
    checkpoints: Sequence[Checkpoint],
    scorer: Scorer,
    output: Output,
    *,
    settings: SearchSettings | None = None,
    heldout: Scorer | None = None,
    base: Candidate | None = None,
    score_base: bool = False,
) -> Report:
    """Score the rows, search, choose, score held-out, publish: the whole of ExMe once the checkpoints are kept.

    Args:
        model (`torch.nn.Module`): the live model the plane writes into and the scorers evaluate.
        plane (`Plane`): the span of the kept checkpoints over `model` (`planes.make_plane`); closed on return.
        checkpoints (`Sequence[Checkpoint]`): the kept checkpoints, best first, one per block of the plane; those
            without a `score` are scored here (their scores are the SFT rows').
        scorer (`Scorer`): the selection score of a candidate.
        output (`Output`): where the result goes.
        settings (`SearchSettings`, *optional*): the strategy (a name, or a `strategies.Strategy` of your own), its
            grids and draws, `choose_from`, the baselines, racing, `min_gain`.
        heldout (`Scorer`, *optional*): scores the rows of the table on data that chose nothing.
        base (`Candidate`, *optional*): the base model's row, already scored (`evaluate_base`, before training); its
            held-out score is added here when missing.
        score_base (`bool`, *optional*, defaults to `False`): without `base`, score the base model here (the plane
            at `c = 0`) for the report's Base row, as `exme run` does.

    Returns:
        `Report`: everything evaluated and chosen; also written to `output.destination`.
    """
    sweep = Sweep(model, plane, scorer, output, settings or SearchSettings(), heldout)
    return sweep.run(checkpoints, base, score_base)


def evaluate_base(
    model: torch.nn.Module,
    scorer: Scorer,
    settings: SearchSettings,
    heldout: Scorer | None = None,
    evaluation: tuple[float, dict, dict] | None = None,
) -> Candidate:
    """The Base row of the report: the live model (the base) scored by `scorer` (or its `evaluation` as given) and
    by `heldout`. Scoring it before training checks the metrics early (`preflight.check_items`)."""
    base = Candidate("base", (0.0,) * settings.top_k)
    if evaluation is None:
        scorer.score_into(model, base)
    else:
        base.score, base.metrics, base.items = evaluation
    check_items([base], settings)
    if heldout is not None:
        heldout.score_into(model, base, heldout=True)
    return base


class Sweep:
    """The state of one sweep and its steps (`run`): the live model, the plane, the scorers, the settings, and what
    was found so far (`report`)."""

    def __init__(
        self,
        model: torch.nn.Module,
        plane: Plane,
        scorer: Scorer,
        output: Output,
        settings: SearchSettings,
        heldout: Scorer | None = None,
    ):
        self.model, self.plane, self.scorer, self.heldout = model, plane, scorer, heldout
        self.output, self.settings = output, settings
        self.strategy, self.baselines = settings.make_strategy(), settings.make_baselines()
        self.order: list[int] = []  # the plane's block of each checkpoint, in the search's order (best first)
        self.gram: Gram | None = None  # the kept checkpoints' Gram matrix, in the plane's order, then the search's
        self.journal: Journal | None = None  # the evaluations done, on disk (`open_journal`)
        self.choosable: list[Candidate] = []  # the checkpoints and the strategy's candidates, not the baselines
        self.progress = tqdm(disable=True)
        self.report = Report(
            metric=scorer.objective.name,
            greater_is_better=scorer.objective.greater_is_better,
            checkpoints=[],
            candidates=[],
            final=None,
            alphas=() if settings.alphas == AUTO else settings.alphas,  # "auto": the alphas scored (`search`)
            betas=settings.betas,
            choose_from=settings.choose_from,
            columns=list(scorer.objective.metrics),
            sources=dict(output.sources),
            strategy=self.strategy.name,
            method=self.strategy.description,
            confidence=settings.confidence,
            min_gain=settings.min_gain,
            search=settings.search,
            racing_margin=settings.racing_margin,
            seed=settings.seed,
            gain_weights=scorer.objective.gain_weights(),
        )
        if heldout is not None:
            self.report.heldout_metric = heldout.objective.name
            self.report.heldout_greater_is_better = heldout.objective.greater_is_better
            self.report.heldout_columns = list(heldout.objective.metrics)
            self.report.heldout_gain_weights = heldout.objective.gain_weights()

    def run(
        self, checkpoints: Sequence[Checkpoint], base: Candidate | None = None, score_base: bool = False
    ) -> Report:
        """The steps, in order; the plane is closed whatever happens."""
        try:
            self.open_journal(checkpoints)
            self.score_rows(list(checkpoints), base, score_base)
            self.plan()
            self.search()
            self.choose()
            self.score_heldout()
            self.publish()
            self.journal.remove()
        except BaseException as error:
            self.report.error = f"{type(error).__name__}: {error}"
            if not self.report.table:  # the rows of what was scored
                self._fill_table()
            if self.output.write:
                _write_failure(self.report, self.output.destination + "-failed")
            raise
        finally:
            self.progress.close()
            self.plane.close(keep=self.output.keep_chosen and self.report.error is None)  # else the trained weights
        message, logs = self.report.summary()
        logger.info(message)
        if self.output.log is not None:
            self.output.log(logs)
        return self.report

    # ---- the steps ---------------------------------------------------------------------------------------------

    def open_journal(self, checkpoints: Sequence[Checkpoint]) -> None:
        """0. The journal of this sweep: what an earlier start over the same output evaluated, when it had the same
        settings, evaluators and checkpoints (their steps, scores and Gram matrix: under FSDP2 and ZeRO-3 each rank
        measured its shards)."""
        self.gram = sharding.total(self.plane.gram(), self.model)
        identity = fingerprint(
            self.settings,
            self.scorer.fingerprint(),
            None if self.heldout is None else self.heldout.fingerprint(),
            [(c.step, c.score) for c in checkpoints],
            [f"{x:.6e}" for x in self.gram.inner.flatten().tolist()],
        )
        self.journal = Journal(self.output.destination + JOURNAL_SUFFIX, identity, write=self.output.write)

    def score_rows(self, checkpoints: list[Checkpoint], base: Candidate | None, score_base: bool) -> None:
        """1. The kept checkpoints not scored yet, and the base, scored like every candidate."""
        k = len(checkpoints)
        for i, checkpoint in enumerate(checkpoints):
            if checkpoint.score is None:
                checkpoint.score, checkpoint.metrics, checkpoint.items = self._evaluate(
                    tuple(float(i == j) for j in range(k))
                )
                name = self.scorer.objective.name
                logger.info(f"Checkpoint step {checkpoint.step}: {name} = {checkpoint.score:.6g}")
        if base is None and score_base:
            base = evaluate_base(self.model, self.scorer, self.settings, evaluation=self._evaluate((0.0,) * k))
        if base is not None:  # scored before the checkpoints were known: the origin of this span
            base.coefficients = (0.0,) * k
        self.report.base, self.report.checkpoints = base, checkpoints
        check_items(checkpoints, self.settings)
        if k == 1:
            logger.warning(
                "ExMe: only one checkpoint was evaluated; extrapolating it (EXPO) without a merge. Evaluate more "
                "often to merge two checkpoints."
            )

    def plan(self) -> None:
        """2. The kinship of the kept checkpoints (`gram`, from `open_journal`) and the order the search sees them
        in: the best, its merge partner (the second best, or with `partner="kinship"` the best-scoring checkpoint not
        too related to the best), the others."""
        checkpoints = self.report.checkpoints
        self.order = search_order(checkpoints, self.gram, self.settings)
        self.report.checkpoints = [checkpoints[i] for i in self.order]
        self.gram = self.gram.permuted(self.order)
        if self.report.sources.get("checkpoints"):
            self.report.sources["checkpoints"] = [self.report.sources["checkpoints"][i] for i in self.order]
        self.report.kinship = {"checkpoints": {m: self.gram.matrix(m) for m in METRICS}, "pairs": []}

    def search(self) -> None:
        """3. The strategy's candidates, then the baselines, each scored as it comes (`report.candidates` holds what
        was scored, also when a candidate fails)."""
        k, settings, objective = len(self.order), self.settings, self.scorer.objective
        race = self._racing() if settings.search == "racing" else None
        search = Search(
            self.report.checkpoints,
            self.report.greater_is_better,
            self._score,
            race,
            self.gram.kinship,
            weights=objective.gain_weights(),
            level=settings.confidence,
            seed=settings.seed,
        )
        self.report.candidates = search.candidates
        total = None if race is not None else self.strategy.evaluations(k)
        if total is not None and self.baselines is not None:
            total += self.baselines.evaluations(k)
        show = self.output.show_progress
        self.progress = tqdm(total=total, desc=f"ExMe search ({self.strategy.name})", disable=not show)
        try:
            self.strategy.search(search)
        finally:
            if settings.alphas == AUTO:
                self.report.alphas = scored_alphas(search.candidates)
        self.choosable = list(search.candidates)
        if self.baselines is not None:
            self.baselines.search(search)
        self._count_items(race)

    def choose(self) -> None:
        """4. The gains' confidence intervals (from per-item scores), the choice, the report's table."""
        report, settings = self.report, self.settings
        rows = [*report.candidates, *([report.base] if report.base else [])]
        set_intervals(rows, report.best_sft, self.scorer.objective.gain_weights(), settings.confidence, settings.seed)
        report.final = choose(self.choosable, report.greater_is_better, settings.choose_from, settings.min_gain)
        merge = report.best_exme
        report.kinship["pairs"] = self.gram.merged_pairs(None if merge is None else (merge.alpha1, merge.alpha2))
        self._fill_table()

    def score_heldout(self) -> None:
        """5. The held-out scores of the table's rows (each model once)."""
        if self.heldout is None:
            return
        self.progress.close()
        rows = [c for c in {id(c): c for _, c in self.report.rows()}.values() if c.heldout_score is None]
        self.progress = tqdm(total=len(rows), desc="ExMe held-out rows", disable=not self.output.show_progress)
        for candidate in rows:
            candidate.record(*self._evaluate(self._point(candidate), "heldout"), heldout=True)
            self.progress.update()
        rows = [c for _, c in self.report.rows()]
        weights, settings = self.heldout.objective.gain_weights(), self.settings
        set_intervals(rows, self.report.best_sft, weights, settings.confidence, settings.seed, heldout=True)

    def publish(self) -> None:
        """6. The chosen model, saved with its tokenizer and the report, in one atomic rename."""
        report, output = self.report, self.output
        self._apply(report.final)
        with publish_dir(output.destination, write=output.write) as folder:
            if output.write or sharding.is_sharded(self.model):  # a sharded model is gathered by every rank
                saved = self.plane.save(folder)
            if output.write:
                report.saved = {kind: path.replace(folder, output.destination, 1) for kind, path in saved.items()}
                if output.processing_class is not None:
                    for path in saved.values():
                        output.processing_class.save_pretrained(path)
                report.write(folder)

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _fill_table(self) -> None:
        """The report's rows between Base and the chosen model: the kept checkpoints, the baselines' rows, the
        strategy's rows (each owns which of its candidates the table shows), and the strategy's notes."""
        report, k = self.report, len(self.report.checkpoints)
        choosable = self.choosable or report.candidates  # a search that failed part way: what it scored
        gib, baselines = report.greater_is_better, report.candidates[len(choosable) :]
        report.table = [(f"SFT-{i + 1}", c) for i, c in enumerate(report.candidates[:k])]
        report.table += self.baselines.rows(baselines, gib) if self.baselines is not None else []
        report.table += self.strategy.rows(choosable, gib)
        report.notes = self.strategy.notes(report.candidates)

    def _point(self, candidate: Candidate) -> tuple[float, ...] | Merge:
        """What the plane applies to compute `candidate`: its coefficients (or its merge's checkpoints) are in the
        search's order, the plane's blocks in the order it was built with."""
        if candidate.on_span:
            point = [0.0] * len(self.order)
            for i, j in enumerate(self.order):
                point[j] = candidate.coefficients[i]
            return tuple(point)
        merge = candidate.merge
        return dataclasses.replace(merge, checkpoints=tuple(self.order[i] for i in merge.checkpoints))

    def _apply(self, candidate: Candidate) -> None:
        """Make the live model compute `candidate`."""
        self.plane.apply(self._point(candidate))

    def _evaluate(
        self, point: tuple[float, ...] | Merge, role: str = "selection", items: dict | None = None
    ) -> Evaluation:
        """The selection (or `"heldout"`) evaluation of the model at `point` (on `items` only, for a race): from the
        journal when an earlier start of this sweep did it, else written into the live model, scored, and
        journaled before the next evaluation starts."""
        key = self.journal.key(role, point.to_dict() if isinstance(point, Merge) else point, items)
        evaluation = self.journal.get(key)
        if evaluation is None:
            self.plane.apply(point)
            scorer = self.heldout if role == "heldout" else self.scorer
            evaluation = Evaluation(*scorer(self.model, items=items))
            self.journal.add(key, evaluation)
        return evaluation

    def _score(self, candidate: Candidate) -> Candidate:
        candidate.record(*self._evaluate(self._point(candidate)))
        if self.output.log is not None and candidate.valid:
            self.output.log(candidate.log_values())
        self.progress.update()
        return candidate

    def _racing(self) -> Racing:
        """The race of `search="racing"`: candidates scored on subsets of the items of the kept checkpoints'
        evaluations (whose sizes it reads)."""
        sizes = {item_group(metric): len(items) for metric, items in self.report.checkpoints[0].items.items()}

        def evaluate(candidate: Candidate, request: dict[str, list[int]]) -> dict[str, list[float]]:
            items = self._evaluate(self._point(candidate), items=request).items
            self.progress.update()
            return items

        objective, settings = self.scorer.objective, self.settings
        return Racing(
            evaluate,
            sizes,
            objective,
            objective.gain_weights(),
            self.report.greater_is_better,
            level=settings.confidence,
            seed=settings.seed,
            margin=settings.racing_margin,
        )

    def _count_items(self, race: Racing | None) -> None:
        """The item evaluations the search used, and those of its grid (every candidate on every item), when the
        evaluations are per item."""
        items = self.report.checkpoints[0].items
        if not items:
            return
        per_candidate = sum({item_group(m): len(v) for m, v in items.items()}.values())
        scored = len(self.choosable) - len(self.order)
        grid = self.strategy.evaluations(len(self.order))
        self.report.grid_item_evaluations = (scored if grid is None else grid) * per_candidate
        self.report.item_evaluations = scored * per_candidate if race is None else race.item_evaluations


def search_order(checkpoints: Sequence[Checkpoint], gram: Gram, settings: SearchSettings) -> list[int]:
    """The order the search sees the kept checkpoints in: the best first, then its merge partner (the second best,
    or with `partner="kinship"` the best-scoring checkpoint not too related to the best), then the others."""
    n = len(checkpoints)
    partner = 1
    if settings.partner == "kinship" and n > 2:
        metric, threshold = settings.kinship_metric, settings.kinship_threshold
        unit = [tuple(float(i == j) for j in range(n)) for i in range(n)]
        values = [gram.kinship(unit[0], unit[j], metric) for j in range(1, n)]
        far = [j + 1 for j, v in enumerate(values) if (v > threshold if metric == "euclidean" else v < threshold)]
        if far:
            partner = far[0]
        else:
            logger.warning(
                f"ExMe: every kept checkpoint has {metric} kinship {'<=' if metric == 'euclidean' else '>='} "
                f"{threshold} with the best; merging the second best."
            )
    return [0, partner, *(i for i in range(1, n) if i != partner)] if n > 1 else [0]


def _write_failure(report: Report, destination: str) -> None:
    """Write what the failed sweep evaluated, with the error, beside any earlier result (never over it)."""
    try:
        with publish_dir(destination) as folder:
            report.write(folder)
        logger.error(
            f"ExMe: the sweep failed ({report.error}); what it evaluated is in {destination}. Started again over the "
            "same output, it resumes from its journal."
        )
    except Exception as error:  # a full disk, say: the original error matters more
        logger.error(f"ExMe: the sweep failed ({report.error}) and its report could not be written: {error}")
