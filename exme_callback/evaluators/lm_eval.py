"""`LMEvalEvaluator`: lm-evaluation-harness tasks, run in-process on the live model (lm-eval imported lazily)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real

import torch

from ..errors import InputError, MissingExtraError
from ..scoring import Evaluator, preserved_rng

__all__ = ["LMEvalEvaluator"]


class LMEvalEvaluator(Evaluator):
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

    scores_subsets = True

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
            raise MissingExtraError(
                "LMEvalEvaluator needs lm-evaluation-harness: `pip install 'exme-callback[lm-eval]'`."
            ) from error
        if isinstance(tasks, str) or not tasks or not all(isinstance(t, str) for t in tasks):
            raise InputError(f"`tasks` must be a non-empty list of lm-eval task names, got {tasks!r}")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, Real) or limit <= 0):
            raise InputError(f"`limit` must be a positive number, got {limit!r}")
        if include_path is not None and not os.path.isdir(include_path):
            raise InputError(f"`include_path` must be a folder of task YAML files, got {include_path!r}")
        self.tokenizer = tokenizer
        self.limit, self.batch_size, self.seed = limit, batch_size, seed
        self.apply_chat_template = apply_chat_template
        self._tasks = TaskManager(include_path=include_path).load(list(tasks))
        missing = [t for t in tasks if t not in self._tasks["tasks"] and t not in self._tasks["groups"]]
        if missing or not self._tasks["tasks"]:
            raise InputError(
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

    def use_tokenizer(self, tokenizer) -> None:
        """Take the trainer's tokenizer when none was given at construction; one given is kept."""
        if self.tokenizer is None:
            self.tokenizer = tokenizer

    def __call__(self, model: torch.nn.Module, items: Mapping[str, Sequence[int]] | None = None) -> dict:
        """The tasks' metrics on the live model (per document where lm-eval averages over documents); only the
        documents `items` names (task -> document indices, ascending) when given, as racing asks."""
        from lm_eval.evaluator import evaluate

        if self.tokenizer is None:
            raise InputError("`LMEvalEvaluator` needs the model's `tokenizer`.")
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
