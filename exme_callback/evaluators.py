"""The evaluators: `TrainerEvaluator` (the trainer's evaluation without side effects), `LMEvalEvaluator`
(lm-evaluation-harness tasks in-process) and `LossEvaluator` (the token loss on local data). `scoring` says what an
evaluator is and how its metrics become a score."""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from numbers import Real
from typing import Any

import torch

from .scoring import muted, preserved_rng

__all__ = ["LMEvalEvaluator", "LossEvaluator", "TrainerEvaluator"]


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
