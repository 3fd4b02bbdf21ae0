"""How candidates are scored: evaluators (model -> metrics) and the objective (metrics -> one selection score).

An evaluator is any callable `evaluator(model) -> Mapping[str, float]`. `TrainerEvaluator` runs the trainer's own
evaluation loop on the live model without touching the trainer's state; a plain function works as well:

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

`search="racing"` also asks for subsets of the items: an evaluator that takes `items`, a mapping from each group of
items (the task of a `task/metric` name, or the metric itself) to the indices to score, returns the per-item scores
of those items only, in that order:

```python
def evaluator(model, items=None):
    chosen = range(len(dev_set)) if items is None else items["accuracy"]
    return {"accuracy": [float(my_prediction(model, dev_set[i][0]) == dev_set[i][1]) for i in chosen]}
```

The `Objective` turns metrics into the selection score: one metric with its direction (the trainer's
`metric_for_best_model` and `greater_is_better`), or the mean of several, like the ExMe paper's "overall
performance".
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from numbers import Real
from typing import Any

import torch

__all__ = [
    "Evaluator",
    "LMEvalEvaluator",
    "LossEvaluator",
    "Objective",
    "Scorer",
    "TrainerEvaluator",
    "preserved_rng",
]

Evaluator = Callable[[torch.nn.Module], Mapping[str, float]]
_DIRECTIONS = {"max": True, "min": False, True: True, False: False}


class Objective:
    """The selection score: one metric, or the mean of several metrics each with its own direction.

    With one direction for all metrics the score is their mean, in that direction. With mixed directions each
    lower-is-better metric enters the mean negated, and the score is greater-is-better.

    Metric names are looked up as given, then with the `eval_` prefix the trainer adds (`"loss"` finds
    `"eval_loss"`), like `TrainingArguments.metric_for_best_model`.

    Args:
        metrics (`Mapping[str, bool]`): metric name -> whether greater is better.

    Example:

    ```python
    >>> objective = Objective.from_spec({"eval_accuracy": "max", "eval_f1": "max"})
    >>> objective({"eval_accuracy": 0.5, "eval_f1": 0.7})
    0.6
    ```
    """

    def __init__(self, metrics: Mapping[str, bool]):
        if not metrics:
            raise ValueError("`metrics` must name at least one metric.")
        self.metrics = dict(metrics)
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
                    raise ValueError(f"`metrics` must map metric names to 'max' or 'min', got {name!r}: {direction!r}")
                spec[name] = _DIRECTIONS[direction]
            return cls(spec)
        if not isinstance(metrics, Sequence) or not metrics or not all(isinstance(m, str) for m in metrics):
            raise ValueError(f"`metrics` must be a non-empty list of metric names, got {metrics!r}")
        if len(set(metrics)) != len(metrics):
            raise ValueError(f"`metrics` must not repeat a name, got {metrics!r}")
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
            key = _lookup(name, items)
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
            key = _lookup(name, metrics)
            if key is None:
                raise KeyError(
                    f"The metric {name!r} is not in the evaluation's output, which has {sorted(metrics)}. Set "
                    "`metric_for_best_model` (or the callback's `metrics`) to one of them."
                )
            value = metrics[key]
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, Real) or isinstance(value, bool):
                raise TypeError(f"The metric {key!r} must be a real number, got {value!r}")
            found[key] = float(value)
        return found

    def __call__(self, metrics: Mapping[str, Any]) -> float:
        """The selection score of one evaluation (NaN or inf when a metric is)."""
        values = self.values(metrics).values()
        if self._signed:
            values = [v if up else -v for v, up in zip(values, self.metrics.values())]
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
        evaluator (`Callable[[torch.nn.Module], Mapping[str, float]]`): scores a model.
        objective (`Objective`): metrics -> score.
        name (`str`, *optional*, defaults to `"evaluator"`): the evaluator's name in error messages.
        trainer (`transformers.Trainer`, *optional*): muted while the evaluator runs (no callbacks, no logs).
    """

    def __init__(self, evaluator: Evaluator, objective: Objective, name: str = "evaluator", trainer=None):
        self.evaluator, self.objective, self.name, self.trainer = evaluator, objective, name, trainer

    def score(self, metrics: Mapping[str, Any]) -> tuple[float, dict[str, float], dict[str, list[float]]]:
        """The score of an evaluation's metrics, the metrics kept for the report, and the per-item scores of the
        objective's metrics (empty unless the evaluator gave all of them item by item)."""
        if not isinstance(metrics, Mapping):
            raise TypeError(f"`{self.name}` must return a dict of metrics, got {type(metrics).__name__}: {metrics!r}")
        items = {key: self._items(key, value) for key, value in metrics.items() if _is_items(value)}
        metrics = {**metrics, **{key: math.fsum(values) / len(values) for key, values in items.items()}}
        try:
            return self.objective(metrics), numeric_metrics(metrics), self.objective.items(items)
        except KeyError as error:
            raise KeyError(f"ExMe: {error.args[0]}") from None

    def _items(self, key: str, values) -> list[float]:
        values = values.tolist() if isinstance(values, torch.Tensor) else list(values)
        if not values or not all(isinstance(v, Real) and not isinstance(v, bool) for v in values):
            raise TypeError(
                f"`{self.name}` gave `{key}` as a list: it must be a non-empty list of per-item scores (numbers), "
                f"got {values[:5]!r}{'...' if len(values) > 5 else ''}"
            )
        return [float(v) for v in values]

    def __call__(self, model: torch.nn.Module, items: Mapping[str, Sequence[int]] | None = None) -> tuple:
        """Evaluate the live model: `(score, metrics, items)` (see `score`); on a subset of the items (group -> item
        indices, for racing) when `items` is given."""
        was_training = model.training
        try:
            with muted(self.trainer) if self.trainer is not None else contextlib.nullcontext():
                metrics = self.evaluator(model) if items is None else self.evaluator(model, items=items)
        finally:
            model.train(was_training)
        return self.score(metrics)

    def evaluation(self, model: torch.nn.Module, metrics: Mapping[str, Any]) -> tuple[float, dict, dict, bool]:
        """The score, metrics and per-item scores of a training evaluation: from the trainer's own `metrics` when the
        evaluator would compute the same (`reuses_training_scores`), else from evaluating the live model. The last
        item says which (`True`: evaluated now)."""
        if getattr(self.evaluator, "reuses_training_scores", False):
            return (*self.score(metrics), False)
        return (*self(model), True)

    def score_into(self, model: torch.nn.Module, candidate, heldout: bool = False):
        """Evaluate the live model into `candidate`'s selection fields (its held-out ones with `heldout=True`); a
        non-finite selection score marks the candidate as not choosable."""
        score, metrics, items = self(model)
        if heldout:
            candidate.heldout_score, candidate.heldout_metrics, candidate.heldout_items = score, metrics, items
        else:
            candidate.score, candidate.metrics, candidate.items = score, metrics, items
            if not math.isfinite(score):
                candidate.error = f"non-finite score {score}"
        return candidate


def _lookup(name: str, metrics: Mapping[str, Any]) -> str | None:
    """The key `name` is found under: as given, or with the `eval_` prefix the trainer adds."""
    return next((key for key in (name, f"eval_{name}") if key in metrics), None)


def _is_items(value) -> bool:
    """Whether a metric's value is given item by item (a list, tuple or 1-D tensor)."""
    return isinstance(value, (list, tuple)) or (isinstance(value, torch.Tensor) and value.ndim == 1)


def _default_direction(name: str) -> bool:
    return not name.endswith("loss")


class TrainerEvaluator:
    """Scores the live model with `trainer.evaluate()`, leaving the trainer as it was.

    During the call the trainer's callbacks are muted (no early stopping counts, no `eval_*` logs, no other
    callback sees the candidate) and `trainer.state.log_history` is put back, so candidate evaluations never mix
    with the training's own. The metrics keep the trainer's `eval_` prefix, so `metric_for_best_model` names the
    same metric during training and in the sweep.

    Args:
        trainer (`transformers.Trainer`): the trainer (a TRL trainer works the same).
        eval_dataset (`Dataset` or `dict[str, Dataset]`, *optional*): evaluate on this instead of the trainer's
            `eval_dataset`. Scores from training are then not reused.
    """

    def __init__(self, trainer, eval_dataset=None):
        self.trainer = trainer
        self.eval_dataset = eval_dataset

    @property
    def reuses_training_scores(self) -> bool:
        """Whether checkpoint scores from training equal this evaluator's (same trainer, same data)."""
        return self.eval_dataset is None

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        if model is not self.trainer.model:
            raise ValueError("`TrainerEvaluator` can only evaluate its trainer's own model (`trainer.model`).")
        with muted(self.trainer):
            return dict(self.trainer.evaluate(eval_dataset=self.eval_dataset))


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


class LMEvalEvaluator:
    """lm-evaluation-harness tasks, run in-process on the live model: no reload, no network.

    The task manager and the tasks are built once, at construction; every call wraps the live model in lm-eval's
    `HFLM` (once per model object) and evaluates the same task objects. Global RNGs are seeded the same way for every
    call, so every candidate sees the same few-shot examples, and put back afterwards, so training is not disturbed.
    lm-eval's progress bars are hidden: they would print once per candidate.

    The metrics are named `"{task}/{metric}"` (`"{task}/{metric},{filter}"` for filters other than `"none"`), and
    `directions` tells each one's direction (lm-eval's `higher_is_better`). Metrics that lm-eval averages over
    documents (accuracy, exact match) are returned document by document (lm-eval's logged samples, in document
    order), so the report can give their gains confidence intervals. Used as the callback's evaluator with
    `metrics=None`, the selection score is the mean of all of them, like the "Average" column of the ExMe paper.

    Args:
        tasks (`list[str]`): task names (installed lm-eval tasks, or tasks defined under `include_path`).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the model's tokenizer; the callback fills it in from the
            trainer's `processing_class` when it is not given.
        include_path (`str`, *optional*): a folder of task YAML files (for example tasks over local jsonl files).
        limit (`int` or `float`, *optional*): evaluate only the first `limit` documents of each task (a fraction
            when < 1).
        batch_size (`int`, *optional*, defaults to 8): lm-eval's batch size.
        num_fewshot (`int`, *optional*): few-shot examples per prompt; defaults to each task's own setting, else 0.
        apply_chat_template (`bool`, *optional*, defaults to `False`): format prompts with the tokenizer's chat
            template.
        seed (`int`, *optional*, defaults to 1234): the seed of every evaluation (few-shot sampling, sampling
            generation).

    Example:

    ```python
    evaluator = LMEvalEvaluator(["arc_easy", "hellaswag"], tokenizer, limit=200)
    trainer.add_callback(ExMeCallback(trainer, evaluator=evaluator))
    ```
    """

    def __init__(
        self,
        tasks: Sequence[str],
        tokenizer=None,
        *,
        include_path: str | None = None,
        limit: int | float | None = None,
        batch_size: int = 8,
        num_fewshot: int | None = None,
        apply_chat_template: bool = False,
        seed: int = 1234,
    ):
        try:
            from lm_eval.tasks import TaskManager
        except ImportError as error:
            raise ImportError(
                "LMEvalEvaluator needs lm-evaluation-harness: `pip install 'exme-callback[lm-eval]'`."
            ) from error
        if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise ValueError(f"`tasks` must be a non-empty list of lm-eval task names, got {tasks!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, Real) or limit <= 0):
            raise ValueError(f"`limit` must be a positive number, got {limit!r}")
        if include_path is not None and not os.path.isdir(include_path):
            raise ValueError(f"`include_path` must be a folder of task YAML files, got {include_path!r}")
        self.tokenizer = tokenizer
        self.limit, self.batch_size, self.seed = limit, batch_size, seed
        self.apply_chat_template = apply_chat_template
        self._tasks = TaskManager(include_path=include_path).load(list(tasks))
        missing = [t for t in tasks if t not in self._tasks["tasks"] and t not in self._tasks["groups"]]
        if missing or not self._tasks["tasks"]:
            raise ValueError(
                f"`tasks`: lm-eval does not know {missing or list(tasks)}; check the names or `include_path`."
            )
        self.directions: dict[str, bool] = {}
        for name, task in self._tasks["tasks"].items():
            if num_fewshot is not None or task.get_config("num_fewshot") is None:
                task.set_config(key="num_fewshot", value=num_fewshot or 0)
            task.set_fewshot_seed(seed=seed)
            filters = [f.name for f in task._filters] or ["none"]
            for metric, higher in task.higher_is_better().items():
                for filter_name in filters:
                    self.directions[_metric_name(name, metric, filter_name)] = bool(higher)
        self._lm = None  # lm-eval's wrapper of the live model, built on the first call

    def __call__(self, model: torch.nn.Module, items: Mapping[str, Sequence[int]] | None = None) -> dict:
        """The tasks' metrics on the live model (per document where lm-eval averages over documents); only the
        documents `items` names (task -> document indices, ascending) when given, as racing asks."""
        from lm_eval.evaluator import evaluate

        if self.tokenizer is None:
            raise ValueError("`LMEvalEvaluator` needs the model's `tokenizer`.")
        was_training = model.training
        if self._lm is None or self._lm.model is not model:
            with _without_live_model_warnings():
                self._lm = _quiet_hflm_class()(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
        model.eval()
        try:
            with preserved_rng(self.seed), torch.no_grad(), _without_task_progress_bars():
                output = evaluate(
                    lm=self._lm,
                    task_dict=self._tasks,
                    limit=self.limit if items is None else None,
                    samples=None if items is None else {task: list(items[task]) for task in self._tasks["tasks"]},
                    bootstrap_iters=0,
                    log_samples=True,
                    apply_chat_template=self.apply_chat_template,
                    fewshot_as_multiturn=self.apply_chat_template,
                )
        finally:
            model.train(was_training)
        metrics = {}
        for task, values in output["results"].items():
            for key, value in values.items():
                metric, _, filter_name = key.partition(",")
                name = _metric_name(task, metric, filter_name)
                if name in self.directions:
                    metrics[name] = float(value)
        return {**metrics, **self._per_item(output.get("samples") or {})}

    def _per_item(self, samples: Mapping[str, list[dict]]) -> dict[str, list[float]]:
        """The per-document scores of every metric lm-eval aggregates by their mean, in document order: their
        mean is the metric."""
        from lm_eval.api.metrics import mean

        items: dict[str, list[float]] = {}
        for task, logged in samples.items():
            averaged = {m for m, f in self._tasks["tasks"][task].aggregation().items() if f is mean}
            for sample in sorted(logged, key=lambda sample: sample["doc_id"]):  # stable: filters stay apart
                for metric in averaged & set(sample["metrics"]):
                    name = _metric_name(task, metric, sample["filter"])
                    if name in self.directions and isinstance(sample[metric], Real):
                        items.setdefault(name, []).append(float(sample[metric]))
        return items


@contextlib.contextmanager
def _without_task_progress_bars() -> Iterator[None]:
    """Hide the bar lm-eval's tasks show while building their requests (it has no switch), once per candidate."""
    from lm_eval.api import task as task_module

    original = getattr(task_module, "tqdm", None)
    if original is None:
        yield
        return
    task_module.tqdm = functools.partial(original, disable=True)
    try:
        yield
    finally:
        task_module.tqdm = original


@functools.cache
def _quiet_hflm_class():
    from lm_eval.models.huggingface import HFLM

    class QuietHFLM(HFLM):
        """lm-eval's `HFLM` without its request progress bars, which would print once per candidate."""

        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm=True)

    return QuietHFLM


# What lm-eval's `HFLM` logs whenever it wraps a model object instead of loading a name: advice about `accelerate
# launch` and `parallelize=True`, which the evaluator never uses, once per wrapped model.
_HFLM_LOGGER = "lm_eval.models.huggingface"
_HFLM_LIVE_MODEL_WARNINGS = (
    "`pretrained` model kwarg is not of type `str`. Many other model arguments may be ignored.",
    "Passed an already-initialized model through `pretrained`, assuming single-process call to evaluate()",
)


class _DropWarnings(logging.Filter):
    """Drop the warning records whose message starts with one of `prefixes`; let everything else through."""

    def __init__(self, prefixes: tuple[str, ...]):
        super().__init__()
        self.prefixes = prefixes

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.WARNING and record.getMessage().startswith(self.prefixes))


@contextlib.contextmanager
def _without_live_model_warnings() -> Iterator[None]:
    """Hide `HFLM`'s warnings about being given a live model (see `_HFLM_LIVE_MODEL_WARNINGS`) during a block."""
    logger, drop = logging.getLogger(_HFLM_LOGGER), _DropWarnings(_HFLM_LIVE_MODEL_WARNINGS)
    logger.addFilter(drop)
    try:
        yield
    finally:
        logger.removeFilter(drop)


def _metric_name(task: str, metric: str, filter_name: str) -> str:
    return f"{task}/{metric}" if filter_name in ("none", "") else f"{task}/{metric},{filter_name}"


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


# The record formats of `LossEvaluator` (TRL's dataset formats), by the fields that name them.
_LOSS_FORMATS = {"text": ("text",), "prompt-completion": ("prompt", "completion"), "messages": ("messages",)}


class LossEvaluator:
    r"""The mean token loss of a causal language model on local data, as `{"eval_loss": float}` (lower is better).

    The loss is token-weighted over the whole data set (not a mean of per-batch or per-record means):

    $$
    \mathrm{eval\_loss} = \frac{\sum_r \sum_{t \in T_r} -\log p_\theta(x_{r,t} \mid x_{r,<t})}{\sum_r |T_r|}
    $$

    where $x_r$ are the tokens of record $r$ and $T_r$ its scored positions (never the first token, which has no
    context). Records come in one of TRL's dataset formats, the same for all records:

    - `{"text": str}`: every token is scored.
    - `{"prompt": str, "completion": str}`: only the completion's tokens are scored, like TRL's completion-only
      loss. The record is tokenized as `prompt + completion`; its first `len(tokenizer(prompt))` tokens are the
      prompt's, and their labels are -100.
    - `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with `tokenizer.apply_chat_template`; every
      token is scored.

    Text and prompt-completion records get the tokenizer's end-of-sequence token when they do not end with it
    already; every record is then cut to `max_length` tokens. The data is tokenized once, at construction. Each call
    runs the model in eval mode under `torch.no_grad()` on its own device, in right-padded batches with attention
    masks, sums the cross-entropy of each batch in float32 and accumulates the sums in float64; the model's training
    mode is put back afterwards.

    Args:
        records_or_path (`str`, `os.PathLike` or `Sequence[Mapping[str, Any]]`): a JSON Lines file (one record per
            line; blank lines are skipped), or the records themselves.
        tokenizer (`PreTrainedTokenizerBase`): the model's tokenizer.
        batch_size (`int`, *optional*, defaults to 8): records per forward pass.
        max_length (`int`, *optional*, defaults to 1024): the most tokens kept of each record.

    Raises:
        `FileNotFoundError`: the file does not exist.
        `ValueError`: the file is empty, a line is not JSON, a record has none of the fields above (or several
            formats' fields), or the records mix formats; the message names the file and the line.

    Example:

    ```python
    >>> evaluator = LossEvaluator("heldout.jsonl", tokenizer, batch_size=16)
    >>> evaluator(model)
    {'eval_loss': 2.318}
    >>> trainer.add_callback(ExMeCallback(trainer, evaluator=evaluator))
    ```
    """

    def __init__(
        self,
        records_or_path: str | os.PathLike | Sequence[Mapping[str, Any]],
        tokenizer,
        *,
        batch_size: int = 8,
        max_length: int = 1024,
    ):
        if tokenizer is None:
            raise ValueError("`tokenizer` is required: `LossEvaluator` tokenizes its records at construction.")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise ValueError(f"`max_length` must be an integer >= 2, got {max_length!r}")
        self.tokenizer, self.batch_size, self.max_length = tokenizer, batch_size, max_length
        self.directions: dict[str, bool] = {"eval_loss": False}

        # 1. Read the records, each with where it came from, and check that they share one format.
        if isinstance(records_or_path, (str, os.PathLike)):
            source = os.fspath(records_or_path)
            rows = _read_jsonl(source)
        elif isinstance(records_or_path, Sequence) and records_or_path:
            source = "`records_or_path`"
            rows = [(f"`records_or_path`[{i}]", record) for i, record in enumerate(records_or_path)]
        else:
            raise ValueError(
                f"`records_or_path` must be a file path or a non-empty list of records, got {records_or_path!r}"
            )
        formats = [(where, _record_format(record, where)) for where, record in rows]
        first_where, self.format = formats[0]
        for where, kind in formats:
            if kind != self.format:
                raise ValueError(
                    f"{where}: a {kind!r} record, but {first_where} is a {self.format!r} record; the records of "
                    f"{source} must all have one format."
                )

        # 2. Tokenize; labels are the input ids with the unscored positions at -100.
        examples = [self._encode(record, where) for where, record in rows]
        self.num_records = len(examples)
        self.num_tokens = sum(max(len(ids) - max(masked, 1), 0) for ids, masked in examples)
        if self.num_tokens == 0:
            raise ValueError(f"{source} has no token to score: every record is shorter than two tokens.")

        # 3. Batch by decreasing length (least padding; the largest batch runs first), padded on the right.
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        order = sorted(range(len(examples)), key=lambda i: -len(examples[i][0]))
        self._batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for start in range(0, len(order), batch_size):
            chunk = [examples[i] for i in order[start : start + batch_size]]
            width = len(chunk[0][0])
            input_ids = torch.full((len(chunk), width), pad, dtype=torch.long)
            attention_mask = torch.zeros((len(chunk), width), dtype=torch.long)
            labels = torch.full((len(chunk), width), -100, dtype=torch.long)
            for row, (ids, masked) in enumerate(chunk):
                input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                attention_mask[row, : len(ids)] = 1
                labels[row, masked : len(ids)] = input_ids[row, masked : len(ids)]
            self._batches.append((input_ids, attention_mask, labels))

    def _encode(self, record: Mapping[str, Any], where: str) -> tuple[list[int], int]:
        """The token ids of one record, and how many leading tokens are not scored."""
        tokenizer = self.tokenizer
        if self.format == "messages":
            messages = record["messages"]
            if not isinstance(messages, list) or not all(isinstance(m, Mapping) for m in messages):
                raise ValueError(f"{where}: `messages` must be a list of {{'role', 'content'}} objects.")
            if getattr(tokenizer, "chat_template", None) is None:
                raise ValueError(f"{where}: `messages` records need a chat template, and `tokenizer` has none.")
            text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])[: self.max_length], 0
        fields = _LOSS_FORMATS[self.format]
        for field in fields:
            if not isinstance(record[field], str):
                raise ValueError(f"{where}: `{field}` must be a string, got a {type(record[field]).__name__}.")
        ids = list(tokenizer("".join(record[field] for field in fields))["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        masked = len(tokenizer(record["prompt"])["input_ids"]) if self.format == "prompt-completion" else 0
        return ids[: self.max_length], min(masked, self.max_length)

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        was_training = model.training
        total = torch.zeros((), dtype=torch.float64, device=device)
        model.eval()
        try:
            with torch.no_grad():
                for input_ids, attention_mask, labels in self._batches:
                    logits = model(
                        input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), use_cache=False
                    ).logits
                    losses = torch.nn.functional.cross_entropy(
                        logits[:, :-1].flatten(0, 1).float(),
                        labels[:, 1:].flatten().to(device),
                        ignore_index=-100,
                        reduction="sum",
                    )
                    total += losses.double()
        finally:
            model.train(was_training)
        return {"eval_loss": total.item() / self.num_tokens}

    def __repr__(self) -> str:
        return f"LossEvaluator({self.num_records} {self.format} records, {self.num_tokens} scored tokens)"


def _read_jsonl(path: str) -> list[tuple[str, Any]]:
    """The records of a JSON Lines file, each with `"{path}, line {n}"`."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`records_or_path`: there is no file {path!r}")
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as error:
                raise ValueError(f"{where} is not valid JSON: {error}") from None
    if not rows:
        raise ValueError(f"`records_or_path`: {path} is empty; it needs one JSON record per line.")
    return rows


def _record_format(record: Any, where: str) -> str:
    """The one format (a key of `_LOSS_FORMATS`) whose fields the record has."""
    found = [
        kind
        for kind, fields in _LOSS_FORMATS.items()
        if isinstance(record, Mapping) and all(field in record for field in fields)
    ]
    if len(found) != 1:
        got = f"the fields {sorted(map(str, record))}" if isinstance(record, Mapping) else type(record).__name__
        raise ValueError(
            f"{where}: a record needs exactly one of a `text` field, `prompt` and `completion` fields, or a "
            f"`messages` field; got {got}."
        )
    return found[0]
