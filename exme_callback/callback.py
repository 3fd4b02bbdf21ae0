"""`ExMeCallback`: Extrapolation Merging for any `Trainer` run, as one callback."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict

import torch
from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .arithmetic import DensePlane
from .evaluators import Evaluator, LMEvalEvaluator, Objective, TrainerEvaluator, muted, numeric_metrics, preserved_rng
from .lora import LoraPlane, check_peft_model, is_peft_model
from .report import Report, publish_dir
from .search import (
    DEFAULT_ALPHAS,
    DEFAULT_BETAS,
    DEFAULT_DENSITIES,
    OFF_PLANE,
    Candidate,
    Checkpoint,
    best,
    count_baselines,
    count_candidates,
    is_better,
    sweep,
    sweep_baselines,
    validate_grid,
)
from .snapshots import STORAGES, SnapshotStore, trainable_tensors

__all__ = ["ExMeCallback"]

logger = logging.getLogger(__name__)

CHOOSE_FROM = ("all", "exme")
STATE_DIR, STATE_FILE = "exme", "exme_state.json"  # the callback's state inside each checkpoint folder


class ExMeCallback(TrainerCallback):
    r"""Extrapolation Merging (ExMe): a free improvement of a fine-tuned model, searched when training ends.

    During training the callback keeps the trainable tensors of the base model and of the two best evaluated
    checkpoints (SFT-1, SFT-2). When training ends it evaluates, in-process, models on the plane

    $$
    \theta(c_1, c_2) = \theta_\text{base} + c_1 (\theta_\text{SFT-1} - \theta_\text{base})
        + c_2 (\theta_\text{SFT-2} - \theta_\text{base})
    $$

    1. EXPO-i: \\( c_i = 1 + \alpha \\) for each \\( \alpha \\) of `alphas`, for each checkpoint separately;
    2. ExMe: \\( \beta \cdot \text{EXPO-1} + (1 - \beta) \cdot \text{EXPO-2} \\) for each \\( \beta \\) of `betas`,
       with each checkpoint's best \\( \alpha \\);

    then saves the best model, its tokenizer and a report to `<output_dir>/exme/`, and puts the trained weights
    back in the model.

    Args:
        trainer (`transformers.Trainer`, *optional*):
            The trainer this callback is added to (TRL trainers work the same). Its evaluation scores the
            candidates unless `evaluator` is given, and its logging reports the result.
        evaluator (`Callable[[torch.nn.Module], Mapping[str, float]]`, *optional*):
            Scores a model: called on the live model at every training evaluation and for every candidate. Needed
            when `trainer` is not given. `LMEvalEvaluator` runs lm-evaluation-harness tasks.
        report_evaluator (`Callable[[torch.nn.Module], Mapping[str, float]]`, *optional*):
            A second evaluator (a held-out split, other tasks) that scores the rows of the final table, so the gain
            is also measured on data that chose nothing. It never influences a choice.
        metrics (`str`, `list[str]` or `dict[str, str]`, *optional*):
            The selection score: one metric, or several averaged like the ExMe paper's overall score, each with
            its direction (`{"eval_accuracy": "max", "eval_loss": "min"}`; a bare name is lower-is-better when it
            ends in `"loss"`). Defaults to the trainer's `metric_for_best_model` and `greater_is_better`, else
            `"eval_loss"` (lower is better). With an `LMEvalEvaluator`, the default is the mean of all its task
            metrics, like the paper's "Average" column. The report evaluator's score averages its own metrics the
            same way: see `report_metrics`.
        report_metrics (`str`, `list[str]` or `dict[str, str]`, *optional*):
            The report evaluator's score, in the format of `metrics`. Defaults to its `directions` (an
            `LMEvalEvaluator`'s task metrics), else to the selection metrics.
        alphas (`Sequence[float]`, *optional*, defaults to `(0.1, 0.2, 0.3, 0.4, 0.5)`):
            Extrapolation strengths (>= 0) tried for each kept checkpoint.
        betas (`Sequence[float]`, *optional*, defaults to `(0.1, ..., 0.9)`):
            Merge weights (in [0, 1]) of EXPO-1 tried between the two EXPO models.
        baselines (`bool`, *optional*, defaults to `False`):
            Also evaluate the ExMe paper's baselines for the report: the weighted merge of SFT-1 and SFT-2 (over
            the `betas` grid), TIES and DARE (densities 0.3, 0.5, 0.7; with `peft.utils.merge_utils`, full
            fine-tuning only). Baselines are never chosen.
        choose_from (`str`, *optional*, defaults to `"all"`):
            `"all"`: the final model is the best of every SFT, EXPO and ExMe candidate, so it is never worse than
            the best checkpoint on the selection score. `"exme"`: the best ExMe merge, as the paper reports it.
        storage (`str`, *optional*, defaults to `"cpu"`):
            Where kept tensors live: `"cpu"` memory, or `"disk"` (safetensors in `<output_dir>/exme-snapshots`,
            removed at the end).
        output_dir (`str`, *optional*):
            Where the result is written; defaults to `<args.output_dir>/exme`.
        load_exme_at_end (`bool`, *optional*, defaults to `False`):
            Leave the chosen model loaded after training (so `trainer.save_model()` saves it) instead of the
            trained weights. For LoRA runs the chosen model is an adapter named `"exme"`, left active.
        save_merged (`bool`, *optional*, defaults to `False`):
            LoRA runs: also save the chosen model fused into the base weights, in `<output_dir>/exme/merged`.
            The chosen adapter itself is always saved, as a PEFT adapter folder of rank `r1 + r2`. (DoRA runs are
            merged on dense effective weights and always saved fused.)
        evaluate_base (`bool`, *optional*, defaults to `True`):
            Score the base model when training begins: it checks the metric before any training and adds the Base
            row to the report.

    Example:

    ```python
    from trl import SFTConfig, SFTTrainer
    from exme_callback import ExMeCallback

    trainer = SFTTrainer(model=model, args=SFTConfig(output_dir="run", eval_strategy="steps", eval_steps=50),
                         train_dataset=train, eval_dataset=val, processing_class=tokenizer)
    trainer.add_callback(ExMeCallback(trainer))
    trainer.train()  # run/exme/ holds the chosen model, its tokenizer and exme_report.{json,md}
    ```
    """

    def __init__(
        self,
        trainer=None,
        *,
        evaluator: Evaluator | None = None,
        report_evaluator: Evaluator | None = None,
        metrics: str | Sequence[str] | Mapping[str, str] | None = None,
        report_metrics: str | Sequence[str] | Mapping[str, str] | None = None,
        baselines: bool = False,
        alphas: Sequence[float] = DEFAULT_ALPHAS,
        betas: Sequence[float] = DEFAULT_BETAS,
        choose_from: str = "all",
        storage: str = "cpu",
        output_dir: str | os.PathLike | None = None,
        load_exme_at_end: bool = False,
        save_merged: bool = False,
        evaluate_base: bool = True,
    ):
        if trainer is not None and not (hasattr(trainer, "evaluate") and hasattr(trainer, "callback_handler")):
            raise TypeError(f"`trainer` must be a `transformers.Trainer`, got {type(trainer).__name__}")
        for name, value in (("evaluator", evaluator), ("report_evaluator", report_evaluator)):
            if value is not None and not callable(value):
                raise TypeError(f"`{name}` must be a callable `model -> dict[str, float]`, got {value!r}")
        if trainer is None and evaluator is None:
            raise ValueError(
                "ExMeCallback needs a way to score candidates: pass the trainer (`ExMeCallback(trainer)`) or an "
                "`evaluator=fn` with `fn(model) -> dict[str, float]`."
            )
        if choose_from not in CHOOSE_FROM:
            raise ValueError(f"`choose_from` must be one of {CHOOSE_FROM}, got {choose_from!r}")
        if storage not in STORAGES:
            raise ValueError(f"`storage` must be one of {STORAGES}, got {storage!r}")
        flags = {"load_exme_at_end": load_exme_at_end, "save_merged": save_merged, "evaluate_base": evaluate_base}
        flags["baselines"] = baselines
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise TypeError(f"`{name}` must be a bool, got {flag!r}")
        self.trainer = trainer
        self.evaluator = evaluator if evaluator is not None else TrainerEvaluator(trainer)
        self.report_evaluator = report_evaluator
        self.objective = None if metrics is None else Objective.from_spec(metrics)
        if report_metrics is not None and report_evaluator is None:
            raise ValueError("`report_metrics` names the metrics of `report_evaluator`, which is not given.")
        # The report evaluator's score; when None, set at on_train_begin from its `directions` or the selection's.
        self.heldout_objective = None if report_metrics is None else Objective.from_spec(report_metrics)
        self.baselines = baselines
        self.alphas = validate_grid("alphas", alphas, low=0.0)
        self.betas = validate_grid("betas", betas, low=0.0, high=1.0)
        self.choose_from = choose_from
        self.storage = storage
        if output_dir is not None and not isinstance(output_dir, (str, os.PathLike)):
            raise TypeError(f"`output_dir` must be a path (str or os.PathLike), got {output_dir!r}")
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.load_exme_at_end = load_exme_at_end
        self.save_merged = save_merged
        self.evaluate_base = evaluate_base

        self.report: Report | None = None  # the last sweep's result, also written to exme_report.json
        self._store: SnapshotStore | None = None  # created at on_train_begin, when the run's folder is known
        self._kept: list[Checkpoint] = []  # the best checkpoints so far, best first (at most 2)
        self._base: Candidate | None = None  # the base model's evaluation, when `evaluate_base`
        self._training = False  # only evaluations between train begin and end score checkpoints

    # ---- hooks -------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check_run(args, state, model)
        for evaluator in (self.evaluator, self.report_evaluator):
            if isinstance(evaluator, LMEvalEvaluator) and evaluator.tokenizer is None:
                evaluator.tokenizer = kwargs.get("processing_class") or getattr(self.trainer, "processing_class", None)
        if self.objective is None:
            directions = getattr(self.evaluator, "directions", None)
            self.objective = (
                Objective(directions)
                if directions
                else Objective.from_spec(None, args.metric_for_best_model, args.greater_is_better)
            )
        if self.report_evaluator is not None and self.heldout_objective is None:
            directions = getattr(self.report_evaluator, "directions", None)
            self.heldout_objective = Objective(directions or self.objective.metrics)
        self._store = SnapshotStore(self.storage, os.path.join(args.output_dir, "exme-snapshots"))
        self._kept, self._base, self.report = [], None, None
        if state.global_step > 0:  # resumed: the base and the kept checkpoints come from the checkpoint folder
            self._load_state(args, state)
        else:
            self._store.save("base", trainable_tensors(model))
            # With `eval_on_start`, the trainer's step-0 evaluation scores the base (see `on_evaluate`).
            if self.evaluate_base and not (self._reuses_training_scores and args.eval_on_start):
                self._base = self._score(model, Candidate("base", 0.0, 0.0))
            if self.evaluate_base and self.report_evaluator is not None:  # also checks its metrics before training
                self._base = self._base or Candidate("base", 0.0, 0.0)
                self._score_heldout(model, self._base)
        self._training = True

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not self._training:
            return
        step = state.global_step
        if self._reuses_training_scores:
            score = self._objective_score(metrics or {})
            metrics = numeric_metrics(metrics or {})
        else:
            scored = self._score(model, Candidate("sft", 1.0, 0.0, step1=step))
            metrics, score = scored.metrics, scored.score
            if self.trainer is not None:  # the trainer logged its own evaluation; this one is the callback's
                self.trainer.log(
                    {"exme/checkpoint/score": score, **{f"exme/checkpoint/{k}": v for k, v in metrics.items()}}
                )
        if step == 0:
            if self.evaluate_base:
                self._base = Candidate("base", 0.0, 0.0, score=score, metrics=metrics)
            return
        if not is_better(score, None, True):  # NaN or inf
            logger.warning(f"ExMe: the evaluation at step {step} scored {score}; this checkpoint is not kept.")
            return
        kept = [c for c in self._kept if c.step != step]
        position = next(
            (i for i, c in enumerate(kept) if is_better(score, c.score, self.objective.greater_is_better)), len(kept)
        )
        if position >= 2:
            return
        kept.insert(position, Checkpoint(step, score, metrics))
        self._store.save(f"step-{step}", trainable_tensors(model))
        for dropped in kept[2:]:
            self._store.delete(f"step-{dropped.step}")
        self._kept = kept[:2]

    def on_save(self, args, state, control, **kwargs):
        """Write the callback's state into the new checkpoint, so a resumed run ends with the same result."""
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if not (self._training and state.is_world_process_zero and os.path.isdir(folder)):
            return
        folder = os.path.join(folder, STATE_DIR)
        for key in ["base", *(f"step-{c.step}" for c in self._kept)]:
            self._store.export(key, folder)
        saved = {
            "metric": self.objective.name,
            "kept": [asdict(c) for c in self._kept],
            "base": None if self._base is None else self._base.to_dict(),
        }
        with open(os.path.join(folder, STATE_FILE + ".tmp"), "w") as f:
            json.dump(saved, f, indent=2)
        os.replace(os.path.join(folder, STATE_FILE + ".tmp"), os.path.join(folder, STATE_FILE))

    def on_train_end(self, args, state, control, model=None, processing_class=None, **kwargs):
        if not self._training:
            return
        self._training = False
        try:
            if not self._kept:
                logger.warning(
                    "ExMe: no checkpoint was evaluated during training, so there is nothing to extrapolate or merge "
                    "and nothing was written. Evaluate during training (`eval_strategy='steps'` and `eval_steps`)."
                )
                return
            if len(self._kept) == 1:
                logger.warning(
                    "ExMe: only one checkpoint was evaluated during training; extrapolating it (EXPO) without a "
                    "merge. Evaluate more often to merge two checkpoints."
                )
            self._run(args, state, model, processing_class)
        finally:
            self._store.clear()

    # ---- the sweep ---------------------------------------------------------------------------------------------

    def _run(self, args, state, model, processing_class) -> None:
        store, steps = self._store, [c.step for c in self._kept]
        live = trainable_tensors(model)
        store.save("trained", live)
        base, trained = store.load("base"), store.load("trained")
        sft = [store.load(f"step-{s}") for s in steps]
        sft2 = sft[-1]  # with one checkpoint c2 is always 0, so the second task vector is never read
        if is_peft_model(model):
            plane = LoraPlane(model, base, sft[0], sft2, trained)
        else:
            plane = DensePlane(live, base, sft[0], sft2, trained)

        progress = tqdm(
            total=count_candidates(len(steps), self.alphas, self.betas),
            desc="ExMe sweep",
            disable=args.disable_tqdm or not state.is_world_process_zero,
        )

        def score(candidate: Candidate) -> Candidate:
            self._apply(plane, candidate)
            self._score(model, candidate)
            self._log_candidate(candidate)
            progress.update()
            return candidate

        report = Report(
            metric=self.objective.name,
            greater_is_better=self.objective.greater_is_better,
            checkpoints=list(self._kept),
            candidates=[],  # filled by the sweep as candidates are scored
            final=None,
            alphas=self.alphas,
            betas=self.betas,
            choose_from=self.choose_from,
            base=self._base,
            columns=list(self.objective.metrics),
        )
        if self.heldout_objective is not None:
            report.heldout_metric = self.heldout_objective.name
            report.heldout_greater_is_better = self.heldout_objective.greater_is_better
            report.heldout_columns = list(self.heldout_objective.metrics)
        self.report = report
        try:
            # 1. The ExMe sweep (and the paper's baselines, for the report).
            sweep(
                score,
                self._kept,
                self.alphas,
                self.betas,
                self.objective.greater_is_better,
                results=report.candidates,
            )
            if self.baselines:
                densities = DEFAULT_DENSITIES if isinstance(plane, DensePlane) else ()
                progress.total += count_baselines(len(steps), self.betas, densities)
                sweep_baselines(score, self._kept, self.betas, densities, results=report.candidates)
            # 2. The choice.
            report.final = self._choose(report.candidates)
            # 3. The held-out scores of the table's rows, from the report evaluator.
            if self.report_evaluator is not None:
                rows = [c for c in {id(c): c for _, c in report.rows()}.values() if c.heldout_score is None]
                progress.total += len(rows)
                for candidate in rows:
                    self._apply(plane, candidate)
                    self._score_heldout(model, candidate)
                    progress.update()
            # 4. The chosen model, saved.
            self._apply(plane, report.final)
            self._save(args, state, model, processing_class, plane)
        except BaseException as error:
            report.error = f"{type(error).__name__}: {error}"
            self._save_failure(args, state)
            raise
        finally:
            progress.close()
            plane.close(keep=self.load_exme_at_end and report.error is None)  # else the trained weights, exactly
        self._log_result()

    @staticmethod
    def _apply(plane, candidate: Candidate) -> None:
        """Make the live model compute `candidate`: a point of the plane, or a TIES/DARE merge."""
        if candidate.kind not in OFF_PLANE:
            plane.apply(candidate.c1, candidate.c2)
            return
        from peft.utils import merge_utils

        density = candidate.hyper["density"]
        if candidate.kind == "ties":  # trim, elect signs, disjoint mean
            weights = torch.ones(2)
            plane.apply_merge(lambda d1, d2: merge_utils.ties([d1, d2], weights.to(d1), density))
        else:  # DARE: random drop and rescale, then the mean; seeded, so every application is the same model
            weights = torch.full((2,), 0.5)
            with preserved_rng(seed=0):
                plane.apply_merge(lambda d1, d2: merge_utils.dare_linear([d1, d2], weights.to(d1), density))

    def _choose(self, candidates: list[Candidate]) -> Candidate:
        gib = self.objective.greater_is_better
        if self.choose_from == "exme":
            final = best(candidates, gib, kinds=("exme",))
            if final is not None:
                return final
            logger.warning("ExMe: no ExMe merge was scored (one checkpoint, or none finite); choosing among all.")
        final = best(candidates, gib, kinds=("sft", "expo", "exme"))
        if final is None:  # only reachable when every candidate failed: keep the best checkpoint
            final = next(c for c in candidates if c.kind == "sft")
        return final

    def _save(self, args, state, model, processing_class, plane) -> None:
        """Write the chosen model, its tokenizer and the report to the output folder, atomically."""
        destination = os.path.abspath(self.output_dir or os.path.join(args.output_dir, "exme"))
        main = state.is_world_process_zero
        processing_class = processing_class or getattr(self.trainer, "processing_class", None)
        with publish_dir(destination, write=main) as folder:
            if isinstance(plane, LoraPlane):
                if main and plane.exact_adapter:
                    plane.save_adapter(folder)
                    self.report.saved = {"adapter": destination}
                    if self.save_merged:
                        plane.save_merged(os.path.join(folder, "merged"))
                        self.report.saved["merged"] = os.path.join(destination, "merged")
                elif main:  # DoRA: the candidate is dense effective weights, saved fused
                    plane.save_merged(folder)
                    self.report.saved = {"model": destination}
            elif self.trainer is not None:
                self.trainer.save_model(folder)  # gathers sharded weights; writes on the main process only
                self.report.saved = {"model": destination}
            elif main:
                model.save_pretrained(folder)
                self.report.saved = {"model": destination}
            if main:
                for subfolder in self.report.saved.values():
                    if processing_class is not None:
                        processing_class.save_pretrained(subfolder.replace(destination, folder, 1))
                self.report.write(folder)

    def _save_failure(self, args, state) -> None:
        """Write what the failed sweep evaluated, with the error, beside any earlier result (never over it)."""
        if not state.is_world_process_zero:
            return
        destination = os.path.abspath(self.output_dir or os.path.join(args.output_dir, "exme")) + "-failed"
        try:
            with publish_dir(destination) as folder:
                self.report.write(folder)
            logger.error(f"ExMe: the sweep failed ({self.report.error}); what it evaluated is in {destination}.")
        except Exception as error:  # a full disk, say: the original error matters more
            logger.error(f"ExMe: the sweep failed ({self.report.error}) and its report could not be written: {error}")

    def _log_result(self) -> None:
        report = self.report
        reference, final = report.best_sft, report.final
        logs = {"exme/score": final.score, "exme/c1": final.c1, "exme/c2": final.c2}
        message = f"ExMe: chose {final.kind} (c1={final.c1:.4g}, c2={final.c2:.4g}), {report.metric}={final.score:.6g}"
        if reference is not None:
            logs["exme/best_sft_score"] = reference.score
            logs["exme/gain"] = (final.score - reference.score) * (1 if report.greater_is_better else -1)
            message += f"; best checkpoint {reference.score:.6g}, gain {logs['exme/gain']:+.6g}"
        logger.info(message)
        if self.trainer is not None:
            if report.best_exme is not None:
                logs["exme/best_exme_score"] = report.best_exme.score
            self.trainer.log(logs)

    # ---- helpers -----------------------------------------------------------------------------------------------

    @property
    def _reuses_training_scores(self) -> bool:
        return getattr(self.evaluator, "reuses_training_scores", False)

    def _score(self, model: torch.nn.Module, candidate: Candidate) -> Candidate:
        """Evaluate the live model into `candidate` (training mode and the trainer's state are left as they were)."""
        metrics = self._evaluate(self.evaluator, "evaluator", model)
        candidate.score = self._objective_score(metrics)
        candidate.metrics = numeric_metrics(metrics)
        if not is_better(candidate.score, None, True):
            candidate.error = f"non-finite score {candidate.score}"
        return candidate

    def _score_heldout(self, model: torch.nn.Module, candidate: Candidate) -> None:
        metrics = self._evaluate(self.report_evaluator, "report_evaluator", model)
        candidate.heldout_score = self._objective_score(metrics, self.heldout_objective)
        candidate.heldout_metrics = numeric_metrics(metrics)

    def _evaluate(self, evaluator, name: str, model: torch.nn.Module) -> Mapping[str, float]:
        was_training = model.training
        try:
            with muted(self.trainer) if self.trainer is not None else contextlib.nullcontext():
                metrics = evaluator(model)
        finally:
            model.train(was_training)
        if not isinstance(metrics, Mapping):
            raise TypeError(f"`{name}` must return a dict of metrics, got {type(metrics).__name__}: {metrics!r}")
        return metrics

    def _log_candidate(self, candidate: Candidate) -> None:
        """Each candidate's score, under `exme/` keys, through the trainer's logging (TensorBoard, W&B, ...)."""
        if self.trainer is None or not candidate.valid:
            return
        fields = {"c1": candidate.c1, "c2": candidate.c2, "alpha1": candidate.alpha1, "alpha2": candidate.alpha2}
        fields.update({"beta": candidate.beta, **candidate.hyper})
        logs = {f"exme/{candidate.kind}/score": candidate.score}
        logs.update({f"exme/{candidate.kind}/{k}": v for k, v in fields.items() if v is not None})
        self.trainer.log(logs)

    def _objective_score(self, metrics: Mapping[str, float], objective: Objective | None = None) -> float:
        try:
            return (objective or self.objective)(metrics)
        except KeyError as error:
            raise KeyError(f"ExMeCallback: {error.args[0]}") from None

    def _load_state(self, args, state) -> None:
        """Take the kept state back from the checkpoint training resumes from."""
        name = f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        places = [os.path.join(args.output_dir, name)]
        if args.resume_from_checkpoint and os.path.basename(os.path.normpath(args.resume_from_checkpoint)) == name:
            places.insert(0, args.resume_from_checkpoint)
        folder = next((os.path.join(p, STATE_DIR) for p in places if os.path.isdir(os.path.join(p, STATE_DIR))), None)
        if folder is None:
            raise FileNotFoundError(
                f"Training resumes from step {state.global_step}, but {places[-1]} has no ExMe state ({STATE_DIR}/): "
                "the base model's weights are not there. Resume from a checkpoint saved with ExMeCallback, or start "
                "the run from the beginning."
            )
        with open(os.path.join(folder, STATE_FILE)) as f:
            saved = json.load(f)
        if saved["metric"] != self.objective.name:
            raise ValueError(
                f"The checkpoint's ExMe state ranks checkpoints by {saved['metric']!r}, but this run uses "
                f"{self.objective.name!r}. Resume with the same `metrics` / `metric_for_best_model`."
            )
        self._kept = [Checkpoint(**c) for c in saved["kept"]]
        self._base = None if saved["base"] is None else Candidate(**saved["base"])
        for key in ["base", *(f"step-{c.step}" for c in self._kept)]:
            self._store.import_(key, folder)

    def _check_run(self, args, state, model) -> None:
        if args.eval_strategy == "no":
            raise ValueError(
                "ExMeCallback ranks checkpoints by their evaluations, but `eval_strategy` is 'no'. Set "
                "`eval_strategy='steps'` with `eval_steps`, or `eval_strategy='epoch'`."
            )
        if isinstance(self.evaluator, TrainerEvaluator) and self.trainer.eval_dataset is None:
            raise ValueError(
                "ExMeCallback scores candidates with the trainer's evaluation, but the trainer has no "
                "`eval_dataset`. Pass `eval_dataset=` to the trainer, or `evaluator=` to the callback."
            )
        if model is None:
            raise ValueError("ExMeCallback needs the model; add it to a `Trainer`, which passes it to callbacks.")
        if getattr(self.trainer, "is_fsdp_enabled", False) or getattr(args, "fsdp", None):
            raise NotImplementedError(
                "ExMeCallback does not support FSDP yet (its kept tensors would be shards). Supported: one process, "
                "or DDP (`torchrun`/`accelerate launch` without FSDP or DeepSpeed)."
            )
        if getattr(self.trainer, "is_deepspeed_enabled", False) or getattr(args, "deepspeed", None):
            raise NotImplementedError(
                "ExMeCallback does not support DeepSpeed yet (ZeRO partitions the weights it blends). Supported: one "
                "process, or DDP (`torchrun`/`accelerate launch` without FSDP or DeepSpeed)."
            )
        peft = is_peft_model(model)
        if peft:
            check_peft_model(model)
        if _is_quantized(model) and (not peft or self.save_merged):
            raise NotImplementedError(
                "ExMeCallback cannot blend quantized weights (int8/4-bit): their values are codes, not numbers to "
                "extrapolate. Fine-tune a LoRA adapter on the quantized model (QLoRA) without `save_merged`, or "
                "load the model unquantized."
            )
        if not trainable_tensors(model):
            raise ValueError(
                "ExMeCallback found no trainable parameters in the model (all have `requires_grad=False`): nothing "
                "to extrapolate."
            )
        if state.is_world_process_zero:
            self._check_writable(os.path.abspath(self.output_dir or os.path.join(args.output_dir, "exme")))

    @staticmethod
    def _check_writable(destination: str) -> None:
        """Fail before training, not after it, when the result could not be written."""
        parent = os.path.dirname(destination)
        try:
            os.makedirs(parent, exist_ok=True)
            with tempfile.TemporaryFile(dir=parent):
                pass
        except OSError as error:
            raise OSError(
                f"ExMeCallback writes its result to {destination}, but {parent} is not writable ({error}). Set "
                "`output_dir` (of the callback or of the training arguments) to a writable folder."
            ) from error


def _is_quantized(model: torch.nn.Module) -> bool:
    """Whether the model holds quantized weights (bitsandbytes, GPTQ, AWQ, ... through transformers; a `PeftModel`
    answers `is_quantized` for its base model)."""
    return getattr(model, "is_quantized", False) or any(not p.is_floating_point() for p in model.parameters())
