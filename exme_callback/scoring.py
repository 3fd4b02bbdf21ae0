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

The `Objective` (`objective`) turns metrics into the selection score; the `Scorer` pairs an evaluator with it.
"""

from __future__ import annotations

import contextlib
import inspect
import math
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from numbers import Real
from typing import Any

import torch

from . import sharding
from .errors import InputError, InputTypeError, MissingNameError, UnsupportedError
from .objective import Objective, item_group, metric_key, numeric_metrics

__all__ = ["Evaluator", "FunctionEvaluator", "Scorer", "as_evaluator", "muted", "preserved_rng"]


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
        per_item = {key: self._items(key, value) for key, value in metrics.items() if _is_items(value)}
        for name in self.objective.metrics:
            if item_group(name) in items and item_group(name) not in asked and metric_key(name, per_item) is None:
                per_item[name] = []
        means = {key: math.fsum(values) / len(values) for key, values in per_item.items() if values}
        return math.nan, numeric_metrics({**metrics, **means}), self.objective.items(per_item)

    def _split(self, model: torch.nn.Module, items: Mapping[str, list[int]]) -> dict[str, list[float]]:
        """The per-item scores of `items`, each rank scoring its round-robin share of every group (as many items on
        every rank: a short share ends with a copy of the group's first item, dropped), gathered in order."""
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
