"""The sweep's journal: every finished evaluation on disk, so a sweep that stopped (a killed job, a failure) resumes
where it stopped instead of scoring every candidate again.

The journal is a JSON-lines file beside the output folder (`<output_dir>/exme-journal.jsonl` for the default
`<output_dir>/exme`). Its first line is the sweep's fingerprint: a hash of the search settings, of the evaluators
(`Evaluator.fingerprint`) and objectives, and of the kept checkpoints (their steps and the Gram matrix of their task
vectors, a cheap exact identity of the span). Each further line is one evaluation: which model (the point of the
span, or the merge off it), which items (the whole evaluation, or a race's subset), for which score (selection or
held-out), and what it gave (score, metrics, per-item scores). A line is written in one `write` and flushed to disk
before the next evaluation starts; a line cut short by a kill is dropped when the journal is read back.

A sweep started over the same output reads the journal back and takes every evaluation it holds instead of running
it again, so it ends with the same report and model as an uninterrupted sweep; a journal with another fingerprint is
ignored (and replaced), never mixed in. The journal is removed once the result is published. In a multi-process run
the main process reads and writes it, and every rank gets the same evaluations.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Mapping
from typing import Any, NamedTuple

from . import sharding

__all__ = ["JOURNAL_SUFFIX", "Evaluation", "Journal", "fingerprint"]

logger = logging.getLogger(__name__)

JOURNAL_SUFFIX = "-journal.jsonl"  # after the output folder's path
_VERSION = 1


class Evaluation(NamedTuple):
    """What one evaluation gave: the selection (or held-out) score, the metrics and the per-item scores."""

    score: float
    metrics: dict[str, float]
    items: dict[str, list[float]]


def fingerprint(*parts: Any) -> str:
    """A stable hash of `parts` (settings, evaluators' descriptions, numbers): the same in every process.
    Dataclasses are described by their fields, other objects by their type's name (never by an address)."""
    text = json.dumps(_describe(parts), sort_keys=True, allow_nan=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _describe(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _describe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: _describe(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"type": type(value).__qualname__, **fields}
    return type(value).__module__ + "." + type(value).__qualname__


class Journal:
    """The evaluations of one sweep, on disk (`path`) and in memory.

    Args:
        path (`str` or `None`): the journal's file; `None` keeps it in memory only.
        fingerprint (`str`): the sweep's identity (`fingerprint`); a journal on disk with another is ignored.
        write (`bool`, *optional*, defaults to `True`): whether this process reads and writes the file (the main
            process); the others receive what it read.

    Example:

    ```python
    journal = Journal("run/exme-journal.jsonl", fingerprint(settings, evaluator.fingerprint()))
    key = journal.key("selection", (1.2, 0.0))
    found = journal.get(key)  # an `Evaluation`, or None: evaluate, then `journal.add(key, evaluation)`
    ```
    """

    def __init__(self, path: str | None, fingerprint: str, write: bool = True):
        self.path, self.fingerprint, self.write = path, fingerprint, write and path is not None
        self._done: dict[str, Evaluation] = sharding.broadcast(self._read() if self.write else {})
        self.reused = 0  # evaluations taken from the journal instead of run
        if self.write:
            self._start()

    @staticmethod
    def key(role: str, point: Any, items: Mapping[str, Any] | None = None) -> str:
        """The identity of one evaluation: `role` (`"selection"` or `"heldout"`), the model (a point of the span as
        the plane takes it, or a merge's `to_dict()`), and the items scored (`None`: all of them)."""
        items = None if items is None else {group: [int(i) for i in indices] for group, indices in items.items()}
        return json.dumps({"role": role, "point": _describe(point), "items": items}, sort_keys=True)

    def get(self, key: str) -> Evaluation | None:
        """The evaluation of `key` when the journal holds it (counted in `reused`)."""
        found = self._done.get(key)
        if found is not None:
            self.reused += 1
        return found

    def add(self, key: str, evaluation: Evaluation) -> None:
        """Record a finished evaluation, on disk before this returns (one line, flushed and synced)."""
        self._done[key] = evaluation
        if self.write:
            line = {"key": json.loads(key), **evaluation._asdict()}
            self._append(json.dumps(line, allow_nan=True) + "\n")

    def remove(self) -> None:
        """Delete the file: the sweep's result is published."""
        if self.write and os.path.exists(self.path):
            os.remove(self.path)

    def __len__(self) -> int:
        return len(self._done)

    # ---- the file ----------------------------------------------------------------------------------------------

    def _read(self) -> dict[str, Evaluation]:
        """The evaluations of a journal on disk with this sweep's fingerprint; none for a missing or other one."""
        if not os.path.exists(self.path):
            return {}
        with open(self.path) as f:
            lines = f.read().split("\n")
        header = _parse(lines[0])
        if not header or header.get("fingerprint") != self.fingerprint or header.get("version") != _VERSION:
            logger.warning(
                f"ExMe: {self.path} is the journal of another sweep (other settings, evaluator or checkpoints); "
                "it is ignored and replaced."
            )
            return {}
        done = {}
        for line in lines[1:]:
            record = _parse(line)
            if record is None:  # the last line, cut short by a kill
                continue
            key = json.dumps(record.pop("key"), sort_keys=True)
            done[key] = Evaluation(**record)
        if done:
            logger.info(f"ExMe: resuming the sweep from {self.path}: {len(done)} evaluations are done.")
        return done

    def _start(self) -> None:
        """Write the header and the evaluations read back, replacing the file atomically (a torn last line goes)."""
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        header = json.dumps({"version": _VERSION, "fingerprint": self.fingerprint}) + "\n"
        body = "".join(
            json.dumps({"key": json.loads(key), **e._asdict()}, allow_nan=True) + "\n" for key, e in self._done.items()
        )
        temporary = self.path + ".tmp"
        with open(temporary, "w") as f:
            f.write(header + body)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, self.path)

    def _append(self, line: str) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        try:
            os.write(fd, line.encode())
            os.fsync(fd)
        finally:
            os.close(fd)


def _parse(line: str) -> dict | None:
    try:
        value = json.loads(line)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
