"""Every refusal before work starts: a run ExMe cannot rank, a model it cannot blend, settings the evaluator cannot
serve, an output it could not write. Each check raises one message that names the setting and the way out."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence

import torch

from . import sharding
from .candidates import Candidate, Checkpoint
from .errors import InputError, StorageError, UnsupportedError
from .evaluators import TrainerEvaluator
from .fusing import check_fusable, is_quantized, unquantized_base
from .lora import check_peft_model, is_peft_model
from .scoring import as_evaluator
from .settings import SearchSettings
from .snapshots import trainable_tensors

__all__ = ["check_items", "check_model", "check_racing", "check_reference", "check_trainer_run", "check_writable"]


def check_trainer_run(args, trainer=None, needs_eval_dataset: bool = False) -> None:
    """Refuse, before training, a `Trainer` run whose checkpoints ExMe cannot rank or whose weights it cannot blend,
    saying how to fix it."""
    if args.eval_strategy == "no":
        raise InputError(
            "ExMeCallback ranks checkpoints by their evaluations, but `eval_strategy` is 'no'. Set "
            "`eval_strategy='steps'` with `eval_steps`, or `eval_strategy='epoch'`."
        )
    if needs_eval_dataset and trainer.eval_dataset is None:
        raise InputError(
            "ExMeCallback scores candidates with the trainer's evaluation, but the trainer has no `eval_dataset`. "
            "Pass `eval_dataset=` to the trainer, or `evaluator=` to the callback."
        )
    fsdp = getattr(getattr(getattr(trainer, "accelerator", None), "state", None), "fsdp_plugin", None)
    if fsdp is not None and getattr(fsdp, "fsdp_version", 2) == 1:
        raise UnsupportedError(
            "ExMeCallback does not support FSDP1: its flat parameters hide the tensors ExMe keeps. Use FSDP2: "
            "`fsdp_version: 2` in the accelerate config, or `fsdp_config={'version': 2}` in the training arguments."
        )


def check_model(
    model: torch.nn.Module,
    save_merged: bool = False,
    settings: SearchSettings | None = None,
    base_model: str | None = None,
) -> None:
    """Refuse, before any work, a model whose candidates cannot be built: unsupported PEFT set-ups, quantized
    weights outside a LoRA adapter, no trainable parameters, FSDP1, and under FSDP2 the merges that are not
    elementwise (`settings`' TIES and DARE baselines, DARE-sparsified M^3). On a quantized base (QLoRA): DoRA and
    those merges (they write dense weights into the base layers), and with `save_merged` an unquantized base
    (`base_model`, else the one the model records) that cannot be found or does not match the model."""
    sharding.check_model(model)
    peft = is_peft_model(model)
    if sharding.is_sharded(model) and peft:
        raise UnsupportedError(
            "ExMe does not support LoRA in sharded runs (FSDP2, DeepSpeed ZeRO-3) yet: the rank-concatenated adapter "
            "of its candidates needs whole factors, which those shard. LoRA adapters are small: train them with DDP "
            "or ZeRO-1/2 (`torchrun` or `accelerate launch`), where ExMe keeps about three adapters per process."
        )
    if sharding.is_sharded(model) and settings is not None and (settings.baselines or settings.dare is not None):
        raise UnsupportedError(
            "In a sharded run (FSDP2, ZeRO-3) each rank blends only its shards, but TIES trims and DARE drops entries "
            "over whole tensors, so neither `baselines=True` nor `dare=` is supported in a sharded run: leave them "
            "unset."
        )
    if peft:
        check_peft_model(model)
    if is_quantized(model):
        _check_quantized(model, peft, save_merged, settings, base_model)
    if not trainable_tensors(model):
        raise InputError(
            "ExMe found no trainable parameters in the model (all have `requires_grad=False`): nothing to extrapolate."
        )


def check_reference(trainer, model: torch.nn.Module, settings: SearchSettings, evaluators: Sequence) -> None:
    """Refuse, under a preference trainer (TRL's `DPOTrainer`, `KTOTrainer`: a trainer with a `ref_model`) whose
    reference is the LoRA model with its adapters disabled (no `ref_model`), the candidates that write into the
    base layers (DoRA's dense fallback, `settings`' TIES and DARE baselines, DARE-sparsified M^3) when the trainer's
    evaluation scores them (`evaluators`): they would move the reference with the policy, and be scored against
    themselves. With `precompute_ref_log_probs=True` the trainer's own `eval_dataset` carries reference log-probs
    computed before training, but a `TrainerEvaluator` on another dataset recomputes them at every call."""
    if getattr(trainer, "ref_model", True) is not None or not is_peft_model(model):
        return  # no preference trainer, or a reference model of its own (unchanged by the candidates)
    scorers = [evaluator for evaluator in evaluators if isinstance(evaluator, TrainerEvaluator)]
    precomputed = getattr(trainer.args, "precompute_ref_log_probs", False)
    if not scorers or (precomputed and all(scorer.eval_dataset is None for scorer in scorers)):
        return  # scored without the reference, or against log-probs computed from the base before training
    dense = [f"`{name}={getattr(settings, name)!r}`" for name in ("baselines", "dare") if getattr(settings, name)]
    if model.peft_config[model.active_adapter].use_dora:
        dense.append("DoRA (`use_dora=True`)")
    if dense:
        raise UnsupportedError(
            f"{' and '.join(dense)} under {type(trainer).__name__} without a `ref_model`: its reference is the "
            "model with its adapters disabled, and these candidates write dense weights into the base layers, so each "
            "would be scored against itself (under DPO, a loss of exactly log 2). Pass `ref_model=` to the trainer "
            "(the model before training), or `precompute_ref_log_probs=True` (scoring with the trainer's own "
            "`eval_dataset`), or leave `baselines`/`dare` unset and train LoRA without DoRA, or score the candidates "
            "with an evaluator that does not use the reference (`evaluator=LMEvalEvaluator(...)`)."
        )


def _check_quantized(model, peft: bool, save_merged: bool, settings, base_model: str | None) -> None:
    """The refusals for a quantized model: its weights are codes, so only a LoRA adapter on it is blended."""
    if not peft:
        raise UnsupportedError(
            "ExMe cannot blend quantized weights (int8/4-bit): their values are codes, not numbers to extrapolate. "
            "Fine-tune a LoRA adapter on the quantized model (QLoRA), or load the model unquantized."
        )
    if model.peft_config[model.active_adapter].use_dora:
        raise UnsupportedError(
            "ExMe blends DoRA modules as dense weights, which a quantized base layer cannot hold. Train LoRA on the "
            "quantized model (QLoRA), or DoRA on the model loaded unquantized."
        )
    if settings is not None and (settings.baselines or settings.dare is not None):
        raise UnsupportedError(
            "On a quantized base, neither `baselines=True` nor `dare=` is supported: TIES and DARE merges are not "
            "low-rank, and ExMe writes them into the base layers as dense weights, which quantized layers cannot "
            "hold. Leave them unset, or load the model unquantized."
        )
    if save_merged:
        method = getattr(getattr(model, "hf_quantizer", None), "quantization_config", None)
        method = getattr(method, "quant_method", None)
        if method != "bitsandbytes":
            raise UnsupportedError(
                f"`save_merged=True` on a quantized model supports bitsandbytes quantization (4-bit, 8-bit), got "
                f"{method}. Save the adapter (without `save_merged`) and fuse it into the unquantized base."
            )
        check_fusable(model, model.active_adapter, unquantized_base(model, base_model))


def check_items(evaluations: Sequence[Checkpoint | Candidate], settings: SearchSettings) -> None:
    """Refuse per-item scores that differ in number between evaluations (they must be the same items), and
    `min_gain="significant"` and `search="racing"` when an evaluation has none (checked on the first one, before
    training, where the callback scores the base model)."""
    counts = {tuple((m, len(v)) for m, v in e.items.items()) for e in evaluations if e.items}
    if len(counts) > 1:
        raise InputError(
            f"The evaluator's per-item scores differ between evaluations ({' vs '.join(map(str, counts))} items per "
            "metric): it must score the same items, in the same order, every time."
        )
    if all(e.items for e in evaluations):
        return
    if settings.min_gain == "significant":
        raise InputError(
            "`min_gain='significant'` compares candidates with the best checkpoint item by item, but the evaluator "
            "gave aggregate scores only. Return per-item scores (a list per metric; `LMEvalEvaluator` does), or "
            "give `min_gain` a number."
        )
    if settings.search == "racing":
        raise InputError(
            "`search='racing'` compares candidates item by item, but the evaluator gave aggregate scores only. "
            "Return per-item scores (a list per metric; `LMEvalEvaluator` does), or use `search='grid'`."
        )


def check_racing(evaluator, settings: SearchSettings) -> None:
    """Refuse `search="racing"` with an evaluator that cannot score a subset of its items (no `items` argument)."""
    if settings.search == "racing" and not as_evaluator(evaluator).scores_subsets:
        raise InputError(
            "`search='racing'` scores candidates on growing subsets of the items, but the evaluator takes no `items` "
            "argument. Give an evaluator `fn(model, items=None)` that, when `items` maps each group of items (a "
            "task, or the metric's name) to indices, scores only those (`LMEvalEvaluator` does), or use "
            "`search='grid'`."
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
        raise StorageError(
            f"ExMe writes its result to {destination}, but {parent} is not writable ({error}). Set {setting} to a "
            "writable folder."
        ) from error
