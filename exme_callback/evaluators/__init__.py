"""The evaluators: `TrainerEvaluator` (the trainer's evaluation without side effects), `LMEvalEvaluator`
(lm-evaluation-harness tasks in-process) and `LossEvaluator` (the token loss on local data). `scoring` says what an
evaluator is and how its metrics become a score."""

from .lm_eval import LMEvalEvaluator
from .loss import LossEvaluator
from .trainer import TrainerEvaluator

__all__ = ["LMEvalEvaluator", "LossEvaluator", "TrainerEvaluator"]
