"""The callback's resume state: what `ExMeCallback.on_save` writes into each checkpoint folder
(`checkpoint-<step>/exme/`, with `snapshots.save_state`), and where a resumed `Trainer` run finds it, so the run ends
with the same result as an uninterrupted one. The one place that knows the Trainer's checkpoint naming."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict
from typing import NamedTuple

from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .candidates import Candidate, Checkpoint
from .errors import InputError, MissingFileError
from .snapshots import STATE_DIR, SnapshotStore, load_state, save_state

__all__ = ["ResumeState", "checkpoint_folder", "load_resume_state", "save_resume_state"]


class ResumeState(NamedTuple):
    """What a resumed run takes back: the kept checkpoints (best first), the base's row, and the whole `info`."""

    kept: list[Checkpoint]
    base: Candidate | None
    info: dict


def checkpoint_folder(output_dir: str, step: int) -> str:
    """`<output_dir>/checkpoint-<step>`, the Trainer's checkpoint folder."""
    return os.path.join(output_dir, f"{PREFIX_CHECKPOINT_DIR}-{step}")


def load_resume_state(store: SnapshotStore, args, step: int, metric: str, shards: int = 1) -> ResumeState:
    """`snapshots.load_state` of the checkpoint a `Trainer` run resumes from (`<output_dir>/checkpoint-<step>`, or
    the folder given to `resume_from_checkpoint`), which must have ranked its checkpoints by `metric`; the errors say
    how to fix a checkpoint saved without ExMe or with another metric."""
    places, resume = [checkpoint_folder(args.output_dir, step)], args.resume_from_checkpoint
    if isinstance(resume, str) and os.path.basename(os.path.normpath(resume)) == os.path.basename(places[0]):
        places.insert(0, resume)
    folder = next((p for p in places if os.path.isdir(os.path.join(p, STATE_DIR))), None)
    if folder is None:
        raise MissingFileError(
            f"Training resumes from step {step}, but {places[-1]} has no ExMe state ({STATE_DIR}/): the base model's "
            "weights are not there. Resume from a checkpoint saved with ExMeCallback, or start the run from the "
            "beginning."
        )
    info = load_state(store, folder, shards)
    if info["metric"] != metric:
        raise InputError(
            f"The checkpoint's ExMe state ranks checkpoints by {info['metric']!r}, but this run uses {metric!r}. "
            "Resume with the same `metrics` / `metric_for_best_model`."
        )
    kept = [Checkpoint(**c) for c in info["kept"]]
    return ResumeState(kept, None if info["base"] is None else Candidate.from_dict(info["base"]), info)


def save_resume_state(
    store: SnapshotStore,
    folder: str,
    metric: str,
    kept: Sequence[Checkpoint],
    base: Candidate | None,
    base_model: str | None,
    shards: int = 1,
) -> None:
    """Write into checkpoint `folder` what a run resumed from it needs: the ranking metric, the kept checkpoints'
    scores and snapshots, the base's row and snapshot, and the base model's id or folder (read by `exme run`)."""
    info = {
        "metric": metric,
        "kept": [asdict(c) for c in kept],
        "base": None if base is None else {**base.to_dict(), "items": base.items},
        "base_model": base_model,
    }
    save_state(store, folder, info, ["base", *(f"step-{c.step}" for c in kept)], shards)
