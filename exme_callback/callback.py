"""`ExMeCallback`: Extrapolation Merging for any `Trainer` run, as one callback.

The callback is hook glue: during training it scores and keeps the best checkpoints (`candidates.rank_checkpoints`,
`snapshots.SnapshotStore`) and writes its resume state into each checkpoint folder; when training ends it hands the
plane over the kept checkpoints to the pipeline (`pipeline.run`), which sweeps, chooses and publishes.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Mapping, Sequence

from transformers import TrainerCallback

from . import pipeline, preflight, sharding
from .candidates import Candidate, Checkpoint, rank_checkpoints
from .errors import InputError, InputTypeError
from .evaluators import TrainerEvaluator
from .objective import Objective
from .planes import make_plane, sources_of
from .report import Report, log_report
from .resume import checkpoint_folder, load_resume_state, save_resume_state
from .scoring import Evaluator, Scorer, as_evaluator
from .settings import SearchSettings
from .snapshots import STORAGES, SnapshotStore, trainable_tensors
from .strategies import DEFAULT_ALPHAS, DEFAULT_BETAS

__all__ = ["ExMeCallback"]

logger = logging.getLogger(__name__)


class ExMeCallback(TrainerCallback):
    r"""Extrapolation Merging (ExMe): a free improvement of a fine-tuned model, searched when training ends.

    During training the callback keeps the trainable tensors of the base model and of the two best evaluated
    checkpoints (SFT-1, SFT-2). When training ends it evaluates, in-process, models on their plane

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
            The trainer (TRL trainers work the same): its evaluation scores the candidates unless `evaluator` is
            given; its logging reports them.
        evaluator (`Evaluator` or `Callable[[torch.nn.Module], Mapping[str, float]]`, *optional*):
            Scores the live model at every training evaluation and for every candidate (`scoring.Evaluator`);
            needed without `trainer`. `LMEvalEvaluator` runs lm-evaluation-harness tasks.
        report_evaluator (`Evaluator` or `Callable`, *optional*):
            Scores the rows of the final table on data that chose nothing (held-out columns); never chooses.
        metrics (`str`, `list[str]` or `dict[str, str]`, *optional*):
            The selection score: one metric, or several averaged like the ExMe paper's overall score, each with
            its direction (`{"eval_accuracy": "max", "eval_loss": "min"}`; a bare name is lower-is-better when it
            ends in `"loss"`). Defaults to the mean of the evaluator's `directions` (an `LMEvalEvaluator`'s task
            metrics, like the paper's "Average" column), else the trainer's `metric_for_best_model` and
            `greater_is_better`, else `"eval_loss"`.
        report_metrics (`str`, `list[str]` or `dict[str, str]`, *optional*):
            The report evaluator's score, in the format of `metrics`. Defaults to its `directions` (an
            `LMEvalEvaluator`'s task metrics), else to the selection metrics.
        alphas (`Sequence[float]`, *optional*, defaults to `(0.1, ..., 0.5)`): extrapolation strengths (>= 0).
        betas (`Sequence[float]`, *optional*, defaults to `(0.1, ..., 0.9)`): merge weights of EXPO-1, in [0, 1].
        baselines (`bool`, *optional*, defaults to `False`):
            Also evaluate the ExMe paper's baselines for the report: the weighted merge of SFT-1 and SFT-2 (over
            the `betas` grid), TIES and DARE (densities 0.3, 0.5, 0.7; with `peft.utils.merge_utils`; for LoRA runs on
            each adapted module's dense delta). Baselines are never chosen. Needs `peft`.
        choose_from (`str`, *optional*, defaults to `"all"`):
            `"all"`: the final model is the best of every SFT, EXPO and ExMe candidate, so it is never worse than
            the best checkpoint on the selection score. `"exme"`: the best ExMe merge, as the paper reports it.
        storage (`str`, *optional*, defaults to `"cpu"`): where kept tensors live: `"cpu"` memory, or `"disk"`
            (safetensors in `<output_dir>/exme-snapshots`).
        output_dir (`str`, *optional*): where the result is written; defaults to `<args.output_dir>/exme`.
        load_exme_at_end (`bool`, *optional*, defaults to `False`):
            Leave the chosen model loaded after training (so `trainer.save_model()` saves it) instead of the
            trained weights. For LoRA runs the chosen model is an adapter named `"exme"`, left active.
        save_merged (`bool`, *optional*, defaults to `False`):
            LoRA runs: also save the chosen model fused into the base weights, in `<output_dir>/exme/merged`,
            beside the adapter (rank `r1 + r2`). DoRA runs are always saved fused. On a 4-bit or 8-bit base (QLoRA),
            written from the unquantized base's weights: `base_model`, by default the folder or model id it records.
        base_model (`str`, *optional*): with `save_merged` on a quantized base, the unquantized base to fuse into.
        evaluate_base (`bool`, *optional*, defaults to `True`): score the base model before training (it checks the
            metric early) for the report's Base row.
        **search:
            The other search settings (`settings.SearchSettings`): `strategy` (`"exme"`, `"mixup"` for M^3,
            `"topk_greedy"`, or a `strategies.Strategy` of your own), `search="racing"` with `racing_margin`,
            `top_k` (checkpoints kept, default 2), `partner="kinship"` with `kinship_metric` and
            `kinship_threshold`, `beta_search`, `mixup_a`, `mixup_draws`, `dare`, `budget`, `seed`, `confidence`
            (of the gains' intervals) and `min_gain` (a number, or `"significant"`: keep the best checkpoint unless
            a candidate's gain clears it).

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
        base_model: str | os.PathLike | None = None,
        evaluate_base: bool = True,
        **search,
    ):
        if trainer is not None and not (hasattr(trainer, "evaluate") and hasattr(trainer, "callback_handler")):
            raise InputTypeError(f"`trainer` must be a `transformers.Trainer`, got {type(trainer).__name__}")
        if trainer is None and evaluator is None:
            raise InputError(
                "ExMeCallback needs a way to score candidates: pass the trainer (`ExMeCallback(trainer)`) or an "
                "`evaluator=fn` with `fn(model) -> dict[str, float]`."
            )
        if storage not in STORAGES:
            raise InputError(f"`storage` must be one of {STORAGES}, got {storage!r}")
        flags = {"load_exme_at_end": load_exme_at_end, "save_merged": save_merged, "evaluate_base": evaluate_base}
        for name, flag in flags.items():
            if not isinstance(flag, bool):
                raise InputTypeError(f"`{name}` must be a bool, got {flag!r}")
        if report_metrics is not None and report_evaluator is None:
            raise InputError("`report_metrics` names the metrics of `report_evaluator`, which is not given.")
        for name, path in {"output_dir": output_dir, "base_model": base_model}.items():
            if path is not None and not isinstance(path, (str, os.PathLike)):
                raise InputTypeError(f"`{name}` must be a path (str or os.PathLike), got {path!r}")
        self.trainer = trainer
        self.evaluator = TrainerEvaluator(trainer) if evaluator is None else as_evaluator(evaluator, "evaluator")
        self.report_evaluator = None
        if report_evaluator is not None:
            self.report_evaluator = as_evaluator(report_evaluator, "report_evaluator")
        # The objectives; when None, resolved at on_train_begin from the evaluators' `directions` or the trainer.
        self.objective = None if metrics is None else Objective.from_spec(metrics)
        self.heldout_objective = None if report_metrics is None else Objective.from_spec(report_metrics)
        self.settings = SearchSettings(alphas, betas, choose_from, baselines, **search)
        preflight.check_racing(self.evaluator, self.settings)
        self.storage, self.base_model = storage, None if base_model is None else os.fspath(base_model)
        self.output_dir = None if output_dir is None else os.fspath(output_dir)
        self.load_exme_at_end, self.save_merged, self.evaluate_base = load_exme_at_end, save_merged, evaluate_base

        self.report: Report | None = None  # the last sweep's result, also written to exme_report.json
        self._destination: str | None = None  # the output folder, resolved at on_train_begin
        self._scorer: Scorer | None = None  # the evaluator and the objective, from on_train_begin
        self._heldout: Scorer | None = None  # the same for the report evaluator
        self._store: SnapshotStore | None = None  # created at on_train_begin, when the run's folder is known
        self._kept: list[Checkpoint] = []  # the best checkpoints so far, best first (at most `top_k`)
        self._base: Candidate | None = None  # the base model's evaluation, when `evaluate_base`
        self._training = False  # only evaluations between train begin and end score checkpoints
        self._sharded, self._shards = False, 1  # whether the model is sharded (FSDP2, ZeRO-3), over how many ranks

    # ---- hooks -------------------------------------------------------------------------------------------------

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._destination = os.path.abspath(self.output_dir or os.path.join(args.output_dir, "exme"))
        if model is None:
            raise InputError("ExMeCallback needs the model; add it to a `Trainer`, which passes it to callbacks.")
        uses_trainer = isinstance(self.evaluator, TrainerEvaluator)
        preflight.check_trainer_run(args, self.trainer, needs_eval_dataset=uses_trainer)
        preflight.check_model(model, self.save_merged, self.settings, self.base_model)
        preflight.check_reference(self.trainer, model, self.settings, (self.evaluator, self.report_evaluator))
        if state.is_world_process_zero:
            preflight.check_writable(self._destination, "`output_dir` (of the callback or of the training arguments)")
        tokenizer = kwargs.get("processing_class") or getattr(self.trainer, "processing_class", None)
        for evaluator in (self.evaluator, self.report_evaluator):
            if evaluator is not None:
                evaluator.use_tokenizer(tokenizer)
        self.objective = self.objective or Objective.for_evaluator(
            self.evaluator, args.metric_for_best_model, args.greater_is_better
        )
        self._scorer = Scorer(self.evaluator, self.objective, trainer=self.trainer)
        if self.report_evaluator is not None:
            directions = self.report_evaluator.directions or self.objective.metrics
            self.heldout_objective = self.heldout_objective or Objective(directions)
            self._heldout = Scorer(self.report_evaluator, self.heldout_objective, "report_evaluator", self.trainer)
        # Under FSDP2 and ZeRO-3 each rank keeps its own shards; every rank of a multi-process run has its own folder.
        self._sharded = sharding.is_sharded(model)
        self._shards = sharding.world() if self._sharded else 1
        snapshots = os.path.join(args.output_dir, "exme-snapshots")
        if sharding.world() > 1:
            snapshots = os.path.join(snapshots, f"rank-{sharding.rank():05d}")
        self._store = SnapshotStore(self.storage, snapshots)
        self._kept, self._base, self.report = [], None, None
        if state.global_step > 0:  # resumed: the base and the kept checkpoints come from the checkpoint folder
            resumed = load_resume_state(self._store, args, state.global_step, self.objective.name, self._shards)
            self._kept, self._base = resumed.kept, resumed.base
        else:
            self._store.save("base", trainable_tensors(model))
            if self.evaluate_base and not args.eval_on_start:  # else the step-0 evaluation scores it
                self._base = pipeline.evaluate_base(model, self._scorer, self.settings, self._heldout)
        self._training = True

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        if not self._training:
            return
        step = state.global_step
        if step == 0 and (not self.evaluate_base or self._base is not None):
            return
        score, metrics, items, fresh = self._scorer.evaluation(model, metrics or {})
        if fresh and self.trainer is not None:  # the trainer logged its own evaluation; this one is the callback's
            self.trainer.log({f"exme/checkpoint/{k}": v for k, v in {"score": score, **metrics}.items()})
        if step == 0:
            evaluation = (score, metrics, items)
            self._base = pipeline.evaluate_base(model, self._scorer, self.settings, self._heldout, evaluation)
            return
        new = Checkpoint(step, score, metrics, items)
        preflight.check_items([new, *([self._base] if self._base is not None else [])], self.settings)
        if not rank_checkpoints([new], self.objective.greater_is_better):
            logger.warning(f"ExMe: the evaluation at step {step} scored {score}; this checkpoint is not kept.")
            return
        kept = rank_checkpoints([*self._kept, new], self.objective.greater_is_better, keep=self.settings.top_k)
        if new not in kept:
            return
        self._store.save(f"step-{step}", trainable_tensors(model))
        for dropped in {c.step for c in self._kept} - {c.step for c in kept}:
            self._store.delete(f"step-{dropped}")
        self._kept = kept

    def on_save(self, args, state, control, **kwargs):
        """Write the callback's state into the new checkpoint, so a resumed run ends with the same result."""
        folder = checkpoint_folder(args.output_dir, state.global_step)
        if not self._training or not (state.is_world_process_zero or self._shards > 1):
            return  # in a sharded run every rank writes its shards; else the main process writes for all
        if os.path.isdir(folder) or self._shards > 1:
            base_model = sources_of(kwargs["model"], [])["base_model"]
            save_resume_state(
                self._store, folder, self.objective.name, self._kept, self._base, base_model, self._shards
            )

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
            plane, output = self._plane(model), self._output(args, state, model, processing_class)
            options = {"settings": self.settings, "heldout": self._heldout, "base": self._base}
            self.report = pipeline.run(model, plane, self._kept, self._scorer, output, **options)
            if state.is_world_process_zero:  # the table and the figure where the run's curves are
                log_report(self.trainer, self.report, self._destination, state.global_step, caller=self)
        finally:
            self._store.clear()
            if sharding.world() > 1:  # the ranks' folders' parent, once every rank's folder is gone
                with contextlib.suppress(OSError):
                    os.rmdir(os.path.dirname(self._store.directory))

    # ---- helpers -----------------------------------------------------------------------------------------------

    def _plane(self, model):
        """The plane over the kept snapshots; training ended on a kept checkpoint (on every rank's shards): no copy
        of the trained weights."""
        store, kept = self._store, [f"step-{c.step}" for c in self._kept]
        trained = sharding.agree(store.find(trainable_tensors(model), kept))
        if trained is None:
            trained = "trained"
            store.save(trained, trainable_tensors(model))
        # A sharded model is gathered by `planes.save_pretrained`, whatever the trainer's settings.
        save_model = None if self.trainer is None or self._sharded else self.trainer.save_model
        base, checkpoints = store.load("base"), [store.load(key) for key in kept]
        options = {"save_model": save_model, "save_merged": self.save_merged, "base_model": self.base_model}
        return make_plane(model, base, checkpoints, store.load(trained), **options)

    def _output(self, args, state, model, processing_class) -> pipeline.Output:
        return pipeline.Output(
            self._destination,
            processing_class=processing_class or getattr(self.trainer, "processing_class", None),
            sources=sources_of(model, [checkpoint_folder(args.output_dir, c.step) for c in self._kept]),
            write=state.is_world_process_zero,
            keep_chosen=self.load_exme_at_end,
            show_progress=not args.disable_tqdm and state.is_world_process_zero,
            log=None if self.trainer is None else self.trainer.log,
        )
