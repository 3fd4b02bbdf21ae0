"""`LossEvaluator`: the token-weighted loss of a causal language model on local records (TRL's dataset formats)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..errors import InputError, MissingFileError
from ..scoring import Evaluator

__all__ = ["LossEvaluator"]


# The record formats of `LossEvaluator` (TRL's dataset formats), by the fields that name them.
_LOSS_FORMATS = {"text": ("text",), "prompt-completion": ("prompt", "completion"), "messages": ("messages",)}


class LossEvaluator(Evaluator):
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

    directions = {"eval_loss": False}

    def __init__(
        self,
        records_or_path: str | os.PathLike | Sequence[Mapping[str, Any]],
        tokenizer,
        *,
        batch_size: int = 8,
        max_length: int = 1024,
    ):
        if tokenizer is None:
            raise InputError("`tokenizer` is required: `LossEvaluator` tokenizes its records at construction.")
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"`batch_size` must be a positive integer, got {batch_size!r}")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise InputError(f"`max_length` must be an integer >= 2, got {max_length!r}")
        self.tokenizer, self.batch_size, self.max_length = tokenizer, batch_size, max_length

        # 1. Read the records, each with where it came from, and check that they share one format.
        if isinstance(records_or_path, (str, os.PathLike)):
            source = os.fspath(records_or_path)
            rows = _read_jsonl(source)
        elif isinstance(records_or_path, Sequence) and records_or_path:
            source = "`records_or_path`"
            rows = [(f"`records_or_path`[{i}]", record) for i, record in enumerate(records_or_path)]
        else:
            raise InputError(
                f"`records_or_path` must be a file path or a non-empty list of records, got {records_or_path!r}"
            )
        formats = [(where, _record_format(record, where)) for where, record in rows]
        first_where, self.format = formats[0]
        for where, kind in formats:
            if kind != self.format:
                raise InputError(
                    f"{where}: a {kind!r} record, but {first_where} is a {self.format!r} record; the records of "
                    f"{source} must all have one format."
                )

        # 2. Tokenize; labels are the input ids with the unscored positions at -100.
        examples = [self._encode(record, where) for where, record in rows]
        self.num_records = len(examples)
        self.num_tokens = sum(max(len(ids) - max(masked, 1), 0) for ids, masked in examples)
        if self.num_tokens == 0:
            raise InputError(f"{source} has no token to score: every record is shorter than two tokens.")

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
                raise InputError(f"{where}: `messages` must be a list of {{'role', 'content'}} objects.")
            if getattr(tokenizer, "chat_template", None) is None:
                raise InputError(f"{where}: `messages` records need a chat template, and `tokenizer` has none.")
            text = tokenizer.apply_chat_template([dict(m) for m in messages], tokenize=False)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])[: self.max_length], 0
        fields = _LOSS_FORMATS[self.format]
        for field in fields:
            if not isinstance(record[field], str):
                raise InputError(f"{where}: `{field}` must be a string, got a {type(record[field]).__name__}.")
        ids = list(tokenizer("".join(record[field] for field in fields))["input_ids"])
        eos = tokenizer.eos_token_id
        if eos is not None and (not ids or ids[-1] != eos):
            ids.append(eos)
        masked = len(tokenizer(record["prompt"])["input_ids"]) if self.format == "prompt-completion" else 0
        return ids[: self.max_length], min(masked, self.max_length)

    def fingerprint(self) -> dict:
        """The records' size and format, and how they are batched (for the sweep's journal)."""
        settings = ("format", "num_records", "num_tokens", "batch_size", "max_length")
        return {"type": "loss", **{name: getattr(self, name) for name in settings}}

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
        raise MissingFileError(f"`records_or_path`: there is no file {path!r}")
    rows = []
    with open(path, encoding="utf-8") as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            try:
                rows.append((where, json.loads(line)))
            except json.JSONDecodeError as error:
                raise InputError(f"{where} is not valid JSON: {error}") from None
    if not rows:
        raise InputError(f"`records_or_path`: {path} is empty; it needs one JSON record per line.")
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
        raise InputError(
            f"{where}: a record needs exactly one of a `text` field, `prompt` and `completion` fields, or a "
            f"`messages` field; got {got}."
        )
    return found[0]
