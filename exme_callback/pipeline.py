"""The ExMe pipeline: a plane over the base and the kept checkpoints, a scorer and the search settings in, the
chosen model and its report out.

The callback (`ExMeCallback.on_train_end`) and the `exme` command are two doors onto `run`: both build a plane
(`planes.make_plane`) over the live model, then

1. sweep the candidates (EXPO, ExMe; the paper's baselines for the report), each written into the live model and
   scored in-process;
2. choose the final model (`search.choose`);
3. score the rows of the report's table with the held-out scorer, when there is one;
4. write the chosen model, its tokenizer, the report, the model card and the mergekit recipe to the output folder,
   atomically. A failure writes what was evaluated, with the error, to `<output>-failed/`, never over an earlier
   result, and the plane always puts the trained weights back (unless asked to keep the chosen model).
"""

from __future__ import annotations

import logging
import os
import tempfile
from collections.abc import Callable, Sequence
from functools import partial

import torch
from tqdm.auto import tqdm

from . import sharding
from .intervals import gain_interval
from .io import publish_dir
from .kinship import METRICS, Gram
from .lora import check_peft_model, is_peft_model
from .merges import Merge
from .planes import Plane, Point
from .report import Report
from .scoring import Scorer, as_evaluator
from .search import (
    DEFAULT_DENSITIES,
    Candidate,
    Checkpoint,
    Racing,
    SearchSettings,
    checkpoint_rows,
    choose,
    count_baselines,
    count_candidates,
    item_group,
    mixup_draws,
    sweep,
    sweep_baselines,
    sweep_mixup,
    topk_greedy,
)
from .snapshots import trainable_tensors

__all__ = [
    "apply",
    "check_items",
    "check_racing",
    "check_model",
    "check_trainer_run",
    "check_writable",
    "point_of",
    "run",
    "search_order",
    "sources_of",
]

logger = logging.getLogger(__name__)


def sources_of(model: torch.nn.Module, checkpoints: Sequence[str]) -> dict:
    """What the model card and the mergekit recipe name: the base model the live model records (an adapter's
    `base_model_name_or_path`, else the config's `name_or_path`), the kept checkpoints' folders (absolute paths),
    and whether they are LoRA adapters."""
    adapter = is_peft_model(model)
    config = model.peft_config[model.active_adapter] if adapter else None
    base = getattr(config, "base_model_name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if base and os.path.isdir(base):  # a local folder: absolute, so the recipe replays from anywhere
        base = os.path.abspath(base)
    folders = [os.path.abspath(folder) for folder in checkpoints]
    return {"base_model": base or None, "checkpoints": folders, "adapter": adapter}


def check_trainer_run(args, trainer=None, needs_eval_dataset: bool = False) -> None:
    """Refuse, before training, a `Trainer` run whose checkpoints ExMe cannot rank or whose weights it cannot blend,
    saying how to fix it."""
    if args.eval_strategy == "no":
        raise ValueError(
            "ExMeCallback ranks checkpoints by their evaluations, but `eval_strategy` is 'no'. Set "
            "`eval_strategy='steps'` with `eval_steps`, or `eval_strategy='epoch'`."
        )
    if needs_eval_dataset and trainer.eval_dataset is None:
        raise ValueError(
            "ExMeCallback scores candidates with the trainer's evaluation, but the trainer has no `eval_dataset`. "
            "Pass `eval_dataset=` to the trainer, or `evaluator=` to the callback."
        )
    fsdp = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    if fsdp is not None and getattr(fsdp, "fsdp_version", 2) == 1:
        raise NotImplementedError(
            "ExMeCallback does not support FSDP1: its flat parameters hide the tensors ExMe keeps. Use FSDP2: "
            "`fsdp_version: 2` in the accelerate config, or `fsdp_config={'version': 2}` in the training arguments."
        )


def check_model(model: torch.nn.Module, save_merged: bool = False, settings: SearchSettings | None = None) -> None:
    """Refuse, before any work, a model whose candidates cannot be built: unsupported PEFT set-ups, quantized
    weights outside a LoRA adapter, no trainable parameters, FSDP1, and under FSDP2 the merges that are not
    elementwise (`settings`' TIES and DARE baselines, DARE-sparsified M^3)."""
    sharding.check_model(model)
    peft = is_peft_model(model)
    if sharding.is_sharded(model) and peft:
        raise NotImplementedError(
            "ExMe does not support LoRA in sharded runs (FSDP2, DeepSpeed ZeRO-3) yet: the rank-concatenated adapter "
            "of its candidates needs whole factors, which those shard. LoRA adapters are small: train them with DDP "
            "or ZeRO-1/2 (`torchrun` or `accelerate launch`), where ExMe keeps about three adapters per process."
        )
    if sharding.is_sharded(model) and settings is not None and (settings.baselines or settings.dare is not None):
        raise NotImplementedError(
            "In a sharded run (FSDP2, ZeRO-3) each rank blends only its shards, but TIES trims and DARE drops entries "
            "over whole tensors, so neither `baselines=True` nor `dare=` is supported in a sharded run: leave them "
            "unset."
        )
    if peft:
        check_peft_model(model)
    quantized = getattr(model, "is_quantized", False) or any(not p.is_floating_point() for p in model.parameters())
    if quantized and (not peft or save_merged):  # a `PeftModel` answers `is_quantized` for its base model
        raise NotImplementedError(
            "ExMe cannot blend quantized weights (int8/4-bit): their values are codes, not numbers to extrapolate. "
            "Fine-tune a LoRA adapter on the quantized model (QLoRA) without `save_merged`, or load the model "
            "unquantized."
        )
    if not trainable_tensors(model):
        raise ValueError(
            "ExMe found no trainable parameters in the model (all have `requires_grad=False`): nothing to extrapolate."
        )


def check_items(evaluations: Sequence[Checkpoint | Candidate], settings: SearchSettings) -> None:
    """Refuse per-item scores that differ in number between evaluations (they must be the same items), and
    `min_gain="significant"` and `search="racing"` when an evaluation has none (checked on the first one, before
    training, where the callback scores the base model)."""
    counts = {tuple((m, len(v)) for m, v in e.items.items()) for e in evaluations if e.items}
    if len(counts) > 1:
        raise ValueError(
            f"The evaluator's per-item scores differ between evaluations ({' vs '.join(map(str, counts))} items per "
            "metric): it must score the same items, in the same order, every time."
        )
    if all(e.items for e in evaluations):
        return
    if settings.min_gain == "significant":
        raise ValueError(
            "`min_gain='significant'` compares candidates with the best checkpoint item by item, but the evaluator "
            "gave aggregate scores only. Return per-item scores (a list per metric; `LMEvalEvaluator` does), or "
            "give `min_gain` a number."
        )
    if settings.search == "racing":
        raise ValueError(
            "`search='racing'` compares candidates item by item, but the evaluator gave aggregate scores only. "
            "Return per-item scores (a list per metric; `LMEvalEvaluator` does), or use `search='grid'`."
        )


def check_racing(evaluator, settings: SearchSettings) -> None:
    """Refuse `search="racing"` with an evaluator that cannot score a subset of its items (`scores_subsets`)."""
    if settings.search == "racing" and not as_evaluator(evaluator).scores_subsets:
        raise ValueError(
            "`search='racing'` scores candidates on growing subsets of the items, but the evaluator takes no `items` "
            "argument. Give an evaluator `fn(model, items=None)` that, when `items` maps each group of items (a "
            "task, or the metric's name) to indices, scores only those (`LMEvalEvaluator` does; an `Evaluator` "
            "subclass declares `scores_subsets = True`), or use `search='grid'`."
        )


def check_writable(destination: str, setting: str) -> None:
    """Fail before the work, not after it, when the result could not be written to `destination` (`setting`
    names what the user changes to fix it)."""
    parent = os.path.dirname(os.path.abspath(destination))
    try:
        os.makedirs(parent, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise OSError(
            f"ExMe writes its result to {destination}, but {parent} is not writable ({error}). Set {setting} to a "
            "writable folder."
        ) from error


def point_of(candidate: Candidate, order: Sequence[int] | None = None, seed: int = 0) -> Point:
    """What the plane applies for `candidate`: its coefficient vector, or, off the span, the `Merge` of the task
    vectors of the checkpoints it uses: TIES with weights 1, DARE with weights 1/n, M^3 with DARE
    (`lambda * DARE(d_a) + (1 - lambda) * DARE(d_b)`), its masks drawn with `seed`. `order[i]` is the plane's
    block of the candidate's `i`-th checkpoint."""
    if candidate.on_span:
        return candidate.coefficients
    used = [i for i, step in enumerate(candidate.steps) if step is not None]
    if candidate.kind == "ties":  # trim, elect signs, disjoint mean
        method, weights = "ties", [1.0] * len(used)
    elif candidate.kind == "mixup":  # sparsify each task vector, then mix
        lam = candidate.hyper["lambda"]
        method, weights = "dare", [lam, 1.0 - lam]
    elif candidate.kind == "dare":  # random drop and rescale, then the mean
        method, weights = "dare", [1.0 / len(used)] * len(used)
    else:  # not a merge: `Merge` refuses it, naming the known methods
        method, weights = candidate.kind, []
    checkpoints = tuple(used if order is None else (order[i] for i in used))
    return Merge(method, checkpoints, weights, candidate.hyper["density"], seed)


def apply(plane: Plane, candidate: Candidate, order: Sequence[int] | None = None, seed: int = 0) -> None:
    """Make the live model compute `candidate`. Random masks (DARE) are seeded, so every application of a candidate
    is the same model. `order[i]` is the plane's block of the candidate's `i`-th checkpoint (the search may rank
    the plane's checkpoints in another order)."""
    point = point_of(candidate, order, seed)
    if not isinstance(point, Merge) and order is not None and list(order) != sorted(order):
        permuted = [0.0] * len(order)
        for i, j in enumerate(order):
            permuted[j] = point[i]
        point = tuple(permuted)
    plane.apply(point)


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


def run(
    model: torch.nn.Module,
    plane: Plane,
    checkpoints: Sequence[Checkpoint],
    scorer: Scorer,
    destination: str,
    *,
    settings: SearchSettings | None = None,
    heldout: Scorer | None = None,
    base: Candidate | None = None,
    processing_class=None,
    sources: dict | None = None,
    keep_chosen: bool = False,
    write: bool = True,
    show_progress: bool = True,
    log: Callable[[dict[str, float]], None] | None = None,
) -> Report:
    """Search, choose, score held-out, publish: the whole of ExMe once the checkpoints are kept.

    Args:
        model (`torch.nn.Module`): the live model the plane writes into and the scorers evaluate.
        plane (`Plane`): the span of the kept checkpoints over `model` (`make_plane`); closed on return.
        checkpoints (`Sequence[Checkpoint]`): the kept checkpoints, best first, scored by `scorer` (their scores are
            the SFT rows'); one per block of the plane.
        scorer (`Scorer`): the selection score of a candidate.
        destination (`str`): the output folder (`<output_dir>/exme`).
        settings (`SearchSettings`, *optional*): the strategy, its grids and draws, `choose_from`, the baselines.
        heldout (`Scorer`, *optional*): scores the rows of the table on data that chose nothing.
        base (`Candidate`, *optional*): the base model's row, already scored (the held-out score too, or it is
            added here).
        processing_class (*optional*): the tokenizer, saved beside the model.
        sources (`dict`, *optional*): what the model card and the mergekit recipe name: `base_model` (an id or
            folder), `checkpoints` (the kept checkpoints' folders), `adapter` (whether they are LoRA adapters).
        keep_chosen (`bool`, *optional*, defaults to `False`): leave the chosen model in `model` instead of the
            trained weights.
        write (`bool`, *optional*, defaults to `True`): whether this process writes files (the main process).
        show_progress (`bool`, *optional*, defaults to `True`): a progress bar over the evaluations.
        log (`Callable[[dict[str, float]], None]`, *optional*): receives each scored candidate's values and the
            result under `exme/` keys (`trainer.log`: TensorBoard, W&B, ...).

    Returns:
        `Report`: everything evaluated and chosen; also written to `destination`.
    """
    settings = settings or SearchSettings()
    sources = dict(sources or {})
    n = len(checkpoints)
    if base is not None:  # scored before the checkpoints were known: the origin of this span
        base.coefficients = (0.0,) * n
    report = Report(
        metric=scorer.objective.name,
        greater_is_better=scorer.objective.greater_is_better,
        checkpoints=list(checkpoints),
        candidates=[],  # filled by the search as candidates are scored
        final=None,
        alphas=settings.alphas,
        betas=settings.betas,
        choose_from=settings.choose_from,
        base=base,
        columns=list(scorer.objective.metrics),
        sources=sources,
        strategy=settings.strategy,
        confidence=settings.confidence,
        min_gain=settings.min_gain,
        search=settings.search,
    )
    if heldout is not None:
        report.heldout_metric = heldout.objective.name
        report.heldout_greater_is_better = heldout.objective.greater_is_better
        report.heldout_columns = list(heldout.objective.metrics)
    check_items(checkpoints, settings)
    if n == 1:
        logger.warning(
            "ExMe: only one checkpoint was evaluated; extrapolating it (EXPO) without a merge. Evaluate more often "
            "to merge two checkpoints."
        )
    progress = tqdm(total=_count(settings, n), desc=f"ExMe search ({settings.strategy})", disable=not show_progress)
    order = list(range(n))

    def evaluate(candidate: Candidate, by: Scorer, heldout: bool = False) -> None:
        apply(plane, candidate, order, settings.seed)
        by.score_into(model, candidate, heldout=heldout)

    def score(candidate: Candidate) -> Candidate:
        evaluate(candidate, scorer)
        if log is not None and candidate.valid:
            log(candidate.log_values())
        progress.update()
        return candidate

    try:
        # 0. The kinship of the kept checkpoints (one pass over their tensors) and the merge partner.
        gram = sharding.total(plane.gram(), model)  # under FSDP2, each rank measured its shards
        order[:] = search_order(checkpoints, gram, settings)
        checkpoints = report.checkpoints = [checkpoints[i] for i in order]
        gram = gram.permuted(order)
        if sources.get("checkpoints"):
            sources["checkpoints"] = [sources["checkpoints"][i] for i in order]
        report.kinship = {"checkpoints": {metric: gram.matrix(metric) for metric in METRICS}, "pairs": []}
        # 1. The search (and the paper's baselines, for the report).
        race = None
        if settings.search == "racing":
            applied = partial(apply, plane, order=order, seed=settings.seed)
            race = _racing(model, checkpoints, scorer, settings, report.greater_is_better, applied)
            race.evaluate = _counted(race.evaluate, progress)
        _search(score, checkpoints, gram, settings, report, race)
        _count_items(report, checkpoints, settings, race)
        # 2. The gains' confidence intervals (from per-item scores), the choice, the kinship of what was merged.
        rows = [*report.candidates, *([base] if base is not None else [])]
        _intervals(rows, report.best_sft, scorer.objective, settings)
        report.final = choose(report.candidates, report.greater_is_better, settings.choose_from, settings.min_gain)
        report.kinship["pairs"] = _merged_pairs(report, gram)
        # 3. The held-out scores of the table's rows.
        if heldout is not None:
            progress.close()
            rows = [c for c in {id(c): c for _, c in report.rows()}.values() if c.heldout_score is None]
            progress = tqdm(total=len(rows), desc="ExMe held-out rows", disable=not show_progress)
            for candidate in rows:
                evaluate(candidate, heldout, heldout=True)
                progress.update()
            _intervals([c for _, c in report.rows()], report.best_sft, heldout.objective, settings, heldout=True)
        # 4. The chosen model, saved.
        apply(plane, report.final, order, settings.seed)
        with publish_dir(destination, write=write) as folder:
            if write or sharding.is_sharded(model):  # a sharded model is gathered by every rank
                saved = plane.save(folder)
            if write:
                report.saved = {kind: path.replace(folder, destination, 1) for kind, path in saved.items()}
                if processing_class is not None:
                    for path in saved.values():
                        processing_class.save_pretrained(path)
                report.write(folder)
    except BaseException as error:
        report.error = f"{type(error).__name__}: {error}"
        if write:
            _write_failure(report, destination + "-failed")
        raise
    finally:
        progress.close()
        plane.close(keep=keep_chosen and report.error is None)  # else the trained weights, exactly
    message, logs = report.summary()
    logger.info(message)
    if log is not None:
        log(logs)
    return report


def _count(settings: SearchSettings, n: int) -> int | None:
    """How many evaluations the search runs (None when the strategy decides as it goes)."""
    if settings.strategy == "topk_greedy":
        return settings.budget
    if settings.search == "racing":  # the race decides how many candidates reach each round
        return None
    if settings.strategy == "mixup":
        total = settings.mixup_draws if n >= 2 else 0
    else:
        total = count_candidates(n, settings.alphas, _betas(settings))
    return total + (count_baselines(n, settings.betas, DEFAULT_DENSITIES) if settings.baselines else 0)


def _betas(settings: SearchSettings) -> Sequence[float]:
    if settings.beta_search == "mixup":
        return mixup_draws(settings.mixup_a, settings.mixup_draws, settings.seed)
    return settings.betas


def _search(
    score, checkpoints: Sequence[Checkpoint], gram: Gram, settings: SearchSettings, report: Report, race=None
) -> None:
    """Run the strategy, appending to `report.candidates` as candidates are scored."""
    results, gib = report.candidates, report.greater_is_better
    if settings.strategy == "exme":
        sweep(score, checkpoints, settings.alphas, _betas(settings), gib, results=results, race=race)
    elif settings.strategy == "mixup":
        results += checkpoint_rows(checkpoints)
        if len(checkpoints) >= 2:
            draws = mixup_draws(settings.mixup_a, settings.mixup_draws, settings.seed)
            sweep_mixup(score, checkpoints, draws, density=settings.dare, results=results)
    else:
        metric = settings.kinship_metric

        def kinship(a, b) -> float:
            return gram.kinship(a, b, metric)

        topk_greedy(score, checkpoints, kinship, settings.top_k, settings.budget, gib, results, metric == "euclidean")
    if settings.baselines:
        sweep_baselines(score, checkpoints, settings.betas, DEFAULT_DENSITIES, results=results)


def _intervals(
    candidates: Sequence[Candidate],
    reference: Candidate | None,
    objective,
    settings: SearchSettings,
    heldout: bool = False,
) -> None:
    """Set each candidate's confidence interval of its gain over `reference` (the best checkpoint), where both have
    per-item scores: of the selection score, or of the held-out score."""
    field = "heldout_items" if heldout else "items"
    if reference is None or not getattr(reference, field):
        return
    for candidate in candidates:
        scored = (candidate.heldout_score if heldout else candidate.score) is not None
        if candidate is not reference and scored and getattr(candidate, field):
            interval = gain_interval(
                getattr(candidate, field),
                getattr(reference, field),
                objective.gain_weights(),
                settings.confidence,
                seed=settings.seed,
            )
            setattr(candidate, "heldout_interval" if heldout else "interval", interval)


def _racing(model, checkpoints: Sequence[Checkpoint], scorer: Scorer, settings: SearchSettings, gib, apply_to):
    """The race of `search="racing"`: each candidate is applied with `apply_to` and scored on subsets of the items
    of the kept checkpoints' evaluations (whose sizes it reads)."""
    sizes = {item_group(metric): len(items) for metric, items in checkpoints[0].items.items()}

    def evaluate(candidate: Candidate, request: dict[str, list[int]]) -> dict[str, list[float]]:
        apply_to(candidate)
        return scorer(model, items=request)[2]

    weights = scorer.objective.gain_weights()
    return Racing(evaluate, sizes, scorer.objective, weights, gib, settings.confidence, settings.seed)


def _counted(evaluate, progress):
    """`evaluate`, advancing the progress bar once per call."""

    def counted(candidate, request):
        items = evaluate(candidate, request)
        progress.update()
        return items

    return counted


def _count_items(report: Report, checkpoints: Sequence[Checkpoint], settings: SearchSettings, race) -> None:
    """The item evaluations the ExMe search used, and those of its grid (every candidate on every item), when the
    evaluations are per item."""
    if not checkpoints[0].items or settings.strategy != "exme":
        return
    items = sum({item_group(m): len(v) for m, v in checkpoints[0].items.items()}.values())
    report.grid_item_evaluations = count_candidates(len(checkpoints), settings.alphas, _betas(settings)) * items
    report.item_evaluations = report.grid_item_evaluations if race is None else race.item_evaluations


def _merged_pairs(report: Report, gram: Gram) -> list[dict]:
    """The kinship of the pairs the report's merges combine: SFT-1 and SFT-2 (the weighted merge, the baselines),
    and EXPO-1 and EXPO-2 at the best ExMe merge's alphas."""
    if gram.k < 2:
        return []
    unit = [tuple(float(i == j) for j in range(gram.k)) for i in range(2)]
    pairs = [("SFT-1 / SFT-2", unit[0], unit[1])]
    merge = report.best_exme
    if merge is not None:
        expo = [tuple((1.0 + merge.hyper[f"alpha{i + 1}"]) * c for c in unit[i]) for i in range(2)]
        label = f"EXPO-1 (alpha1={merge.alpha1:g}) / EXPO-2 (alpha2={merge.alpha2:g})"
        pairs.append((label, *expo))
    return [
        {"models": label, "a": list(a), "b": list(b), **{m: gram.kinship(a, b, m) for m in METRICS}}
        for label, a, b in pairs
    ]


def _write_failure(report: Report, destination: str) -> None:
    """Write what the failed sweep evaluated, with the error, beside any earlier result (never over it)."""
    try:
        with publish_dir(destination) as folder:
            report.write(folder)
        logger.error(f"ExMe: the sweep failed ({report.error}); what it evaluated is in {destination}.")
    except Exception as error:  # a full disk, say: the original error matters more
        logger.error(f"ExMe: the sweep failed ({report.error}) and its report could not be written: {error}")
