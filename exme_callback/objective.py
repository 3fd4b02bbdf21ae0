"""The objective: an evaluation's metrics -> one selection score (pure: no model, no trainer).

An evaluation's metrics (`Evaluator`, in `scoring`) are numbers, or lists of per-item scores whose mean is the
metric. The `Objective` reads the metrics it names (`metric_key`: the trainer's `eval_` prefix first) and makes
them one score: one metric with its direction (the trainer's `metric_for_best_model` and `greater_is_better`), or
the mean of several, like the ExMe paper's "overall performance". Its `gain_weights` say how a gain between two
evaluations is measured, item by item (`intervals`), and `item_group` which items a metric is measured on.

```python
>>> objective = Objective.from_spec({"arc/acc": "max", "gsm8k/exact_match": "max"})
>>> objective({"arc/acc": 0.5, "gsm8k/exact_match": 0.3}), objective.gain_weights()
(0.4, {'arc/acc': 0.5, 'gsm8k/exact_match': 0.5})
```
"""

from __future__ import annotations

import math
from collections.abc import Container, Mapping, Sequence
from numbers import Real
from typing import Any

import torch

from .errors import InputError, InputTypeError, MissingNameError

__all__ = ["Objective", "item_group", "metric_key", "numeric_metrics"]


_DIRECTIONS = {"max": True, "min": False, True: True, False: False}


def metric_key(name: str, keys: Container[str]) -> str | None:
    """The key a metric's `name` is found under in `keys` (an evaluation's metrics, a run's log history), else `None`.

    A name that starts with `eval_` is looked up as given, and only so. Any other name is looked up with the `eval_`
    prefix first, then as given. This is the trainer's rule for `metric_for_best_model` (`"loss"` is `"eval_loss"`),
    and it keeps `"loss"` the evaluation's in a run's log history, where the training logs a `loss` of its own;
    metrics an evaluator names without the prefix (`"task/metric"`, `"accuracy"`, the callback's `"exme/..."` logs)
    are found as given. So `x` and `eval_x` always name one metric.

    Example:

    ```python
    >>> metric_key("loss", {"loss": 2.1, "eval_loss": 2.4})
    'eval_loss'
    >>> metric_key("accuracy", {"accuracy": 0.5}), metric_key("f1", {"eval_loss": 2.4})
    ('accuracy', None)
    ```
    """
    lookups = (name,) if name.startswith("eval_") else (f"eval_{name}", name)
    return next((key for key in lookups if key in keys), None)


class Objective:
    """The selection score: one metric, or the mean of several metrics each with its own direction.

    With one direction for all metrics the score is their mean, in that direction. With mixed directions each
    lower-is-better metric enters the mean negated, and the score is greater-is-better.

    Metric names are looked up with `metric_key`: with the `eval_` prefix the trainer adds first (`"loss"` finds
    `"eval_loss"`, like `TrainingArguments.metric_for_best_model`), then as given. So `"loss"` and `"eval_loss"`
    are one metric, and naming both is refused.

    Args:
        metrics (`Mapping[str, bool]`): metric name -> whether greater is better.

    Raises:
        `ValueError`: no metric, or two names of one metric.

    Example:

    ```python
    >>> objective = Objective.from_spec({"eval_accuracy": "max", "eval_f1": "max"})
    >>> objective({"eval_accuracy": 0.5, "eval_f1": 0.7})
    0.6
    ```
    """

    def __init__(self, metrics: Mapping[str, bool]):
        if not metrics:
            raise InputError("`metrics` must name at least one metric.")
        self.metrics = dict(metrics)
        for name in self.metrics:
            key = metric_key(name, self.metrics.keys() - {name})  # another of the names, read for this one
            if key is not None:
                raise InputError(
                    f"`metrics` names {name!r} and {key!r}, which are one metric, {key!r} (a name is looked up with "
                    f"the trainer's `eval_` prefix first): name each metric once, got {metrics!r}"
                )
        directions = set(self.metrics.values())
        self.greater_is_better = directions.pop() if len(directions) == 1 else True
        self._signed = len(set(self.metrics.values())) > 1

    @classmethod
    def from_spec(
        cls,
        metrics: str | Sequence[str] | Mapping[str, str | bool] | None = None,
        metric_for_best_model: str | None = None,
        greater_is_better: bool | None = None,
    ) -> Objective:
        """Build the objective from the callback's `metrics` argument, or from the trainer's settings.

        Args:
            metrics (`str`, `Sequence[str]` or `Mapping[str, str | bool]`, *optional*): metric names, or names
                mapped to `"max"`/`"min"` (or `greater_is_better` booleans). A bare name is lower-is-better when
                it ends in `"loss"`, the rule of `TrainingArguments.greater_is_better`.
            metric_for_best_model (`str`, *optional*): used when `metrics` is `None`; defaults to `"eval_loss"`.
            greater_is_better (`bool`, *optional*): the direction of `metric_for_best_model`.
        """
        if metrics is None:
            name = metric_for_best_model or "eval_loss"
            direction = greater_is_better if metric_for_best_model is not None else None
            return cls({name: _default_direction(name) if direction is None else bool(direction)})
        if isinstance(metrics, str):
            metrics = [metrics]
        if isinstance(metrics, Mapping):
            spec = {}
            for name, direction in metrics.items():
                if not isinstance(name, str) or direction not in _DIRECTIONS:
                    raise InputError(f"`metrics` must map metric names to 'max' or 'min', got {name!r}: {direction!r}")
                spec[name] = _DIRECTIONS[direction]
            return cls(spec)
        if not isinstance(metrics, Sequence) or not metrics or not all(isinstance(m, str) for m in metrics):
            raise InputError(f"`metrics` must be a non-empty list of metric names, got {metrics!r}")
        if len(set(metrics)) != len(metrics):
            raise InputError(f"`metrics` must not repeat a name, got {metrics!r}")
        return cls({name: _default_direction(name) for name in metrics})

    @classmethod
    def for_evaluator(
        cls, evaluator, metric_for_best_model: str | None = None, greater_is_better: bool | None = None
    ) -> Objective:
        """The default objective of an evaluator: the mean of its `directions` (an `LMEvalEvaluator`'s task
        metrics, a `LossEvaluator`'s `eval_loss`), else the trainer's `metric_for_best_model` (see `from_spec`)."""
        directions = getattr(evaluator, "directions", None)
        return cls(directions) if directions else cls.from_spec(None, metric_for_best_model, greater_is_better)

    @property
    def name(self) -> str:
        """`"eval_loss"` for one metric, `"mean(eval_a, -eval_b)"` for several."""
        if len(self.metrics) == 1:
            return next(iter(self.metrics))
        signs = {name: "-" if self._signed and not up else "" for name, up in self.metrics.items()}
        return "mean(" + ", ".join(signs[name] + name for name in self.metrics) + ")"

    def gain_weights(self) -> dict[str, float]:
        """Each metric's weight in a gain, `+1/M` or `-1/M` (lower is better): the gain of one evaluation over another
        is `sum_m w_m * (a_m - b_m)`, positive when better."""
        return {name: (1.0 if up else -1.0) / len(self.metrics) for name, up in self.metrics.items()}

    def items(self, items: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
        """The per-item scores of this objective's metrics, by the objective's names; empty unless every metric has
        them (an interval needs all of them)."""
        found = {}
        for name in self.metrics:
            key = metric_key(name, items)
            if key is None:
                return {}
            found[name] = list(items[key])
        return found

    def values(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The metrics this objective reads, by the name they were found under.

        Raises:
            `KeyError`: a metric is missing; the message lists what the evaluation produced.
            `TypeError`: a metric is not a real number.
        """
        found = {}
        for name in self.metrics:
            key = metric_key(name, metrics)
            if key is None:
                raise MissingNameError(
                    f"The metric {name!r} is not in the evaluation's output, which has {sorted(metrics)}. Set "
                    "`metric_for_best_model` (or the callback's `metrics`) to one of them."
                )
            value = metrics[key]
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, Real) or isinstance(value, bool):
                raise InputTypeError(f"The metric {key!r} must be a real number, got {value!r}")
            found[key] = float(value)
        return found

    def __call__(self, metrics: Mapping[str, Any]) -> float:
        """The selection score of one evaluation (NaN or inf when a metric is)."""
        values = self.values(metrics).values()
        if self._signed:
            values = [v if up else -v for v, up in zip(values, self.metrics.values(), strict=True)]
        return math.fsum(values) / len(self.metrics)

    def __repr__(self) -> str:
        return f"Objective({self.name!r}, greater_is_better={self.greater_is_better})"


def numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The real-valued metrics of an evaluation, without the trainer's timing entries and `epoch`."""
    return {
        key: float(value)
        for key, value in metrics.items()
        if isinstance(value, Real) and not isinstance(value, bool) and key != "epoch" and not key.endswith(_TIMINGS)
    }


_TIMINGS = ("_runtime", "_samples_per_second", "_steps_per_second", "_model_preparation_time")


def item_group(metric: str) -> str:
    """The items a metric is measured on: its task (the name's prefix before `/`, as `LMEvalEvaluator` names
    metrics), or the metric itself."""
    return metric.split("/", 1)[0] if "/" in metric else metric


def _default_direction(name: str) -> bool:
    return not name.endswith("loss")
