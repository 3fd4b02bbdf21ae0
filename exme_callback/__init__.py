"""Extrapolation Merging (ExMe) for Hugging Face fine-tuning, as one `TrainerCallback`."""

from .callback import ExMeCallback
from .candidates import Candidate, Checkpoint
from .evaluators import LMEvalEvaluator, LossEvaluator, TrainerEvaluator
from .merges import Merge
from .objective import Objective
from .scoring import Evaluator
from .settings import SearchSettings
from .span import combine, extrapolate, interpolate, span_point
from .strategies import Search, Strategy, exme_coefficients

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
    "Search",
    "SearchSettings",
    "Strategy",
    "TrainerEvaluator",
    "combine",
    "exme_coefficients",
    "extrapolate",
    "interpolate",
    "span_point",
]
