r"""Confidence intervals of gains, from per-item scores: is a candidate's gain over the best checkpoint more than
the noise of the items it was measured on?

A score that averages metrics over items (an accuracy over documents, the mean of several tasks' accuracies) is an
estimate: the best of 19 candidates beats the best checkpoint partly by luck. Every evaluation of a sweep scores the
same items in the same order, so a gain is a paired difference,

$$
g = \sum_m w_m \left( \bar a_m - \bar b_m \right), \qquad w_m = \pm \frac{1}{M},
$$

over the `M` metrics of the score (the sign makes a gain positive when better). The paired bootstrap (Efron &
Tibshirani 1993; Koehn 2004 for evaluation sets) draws the items with replacement, the same draw for both models,
and recomputes `g`; the interval is the `(1 - level) / 2` and `(1 + level) / 2` quantiles of `iterations` draws.
Metrics of the same task (`objective.item_group`: the name's prefix before `/`, as `LMEvalEvaluator` names them)
are drawn together.

Pure torch: no models.

Example:

```python
>>> a = {"accuracy": [1.0, 1.0, 0.0, 1.0] * 50}
>>> b = {"accuracy": [1.0, 0.0, 0.0, 1.0] * 50}
>>> low, high = gain_interval(a, b, {"accuracy": 1.0}, level=0.95)
>>> low > 0  # a is better than b on 25% of the items, worse on none
True
```
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from numbers import Real

import torch

from .errors import InputError
from .objective import item_group

__all__ = ["Items", "check_level", "gain_interval"]

Items = Mapping[str, Sequence[float]]
"""Per-item scores: metric name -> the score of each item, in a fixed order (the metric is their mean)."""

_BLOCK = 1 << 22  # resampled entries held at once (iterations x items), 32 MiB of indices


def check_level(level) -> float:
    """`level` as a float in (0, 1), or a `ValueError` naming `confidence`."""
    if isinstance(level, bool) or not isinstance(level, Real) or not 0.0 < float(level) < 1.0:
        raise InputError(f"`confidence` must be a number in (0, 1), like 0.95, got {level!r}")
    return float(level)


def gain_interval(
    candidate: Items,
    reference: Items,
    weights: Mapping[str, float],
    level: float = 0.95,
    iterations: int = 2000,
    seed: int = 0,
) -> tuple[float, float]:
    """The paired bootstrap interval of the gain `sum_m weights[m] * (mean(candidate[m]) - mean(reference[m]))`.

    Args:
        candidate (`Mapping[str, Sequence[float]]`): per-item scores of the candidate, for every metric of `weights`.
        reference (`Mapping[str, Sequence[float]]`): the same items' scores of the model it is compared with.
        weights (`Mapping[str, float]`): each metric's weight in the gain (`Objective.gain_weights`).
        level (`float`, *optional*, defaults to 0.95): the interval's confidence level, in (0, 1).
        iterations (`int`, *optional*, defaults to 2000): bootstrap draws.
        seed (`int`, *optional*, defaults to 0): the draws' seed: the same inputs give the same interval.

    Returns:
        `tuple[float, float]`: the interval's low and high ends.

    Raises:
        `ValueError`: a metric's items differ in number between the two models, or a level outside (0, 1).
    """
    level = check_level(level)
    groups: dict[tuple[str, int], torch.Tensor] = {}  # (task, items) -> the weighted paired differences per item
    for metric, weight in weights.items():
        a, b = (torch.as_tensor(items[metric], dtype=torch.float64) for items in (candidate, reference))
        if a.shape != b.shape or a.ndim != 1 or not len(a):
            raise InputError(
                f"The per-item scores of `{metric}` differ between two evaluations ({tuple(a.shape)} and "
                f"{tuple(b.shape)} items): an evaluator must score the same items, in the same order, every time."
            )
        key = (item_group(metric), len(a))
        groups[key] = groups.get(key, 0) + weight * (a - b)
    generator = torch.Generator().manual_seed(seed)
    draws = torch.zeros(iterations, dtype=torch.float64)
    for differences in groups.values():
        n = len(differences)
        block = max(1, _BLOCK // n)
        for start in range(0, iterations, block):
            rows = min(block, iterations - start)
            index = torch.randint(n, (rows, n), generator=generator)
            draws[start : start + rows] += differences[index].mean(dim=1)
    tail = (1.0 - level) / 2
    low, high = torch.quantile(draws, torch.tensor([tail, 1.0 - tail], dtype=torch.float64)).tolist()
    return low, high
