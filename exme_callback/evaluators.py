"""How candidates are scored: evaluators (model -> metrics) and the objective (metrics -> one selection score).

An evaluator is any callable `evaluator(model) -> Mapping[str, float]`. `TrainerEvaluator` runs the trainer's own
evaluation loop on the live model without touching the trainer's state; a plain function works as well:

```python
def evaluator(model):
    return {"accuracy": my_accuracy(model)}
```

The `Objective` turns metrics into the selection score: one metric with its direction (the trainer's
`metric_for_best_model` and `greater_is_better`), or the mean of several, like the ExMe paper's "overall
performance".
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from numbers import Real
from typing import Any

import torch

__all__ = ["Evaluator", "LMEvalEvaluator", "Objective", "TrainerEvaluator", "preserved_rng"]

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

    @property
    def name(self) -> str:
        """`"eval_loss"` for one metric, `"mean(eval_a, -eval_b)"` for several."""
        if len(self.metrics) == 1:
            return next(iter(self.metrics))
        signs = {name: "-" if self._signed and not up else "" for name, up in self.metrics.items()}
        return "mean(" + ", ".join(signs[name] + name for name in self.metrics) + ")"

    def values(self, metrics: Mapping[str, Any]) -> dict[str, float]:
        """The metrics this objective reads, by the name they were found under.

        Raises:
            `KeyError`: a metric is missing; the message lists what the evaluation produced.
            `TypeError`: a metric is not a real number.
        """
        found = {}
        for name in self.metrics:
            key = next((k for k in (name, f"eval_{name}") if k in metrics), None)
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
    `directions` tells each one's direction (lm-eval's `higher_is_better`). Used as the callback's evaluator with
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

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        from lm_eval.evaluator import evaluate

        if self.tokenizer is None:
            raise ValueError("`LMEvalEvaluator` needs the model's `tokenizer`.")
        was_training = model.training
        if self._lm is None or self._lm.model is not model:
            self._lm = _quiet_hflm_class()(pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size)
        model.eval()
        try:
            with preserved_rng(self.seed), torch.no_grad(), _without_task_progress_bars():
                output = evaluate(
                    lm=self._lm,
                    task_dict=self._tasks,
                    limit=self.limit,
                    bootstrap_iters=0,
                    log_samples=False,
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
        return metrics


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
