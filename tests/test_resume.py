"""The callback's resume state: which checkpoint folder a resumed run reads, and what it refuses."""

from types import SimpleNamespace

import pytest
import torch

from exme_callback.resume import checkpoint_folder, load_resume_state
from exme_callback.snapshots import SnapshotStore, save_state


def run_args(output_dir, resume_from_checkpoint=None):
    """The two training arguments the resume state reads."""
    return SimpleNamespace(output_dir=str(output_dir), resume_from_checkpoint=resume_from_checkpoint)


def tensors():
    return {
        "w": torch.randn(5, 3, dtype=torch.bfloat16),
        "b": torch.randn(3, dtype=torch.float64),
        "steps": torch.arange(4),
    }


def test_load_resume_state_refuses_a_different_metric(tmp_path):
    store = SnapshotStore("cpu", tmp_path / "store")
    store.save("base", tensors())
    (tmp_path / "run" / "checkpoint-8").mkdir(parents=True)
    save_state(
        store, str(tmp_path / "run" / "checkpoint-8"), {"metric": "eval_loss", "kept": [], "base": None}, ["base"]
    )
    info = load_resume_state(SnapshotStore("cpu"), run_args(tmp_path / "run"), 8, "eval_loss").info
    assert info == {"metric": "eval_loss", "kept": [], "base": None}
    with pytest.raises(ValueError, match="ranks checkpoints by 'eval_loss', but this run uses 'eval_accuracy'"):
        load_resume_state(SnapshotStore("cpu"), run_args(tmp_path / "run"), 8, "eval_accuracy")
    with pytest.raises(FileNotFoundError, match="checkpoint-16 has no ExMe state"):
        load_resume_state(SnapshotStore("cpu"), run_args(tmp_path / "run"), 16, "eval_loss")


def test_a_checkpoint_given_to_resume_from_is_read_first(tmp_path):
    store = SnapshotStore("cpu", tmp_path / "store")
    store.save("base", tensors())
    elsewhere = tmp_path / "moved" / "checkpoint-8"
    elsewhere.mkdir(parents=True)
    save_state(store, str(elsewhere), {"metric": "eval_loss", "kept": [], "base": None, "where": "moved"}, ["base"])
    assert checkpoint_folder(str(tmp_path / "run"), 8) == str(tmp_path / "run" / "checkpoint-8")
    info = load_resume_state(SnapshotStore("cpu"), run_args(tmp_path / "run", str(elsewhere)), 8, "eval_loss").info
    assert info["where"] == "moved"
