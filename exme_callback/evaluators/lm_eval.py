"""`LMEvalEvaluator`: lm-evaluation-harness tasks, run in-process on the live model (lm-eval imported lazily)."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real

import torch

from .. import sharding
from ..errors import InputError, MissingExtraError
from ..scoring import Evaluator, preserved_rng
from .lm_eval_requests import BuiltTask, build, score

__all__ = ["LMEvalEvaluator"]


class LMEvalEvaluator(Evaluator):
    """lm-evaluation-harness tasks, run in-process on the live model: no reload, no network.

    The task manager and the tasks are built once, at construction, and each task's requests (its instances: the
    prompts of every document up to `limit`, with the few-shot examples drawn from `seed`) once, at the first call,
    as lm-eval's `evaluate` builds them in one process; every call wraps the live model in lm-eval's `HFLM` (once per
    model object) and runs the requests of the documents it scores. Global RNGs are seeded the same way for every
    call and put back afterwards, so training is not disturbed. lm-eval's progress bars are hidden: they would print
    once per candidate.

    In a distributed run (`torch.distributed` initialized: DDP, DeepSpeed, FSDP2, `exme run` under `torchrun` or
    `accelerate launch`) each rank scores its share of the documents (round robin over those asked for), and the
    per-document results are gathered, so every rank returns the same metrics, those of one process (up to the
    rounding of other batches, and sampling generation's draws). lm-eval itself would run every document on every
    rank: it treats a live model as rank 0 of a world of 1. When the model is sharded (FSDP2, ZeRO-3) every forward
    pass is a collective, so the ranks with fewer requests of a type run copies (their results dropped) and
    generation runs with `synced_gpus=True`: every rank runs as many forward passes.

    The metrics are named `"{task}/{metric}"` (`"{task}/{metric},{filter}"` for filters other than `"none"`), and
    `directions` tells each one's direction (lm-eval's `higher_is_better`). Metrics that lm-eval averages over
    documents (accuracy, exact match) are returned document by document, in document order, so the report can give
    their gains confidence intervals; the others (perplexities, F1) are lm-eval's aggregation over the documents.
    Used as the callback's evaluator with `metrics=None`, the selection score is the mean of all of them, like the
    "Average" column of the ExMe paper.

    Args:
        tasks (`list[str]`): task names (installed lm-eval tasks, or tasks defined under `include_path`).
        tokenizer (`PreTrainedTokenizerBase`, *optional*): the model's tokenizer; the callback fills it in from the
            trainer's `processing_class` when it is not given.
        include_path (`str`, *optional*): a folder of task YAML files (for example tasks over local jsonl files).
        limit (`int` or `float`, *optional*): evaluate only the first `limit` documents of each task (a fraction
            when < 1).
        batch_size (`int`, *optional*, defaults to 8): lm-eval's batch size (per rank).
        num_fewshot (`int`, *optional*): few-shot examples per prompt; defaults to each task's own setting, else 0.
        apply_chat_template (`bool`, *optional*, defaults to `False`): format prompts with the tokenizer's chat
            template.
        seed (`int`, *optional*, defaults to 1234): the seed of every evaluation (few-shot sampling, sampling
            generation).

    Attributes:
        documents_scored (`int`): the documents this process has scored, over all calls (its share of them in a
            distributed run).

    Example:

    ```python
    evaluator = LMEvalEvaluator(["arc_easy", "hellaswag"], tokenizer, limit=200)
    trainer.add_callback(ExMeCallback(trainer, evaluator=evaluator))
    ```
    """

    scores_subsets = True
    rank_aware = True

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
            filters = [f.name for f in task._filters] or ["none"]
            for metric, higher in task.higher_is_better().items():
                for filter_name in filters:
                    self.directions[_metric_name(name, metric, filter_name)] = bool(higher)
        self.documents_scored = 0
        self._lm = None  # lm-eval's wrapper of the live model, built on the first call
        self._built: dict[str, BuiltTask] | None = None  # each task's instances, built on the first call

    def fingerprint(self) -> dict:
        """The tasks, their few-shot settings, and how they are run (for the sweep's journal)."""
        fewshot = {name: task.get_config("num_fewshot") for name, task in self._tasks["tasks"].items()}
        settings = {"limit": self.limit, "batch_size": self.batch_size, "seed": self.seed}
        return {"type": "lm-eval", "num_fewshot": fewshot, "chat": self.apply_chat_template, **settings}

    def use_tokenizer(self, tokenizer) -> None:
        """Take the trainer's tokenizer when none was given at construction; one given is kept."""
        if self.tokenizer is None:
            self.tokenizer = tokenizer

    def __call__(self, model: torch.nn.Module, items: Mapping[str, Sequence[int]] | None = None) -> dict:
        """The tasks' metrics on the live model (per document where lm-eval averages over documents); only the
        documents `items` names (task -> document indices) when given, as racing asks, in that order (the tasks it
        leaves out are not evaluated)."""
        if self.tokenizer is None:
            raise InputError("`LMEvalEvaluator` needs the model's `tokenizer`.")
        was_training = model.training
        if self._lm is None or self._lm.model is not model:
            with _without_live_model_warnings():
                self._lm = _quiet_hflm_class()(
                    pretrained=model, tokenizer=self.tokenizer, batch_size=self.batch_size, logits_cache=False
                )
        self._lm.synced = sharding.world() > 1 and sharding.is_sharded(model)
        model.eval()
        try:
            with preserved_rng(self.seed), torch.no_grad(), _without_task_progress_bars():
                built = self._build()
                results, scored = score(self._lm, built, self._requested(items), self._lm.synced)
        finally:
            model.train(was_training)
        self.documents_scored += scored
        return self._metrics(results)

    def _build(self) -> dict[str, BuiltTask]:
        """Each task's instances, built once (the first call), as `evaluate` builds them in one process."""
        if self._built is None:
            from lm_eval.evaluator_utils import get_sample_size

            chat = bool(self.apply_chat_template)
            context = dict(
                apply_chat_template=chat,
                fewshot_as_multiturn=chat,
                chat_template=self._lm.apply_chat_template if chat else None,
                tokenizer_name=self._lm.tokenizer_name if chat else "",
            )
            self._built = {
                name: build(task, get_sample_size(task, self.limit), self.seed, **context)
                for name, task in self._tasks["tasks"].items()
            }
        return self._built

    def _requested(self, items: Mapping[str, Sequence[int]] | None) -> dict[str, list[int]]:
        """Task -> the documents to score: all of them, or those of `items` (checked), in task order."""
        if items is None:
            return {name: list(range(len(entry.docs))) for name, entry in self._built.items()}
        unknown = sorted(set(items) - set(self._built))
        if unknown:
            raise InputError(f"`items` names {unknown}, which are not tasks of this evaluator: {list(self._built)}")
        requested = {}
        for name, entry in self._built.items():
            if name in items:
                ids = list(items[name])
                if not all(isinstance(i, int) and 0 <= i < len(entry.docs) for i in ids):
                    raise InputError(
                        f"`items[{name!r}]` must be document indices in [0, {len(entry.docs)}) (the task's documents "
                        f"up to `limit`={self.limit!r}), got {ids!r}"
                    )
                requested[name] = ids
        return requested

    def _metrics(self, results: Mapping[str, list[dict[str, dict]]]) -> dict:
        """Each task's metrics from its documents' results, in order: lm-eval's aggregation of each, and the
        per-document scores of every metric it averages (their mean is the metric)."""
        from lm_eval.api.metrics import mean

        metrics: dict = {}
        for name, documents in results.items():
            entry, aggregation = self._built[name], self._built[name].task.aggregation()
            for key in entry.filters:
                values: dict[str, list] = {}
                for document in documents:
                    for metric, value in document[key].items():
                        values.setdefault(metric, []).append(value)
                for metric, scores in values.items():
                    metric_name = _metric_name(name, metric, key)
                    if metric_name not in self.directions:
                        continue
                    aggregate = aggregation.get(metric, mean)
                    per_item = aggregate is mean and all(isinstance(v, Real) for v in scores)
                    metrics[metric_name] = [float(v) for v in scores] if per_item else float(aggregate(scores))
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
        """lm-eval's `HFLM` without its request progress bars, which would print once per candidate.

        Given a live model, `HFLM` makes no process group of its own: it takes the model's device, and rank 0 of a
        world of 1. With `synced` (the model is sharded over the ranks, every forward pass a collective) it sees
        the run's ranks, so `loglikelihood_rolling` pads every rank to the same number of windows, and generation
        runs with `synced_gpus=True`, every rank stepping until all are done.
        """

        synced = False  # set by the evaluator at every call

        @property
        def rank(self) -> int:
            return sharding.rank() if self.synced else 0

        @property
        def world_size(self) -> int:
            return sharding.world() if self.synced else 1

        def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
            if not self.synced:
                return tensor
            gathered = [torch.empty_like(tensor) for _ in range(sharding.world())]
            torch.distributed.all_gather(gathered, tensor)
            return torch.stack(gathered)

        def _model_generate(self, context, max_length, stop, **generation_kwargs):
            if self.synced:
                generation_kwargs["synced_gpus"] = True
            return super()._model_generate(context, max_length, stop, **generation_kwargs)

        def loglikelihood(self, requests, disable_tqdm=False):
            return super().loglikelihood(requests, disable_tqdm=True)

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            return super().loglikelihood_rolling(requests, disable_tqdm=True)

        def generate_until(self, requests, disable_tqdm=False):
            return super().generate_until(requests, disable_tqdm=True)

        def _loglikelihood_tokens(self, requests, disable_tqdm=False, override_bs=None):
            return super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)

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
