"""How candidates are scored: evaluators (model -> metrics) and the objective (metrics -> one selection score).

An evaluator scores the live model: `evaluator(model) -> Mapping[str, float]`. `Evaluator` is the protocol, a small
base class whose class attributes declare what an evaluator can do beyond that (its default objective, scoring a
subset of its items, reusing the training's scores); callers read them, never probe. `TrainerEvaluator`,
`LMEvalEvaluator` and `LossEvaluator` (in `evaluators/`) subclass it, and a plain function works as well
(`as_evaluator` wraps it):

```python
def evaluator(model):
    return {"accuracy": my_accuracy(model)}
```

A metric may also be given item by item, as a list of per-item scores whose mean is the metric: the same items, in
the same order, at every call. The report then gives every gain a confidence interval (`intervals`), and
`min_gain="significant"` can tell a gain from noise. `LMEvalEvaluator` does this for every metric lm-eval averages
over documents:

```python
def evaluator(model):
    return {"accuracy": [float(my_prediction(model, x) == y) for x, y in dev_set]}
```

`search="racing"` also asks for subsets of the items: an evaluator that takes `items` (`scores_subsets`), a mapping
from each group of items (the task of a `task/metric` name, or the metric itself) to the indices to score, returns
the per-item scores of those items only, in that order:

```python
def evaluator(model, items=None):
    chosen = range(len(dev_set)) if items is None else items["accuracy"]
    return {"accuracy": [float(my_prediction(model, dev_set[i][0]) == dev_set[i][1]) for i in chosen]}
```

In a distributed run (DDP, DeepSpeed, FSDP2, `torchrun`) the evaluator runs on every rank. An evaluator that shares
its work across the ranks itself declares it (`rank_aware`: the trainer's evaluation, `LMEvalEvaluator`); for any
other that takes `items`, the `Scorer` gives each rank its share of the items it is asked for and gathers the
per-item scores, so every rank gets them all. A call without `items` is never split: an evaluator that does not take
them runs on every rank as in one process.

The `Objective` turns metrics into the selection score: one metric with its direction (the trainer's
`metric_for_best_model` and `greater_is_better`), or the mean of several, like the ExMe paper's "overall
performance".
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
from collections.abc import Callable, Container, Iterator, Mapping, Sequence
from numbers import Real
from typing import Any

import torch

from . import sharding
from .errors import InputError, InputTypeError, MissingNameError, UnsupportedError

__all__ = [
    "Evaluator",
    "FunctionEvaluator",
    "Objective",
    "Scorer",
    "as_evaluator",
    "metric_key",
    "muted",
    "numeric_metrics",
    "preserved_rng",
]


class Evaluator:
    """The evaluator protocol: scores a model, and declares its optional capabilities as class attributes.

    Subclass it and define `__call__`; set the attributes your evaluator has (each is off by default). A plain
    function needs no class: `as_evaluator` wraps it. Callers read these attributes and never probe an evaluator's
    type or signature.

    Attributes:
        directions (`Mapping[str, bool]`, *optional*, defaults to `None`): metric -> whether greater is better. The
            default objective is their mean (`Objective.for_evaluator`); `None`: the trainer's `metric_for_best_model`.
        scores_subsets (`bool`, *optional*, defaults to `False`): `__call__` accepts `items`, a mapping from each
            group of items (the task of a `task/metric` name, or the metric itself) to the indices to score, and then
            returns the per-item scores of those items only, in that order; `search="racing"` needs it. `items` is
            never passed to an evaluator without it, so its `__call__(self, model)` may leave it out.
        reuses_training_scores (`bool`, *optional*, defaults to `False`): the metrics of a training evaluation are
            this evaluator's, so a checkpoint's score is read from them instead of evaluating the model again.
        rank_aware (`bool`, *optional*, defaults to `False`): in a distributed run, the evaluator shares its work
            across the ranks itself and returns every rank the whole metrics (`TrainerEvaluator` splits its
            dataloader, `LMEvalEvaluator` its documents). When it is `False` and the evaluator `scores_subsets`,
            the `Scorer` splits each call with `items` across the ranks: every rank is asked for its round-robin
            share of each group, as many items on every rank (a rank with one fewer scores a copy of the group's
            first item, dropped), and the per-item scores are gathered in order; numbers a split call returns for
            a whole share (not item by item) are dropped. Under FSDP2 and ZeRO-3, where every forward pass is a
            collective, such an evaluator must run as many forward passes for as many items on every rank (fixed
            batches; `synced_gpus=True` for generation); set `rank_aware = True` to be asked for every item on
            every rank instead.

    Example:

    ```python
    class Accuracy(Evaluator):
        directions = {"accuracy": True}
        scores_subsets = True

        def __call__(self, model, items=None):
            chosen = range(len(dev_set)) if items is None else items["accuracy"]
            return {"accuracy": [float(my_prediction(model, dev_set[i][0]) == dev_set[i][1]) for i in chosen]}
    ```
    """

    directions: Mapping[str, bool] | None = None
    scores_subsets: bool = False
    reuses_training_scores: bool = False
    rank_aware: bool = False

    def use_tokenizer(self, tokenizer) -> None:
        """Take the trainer's tokenizer (its `processing_class`): the callback calls this at train begin. The
        default ignores it."""

    def fingerprint(self) -> dict:
        """What identifies this evaluator's scores, for the sweep's journal (`journal`): a journal written with
        another fingerprint is not reused. The default is the class and its `directions`; override it to add what
        the scores depend on (the data, the settings), as the built-in evaluators do."""
        return {"type": f"{type(self).__module__}.{type(self).__qualname__}", "directions": self.directions}

    def __call__(
        self, model: torch.nn.Module, items: Mapping[str, Sequence[int]] | None = None
    ) -> Mapping[str, float | Sequence[float]]:
        """The metrics of the live model: each a number, or the per-item scores whose mean it is (the same items, in
        the same order, at every call); only those of the items in `items` when it is given (`scores_subsets`)."""
        raise UnsupportedError(f"{type(self).__name__} must define `__call__(self, model)`.")


class FunctionEvaluator(Evaluator):
    """A plain callable as an `Evaluator`: `fn(model) -> dict`, or `fn(model, items=None) -> dict`.

    `scores_subsets` is read once, from the signature: a parameter named `items`, or `**kwargs` (a callable without
    a signature: `False`). `items` is passed only when given, so `fn(model)` is called exactly as before.

    Args:
        fn (`Callable[..., Mapping[str, float]]`): the evaluator.
        rank_aware (`bool`, *optional*, defaults to `False`): `fn` shares its work across the ranks of a distributed
            run itself (see `Evaluator.rank_aware`).
    """

    def __init__(self, fn: Callable[..., Mapping[str, Any]], rank_aware: bool = False):
        self.fn, self.rank_aware = fn, bool(rank_aware)
        try:
            parameters = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):  # a callable without a signature
            parameters = []
        self.scores_subsets = any(p.name == "items" or p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters)

    def __call__(self, model: torch.nn.Module, items: Mapping[str, Sequence[int]] | None = None) -> Mapping:
        return self.fn(model) if items is None else self.fn(model, items=items)

    def fingerprint(self) -> dict:
        """The function's qualified name."""
        fn = self.fn
        return {
            "type": "function",
            "fn": f"{getattr(fn, '__module__', '')}.{getattr(fn, '__qualname__', type(fn).__qualname__)}",
        }

    def __repr__(self) -> str:
        return f"FunctionEvaluator({self.fn!r})"


def as_evaluator(fn: Evaluator | Callable[..., Mapping[str, Any]], name: str = "evaluator") -> Evaluator:
    """`fn` as an `Evaluator`: an `Evaluator` as is, a plain callable wrapped once (`FunctionEvaluator`).

    Raises:
        `TypeError`: `fn` is not callable; the message names it as `name`.
    """
    if isinstance(fn, Evaluator):
        return fn
    if not callable(fn):
        raise InputTypeError(
            f"`{name}` must be a callable `model -> dict[str, float]` (or an `Evaluator`), got {fn!r}"
        )
    return FunctionEvaluator(fn)


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
        directions = as_evaluator(evaluator).directions
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


class Scorer:
    """An evaluator and the objective that makes its metrics one score: the one place metrics become a score.

    Calling it evaluates the live model (with the trainer's callbacks muted, the model's training mode restored)
    and returns the score and the real-valued metrics. Errors name the evaluator (`name`) and the missing metric.

    Args:
        evaluator (`Evaluator` or `Callable[[torch.nn.Module], Mapping[str, float]]`): scores a model (a plain
            callable is wrapped with `as_evaluator`).
        objective (`Objective`): metrics -> score.
        name (`str`, *optional*, defaults to `"evaluator"`): the evaluator's name in error messages.
        trainer (`transformers.Trainer`, *optional*): muted while the evaluator runs (no callbacks, no logs).
    """

    def __init__(self, evaluator: Evaluator | Callable, objective: Objective, name: str = "evaluator", trainer=None):
        self.evaluator = as_evaluator(evaluator, name)
        self.objective, self.name, self.trainer = objective, name, trainer

    def fingerprint(self) -> dict:
        """The evaluator's fingerprint and the objective: what makes this scorer's scores (for the journal)."""
        return {"evaluator": self.evaluator.fingerprint(), "objective": self.objective.metrics}

    def score(self, metrics: Mapping[str, Any]) -> tuple[float, dict[str, float], dict[str, list[float]]]:
        """The score of an evaluation's metrics, the metrics kept for the report, and the per-item scores of the
        objective's metrics (empty unless the evaluator gave all of them item by item)."""
        if not isinstance(metrics, Mapping):
            raise InputTypeError(
                f"`{self.name}` must return a dict of metrics, got {type(metrics).__name__}: {metrics!r}"
            )
        items = {key: self._items(key, value) for key, value in metrics.items() if _is_items(value)}
        metrics = {**metrics, **{key: math.fsum(values) / len(values) for key, values in items.items()}}
        try:
            return self.objective(metrics), numeric_metrics(metrics), self.objective.items(items)
        except KeyError as error:
            raise MissingNameError(f"ExMe: {error.args[0]}") from None

    def _items(self, key: str, values) -> list[float]:
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        if not values or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
            raise InputTypeError(
                f"`{self.name}` gave `{key}` as a list: it must be a non-empty list of per-item scores (numbers), "
                f"got {values[:5]!r}{'...' if len(values) > 5 else ''}"
            )
        return [float(v) for v in values]

    def __call__(self, model: torch.nn.Module, items: Mapping[str, Sequence[int]] | None = None) -> tuple:
        """Evaluate the live model: `(score, metrics, items)` (see `score`); on a subset of the items (group -> item
        indices, for racing) when `items` is given, split across the ranks of a distributed run unless the evaluator
        is `rank_aware`. A group asked for no item is left out of the call: its metrics' per-item scores are empty,
        and the subset's score is NaN."""
        asked = None if items is None else {group: list(ids) for group, ids in items.items() if len(ids)}
        was_training = model.training
        try:
            with muted(self.trainer) if self.trainer is not None else contextlib.nullcontext():
                if asked is None:
                    metrics = self.evaluator(model)
                elif not asked:
                    metrics = {}
                elif sharding.world() == 1 or self.evaluator.rank_aware:
                    metrics = self.evaluator(model, items=asked)
                else:
                    metrics = self._split(model, asked)
        finally:
            model.train(was_training)
        if asked is None or len(asked) == len(items):
            return self.score(metrics)
        from .strategies.racing import item_group

        per_item = {key: self._items(key, value) for key, value in metrics.items() if _is_items(value)}
        for name in self.objective.metrics:
            if item_group(name) in items and item_group(name) not in asked and metric_key(name, per_item) is None:
                per_item[name] = []
        means = {key: math.fsum(values) / len(values) for key, values in per_item.items() if values}
        return math.nan, numeric_metrics({**metrics, **means}), self.objective.items(per_item)

    def _split(self, model: torch.nn.Module, items: Mapping[str, list[int]]) -> dict[str, list[float]]:
        """The per-item scores of `items`, each rank scoring its round-robin share of every group (as many items on
        every rank: a short share ends with a copy of the group's first item, dropped), gathered in order."""
        from .strategies.racing import item_group

        world = sharding.world()
        shares = {group: [ids[p] for p in sharding.share(len(ids))] for group, ids in items.items()}
        sizes = {group: -(-len(ids) // world) for group, ids in items.items()}
        padded = {group: share + [items[group][0]] * (sizes[group] - len(share)) for group, share in shares.items()}
        mine = {}
        for key, value in self.evaluator(model, items=padded).items():
            if not _is_items(value):
                continue  # a number for this rank's share only: not the whole's
            group = item_group(key)
            scores = self._items(key, value)
            if group not in sizes or len(scores) != sizes[group]:
                raise InputError(
                    f"`{self.name}` gave {len(scores)} per-item scores of `{key}` when asked for "
                    f"{sizes.get(group, 0)} items of {group!r}: it must score the items asked for, in that order."
                )
            mine[key] = scores[: len(shares[group])]
        parts = sharding.gather(mine)
        gathered = {}
        for key in mine:
            n = len(items[item_group(key)])
            gathered[key] = [parts[i % world][key][i // world] for i in range(n)]
        return gathered

    def evaluation(self, model: torch.nn.Module, metrics: Mapping[str, Any]) -> tuple[float, dict, dict, bool]:
        """The score, metrics and per-item scores of a training evaluation: from the trainer's own `metrics` when the
        evaluator would compute the same (`reuses_training_scores`), else from evaluating the live model. The last
        item says which (`True`: evaluated now)."""
        if self.evaluator.reuses_training_scores:
            return (*self.score(metrics), False)
        return (*self(model), True)

    def score_into(self, model: torch.nn.Module, candidate, heldout: bool = False):
        """Evaluate the live model into `candidate`'s selection fields (its held-out ones with `heldout=True`); a
        non-finite selection score marks the candidate as not choosable."""
        return candidate.record(*self(model), heldout=heldout)


def _is_items(value) -> bool:
    """Whether a metric's value is given item by item (a list, tuple or 1-D tensor)."""
    return isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.ndim == 1)


def _default_direction(name: str) -> bool:
    return not name.endswith("loss")


@contextlib.contextmanager
def muted(trainer) -> Iterator[None]:
    """Run trainer methods without callbacks and without new `log_history` entries."""
    handler, history = trainer.callback_handler, trainer.state.log_history
    callbacks, n_logs, control = handler.callbacks, len(history), trainer.control
    handler.callbacks = []
    try:
        yield
    finally:
        handler.callbacks = callbacks
        del history[n_logs:]
        trainer.control = control


@contextlib.contextmanager
def preserved_rng(seed: int | None = None) -> Iterator[None]:
    """Run a block with Python's, NumPy's and torch's global RNGs seeded with `seed`, then put them back."""
    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        try:
            if seed is not None:
                random.seed(seed)
                np.random.seed(seed)
                torch.manual_seed(seed)
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)
