import os

import pytest
import torch
from torch import nn

from exme_callback.snapshots import SnapshotStore, trainable_tensors


def tensors():
    return {
        "w": torch.randn(5, 3, dtype=torch.bfloat16),
        "b": torch.randn(3, dtype=torch.float64),
        "steps": torch.arange(4),
    }


def test_trainable_tensors_are_live_and_skip_frozen_and_tied():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 10))
    model[1].weight = model[0].weight  # tied
    model[1].bias.requires_grad_(False)
    live = trainable_tensors(model)
    assert list(live) == ["0.weight"]
    live["0.weight"].zero_()
    assert torch.count_nonzero(model[1].weight) == 0


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_save_load_round_trip_is_exact(tmp_path, storage):
    store = SnapshotStore(storage, tmp_path / "snapshots")
    original = tensors()
    store.save("base", original)
    for t in original.values():
        t.zero_() if t.is_floating_point() else t.fill_(7)  # a copy was kept, not a reference
    loaded = store.load("base")
    assert list(loaded) == ["w", "b", "steps"]
    fresh = tensors()
    assert all(loaded[k].dtype == fresh[k].dtype for k in fresh)
    assert torch.equal(loaded["steps"], torch.arange(4))
    assert "base" in store and store.keys() == ["base"]


def test_disk_equals_cpu_and_nbytes(tmp_path):
    data = tensors()
    cpu, disk = SnapshotStore("cpu"), SnapshotStore("disk", tmp_path / "s")
    cpu.save("k", data)
    disk.save("k", data)
    for name in data:
        assert torch.equal(cpu.load("k")[name], disk.load("k")[name])
    assert cpu.nbytes() == sum(t.numel() * t.element_size() for t in data.values())
    assert disk.nbytes() >= cpu.nbytes()


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_import_takes_exported_files_and_exports_them_without_rewriting(tmp_path, storage):
    data = tensors()
    first = SnapshotStore(storage, tmp_path / "first")
    first.save("base", data)
    first.export("base", tmp_path / "checkpoint-1")
    (exported,) = os.listdir(tmp_path / "checkpoint-1")

    resumed = SnapshotStore(storage, tmp_path / "resumed")
    resumed.import_("base", tmp_path / "checkpoint-1")
    for name, value in data.items():
        assert torch.equal(resumed.load("base")[name], value)
    resumed.export("base", tmp_path / "checkpoint-2")
    assert os.path.samefile(tmp_path / "checkpoint-2" / exported, tmp_path / "checkpoint-1" / exported)  # linked
    resumed.delete("base")
    assert os.listdir(tmp_path / "resumed") == [] and os.path.exists(tmp_path / "checkpoint-2" / exported)


def test_disk_snapshots_are_sharded_and_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr("exme_callback.snapshots._SHARD_BYTES", 16)
    store = SnapshotStore("disk", tmp_path / "s")
    store.save("k", {"a": torch.zeros(8), "b": torch.ones(8), "c": torch.full((2,), 2.0)})
    assert len(os.listdir(tmp_path / "s")) == 3
    assert torch.equal(store.load("k")["c"], torch.full((2,), 2.0))
    store.save("k", {"a": torch.ones(1)})  # replacing a key removes its old files
    assert len(os.listdir(tmp_path / "s")) == 1
    store.clear()
    assert not os.path.exists(tmp_path / "s")


def test_errors():
    with pytest.raises(ValueError, match="`storage` must be one of"):
        SnapshotStore("gpu")
    with pytest.raises(ValueError, match="needs a `directory`"):
        SnapshotStore("disk")
    with pytest.raises(KeyError, match="No snapshot named 'x'"):
        SnapshotStore().load("x")
