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


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_save_state_then_load_state_round_trips_info_and_tensors(tmp_path, storage):
    from exme_callback.snapshots import load_state, save_state

    base, step = tensors(), {"w": torch.randn(5, 3, dtype=torch.bfloat16), "b": torch.zeros(3, dtype=torch.float64)}
    store = SnapshotStore(storage, tmp_path / "store")
    store.save("base", base)
    store.save("step-8", step)
    info = {"metric": "eval_loss", "kept": [{"step": 8, "score": 0.5, "metrics": {}}], "base": None, "base_model": "m"}
    checkpoint = tmp_path / "checkpoint-8"
    checkpoint.mkdir()
    save_state(store, str(checkpoint), info, ["base", "step-8"])

    fresh = SnapshotStore(storage, tmp_path / "fresh")
    assert load_state(fresh, str(checkpoint)) == info
    assert sorted(fresh.keys()) == ["base", "step-8"]
    for key, expected in (("base", base), ("step-8", step)):
        loaded = fresh.load(key)
        assert sorted(loaded) == sorted(expected)  # by name: safetensors files list their tensors sorted
        for name, value in expected.items():
            assert loaded[name].dtype == value.dtype and torch.equal(loaded[name], value), (key, name)


def test_state_file_is_written_last(tmp_path, monkeypatch):
    from exme_callback.snapshots import STATE_DIR, STATE_FILE, load_state, save_state

    store = SnapshotStore("cpu", tmp_path / "store")
    store.save("base", tensors())
    checkpoint = tmp_path / "checkpoint-8"
    checkpoint.mkdir()
    state_file = checkpoint / STATE_DIR / STATE_FILE
    export = SnapshotStore.export
    exported = []

    def checked_export(self, key, directory):
        assert not state_file.exists()  # the state file must not name a snapshot not yet written
        exported.append(key)
        export(self, key, directory)

    monkeypatch.setattr(SnapshotStore, "export", checked_export)
    save_state(store, str(checkpoint), {"metric": "eval_loss"}, ["base"])
    assert exported == ["base"] and state_file.is_file()

    # A crash after the snapshots but before the state file: the folder has no state.
    crashed = tmp_path / "checkpoint-16"
    export(store, "base", crashed / STATE_DIR)
    assert any(name.startswith("base-") for name in os.listdir(crashed / STATE_DIR))
    with pytest.raises(FileNotFoundError, match="has no ExMe state"):
        load_state(SnapshotStore("cpu"), str(crashed))


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_find_names_the_snapshot_equal_to_the_tensors(tmp_path, storage):
    store = SnapshotStore(storage, tmp_path / "snapshots")
    first, second = tensors(), tensors()
    store.save("first", first)
    store.save("second", second)
    assert store.find(second, ["first", "second"]) == "second"
    assert store.find(first, ["second"]) is None
    changed = {**second, "b": second["b"].clone()}
    changed["b"][0] += 1e-12  # one element differs
    assert store.find(changed, ["first", "second"]) is None
    assert store.find({"w": second["w"]}, ["second"]) is None  # other names


def test_span_and_gram_read_disk_snapshots_slice_by_slice(tmp_path, monkeypatch):
    """Passes over snapshots on disk (a span point, a copy, a comparison, the Gram) equal the passes in memory and
    never read more than one slice at once."""
    from exme_callback import kinship, snapshots, span
    from exme_callback.io import SafetensorsMapping
    from exme_callback.kinship import dense_gram
    from exme_callback.span import span_point

    monkeypatch.setitem(span._CHUNK, "cpu", 100)
    monkeypatch.setattr(kinship, "_CHUNK", 64)
    monkeypatch.setattr(snapshots, "_SLICE", 100)
    g = torch.Generator().manual_seed(0)
    states = [{"w": torch.randn(30, 20, generator=g).bfloat16(), "steps": torch.arange(3) + i} for i in range(3)]
    memory, disk = SnapshotStore("cpu"), SnapshotStore("disk", tmp_path / "snapshots")
    for i, state in enumerate(states):
        memory.save(str(i), state)
        disk.save(str(i), state)
    reads = []
    read = SafetensorsMapping.read

    def recorded(self, name, start=0, stop=None):
        tensor = read(self, name, start, stop)
        reads.append((name, tensor.numel()))
        return tensor

    monkeypatch.setattr(SafetensorsMapping, "read", recorded)
    on_disk = span_point(disk.load("0"), [disk.load("1"), disk.load("2")], (0.6, 0.55))
    in_memory = span_point(memory.load("0"), [memory.load("1"), memory.load("2")], (0.6, 0.55))
    for name in in_memory:
        assert torch.equal(on_disk[name], in_memory[name])
    assert torch.equal(on_disk["steps"], states[1]["steps"])
    copied = span_point(disk.load("0"), [disk.load("1"), disk.load("2")], (1.0, 0.0))  # a checkpoint itself
    assert torch.equal(copied["w"], states[1]["w"])
    assert disk.find(states[2], ["0", "1", "2"]) == "2"
    gram_disk = dense_gram(disk.load("0"), [disk.load("1"), disk.load("2")])
    gram_memory = dense_gram(memory.load("0"), [memory.load("1"), memory.load("2")])
    torch.testing.assert_close(gram_disk.inner, gram_memory.inner, rtol=0, atol=0)
    assert max(n for name, n in reads if name == "w") == 100 and len(reads) > 3 * 600 // 100
