"""`TrainerEvaluator`: the trainer's own evaluation loop on the live model, leaving the trainer as it was."""

from __future__ import annotations

import torch

from ..errors import InputError
from ..scoring import Evaluator, muted

__all__ = ["TrainerEvaluator"]


class TrainerEvaluator(Evaluator):
    """Scores the live model with `trainer.evaluate()`, leaving the trainer as it was.

    During the call the trainer's callbacks are muted (no early stopping counts, no `eval_*` logs, no other
    callback sees the candidate) and `trainer.state.log_history` is put back, so candidate evaluations never mix
    with the training's own. The metrics keep the trainer's `eval_` prefix, so `metric_for_best_model` names the
    same metric during training and in the sweep.

    In a distributed run the trainer's evaluation splits its dataloader across the ranks and gathers the
    predictions itself (`rank_aware`).

    Args:
        trainer (`transformers.Trainer`): the trainer (a TRL trainer works the same).
        eval_dataset (`Dataset` or `dict[str, Dataset]`, *optional*): evaluate on this instead of the trainer's
            `eval_dataset`. Scores from training are then not reused.
    """

    rank_aware = True

    def __init__(self, trainer, eval_dataset=None):
        self.trainer = trainer
        self.eval_dataset = eval_dataset

    @property
    def reuses_training_scores(self) -> bool:
        """Whether checkpoint scores from training equal this evaluator's (same trainer, same data)."""
        return self.eval_dataset is None

    def fingerprint(self) -> dict:
        """The evaluation data's identity: the `datasets` fingerprint (a hash of its content and transforms) and the
        size of each evaluation set."""
        data = self.trainer.eval_dataset if self.eval_dataset is None else self.eval_dataset
        sets = data if isinstance(data, dict) else {"eval": data}
        described = {name: [getattr(d, "_fingerprint", None), _size(d)] for name, d in sets.items()}
        return {"type": "trainer", "eval_dataset": described, "own": self.eval_dataset is None}

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        if model is not self.trainer.model:
            raise InputError("`TrainerEvaluator` can only evaluate its trainer's own model (`trainer.model`).")
        with muted(self.trainer):
            return dict(self.trainer.evaluate(eval_dataset=self.eval_dataset))


def _size(dataset) -> int | None:
    try:
        return len(dataset)
    except TypeError:  # an iterable dataset
        return None
