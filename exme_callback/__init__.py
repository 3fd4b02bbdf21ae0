"""Extrapolation Merging (ExMe) for Hugging Face fine-tuning, as one `TrainerCallback`."""

from .callback import ExMeCallback
from .evaluators import LMEvalEvaluator, LossEvaluator, TrainerEvaluator
from .merges import Merge
from .scoring import Evaluator, Objective
from .search import Candidate, Checkpoint, exme_coefficients
from .span import combine, extrapolate, interpolate, span_point

__version__ = "0.1.0"

__all__ = [
    "Candidate",
    "Checkpoint",
    "Evaluator",
    "ExMeCallback",
    "LMEvalEvaluator",
    "LossEvaluator",
    "Merge",
    "Objective",
    "TrainerEvaluator",
    "combine",
    "exme_coefficients",
    "extrapolate",
    "interpolate",
    "span_point",
]
