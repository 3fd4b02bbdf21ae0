import os

import pytest
import torch

from exme_callback.io import SafetensorsMapping, publish_dir


def test_safetensors_mapping_reads_what_safetensors_wrote_without_mapping_the_file(tmp_path):
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(0)
    written = {
        "bf16": torch.randn(7, 5, generator=g).bfloat16(),
        "f16": torch.randn(3, generator=g).half(),
        "f64": torch.randn(2, 2, 2, generator=g).double(),
        "i64": torch.arange(5),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
    }
    path = str(tmp_path / "shard.safetensors")
    save_file(written, path)
    mapping = SafetensorsMapping(dict.fromkeys(written, path))
    read = {name: mapping[name] for name in written}
    with open("/proc/self/maps") as f:
        assert path not in f.read()
    reference = load_file(path)
    for name in written:
        assert read[name].dtype == reference[name].dtype and torch.equal(read[name], reference[name])
        assert mapping.shape(name) == tuple(reference[name].shape)
    with pytest.raises(KeyError, match="missing"):
        mapping["missing"]


def test_safetensors_mapping_reads_slices_and_membership_without_loading(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    weight = torch.arange(24, dtype=torch.float32).reshape(4, 6).bfloat16()
    path = str(tmp_path / "shard.safetensors")
    save_file({"w": weight, "v": torch.ones(2)}, path)
    mapping = SafetensorsMapping({"w": path, "v": path})
    assert torch.equal(mapping.read("w", 5, 11), weight.reshape(-1)[5:11])
    assert mapping.dtype("w") == torch.bfloat16 and mapping.shape("w") == (4, 6)
    monkeypatch.setattr(SafetensorsMapping, "read", lambda *args: pytest.fail("read a tensor"))
    assert "w" in mapping and "missing" not in mapping


def test_publish_dir_replaces_atomically(tmp_path):
    final = tmp_path / "exme"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with publish_dir(str(final)) as folder:
            (tmp_path / "exme.incomplete" / "new.txt").write_text("partial")
            raise RuntimeError("evaluator failed")
    assert os.listdir(final) == ["old.txt"] and not os.path.exists(folder)
    with publish_dir(str(final)) as folder:
        with open(os.path.join(folder, "new.txt"), "w") as f:
            f.write("new")
        assert (final / "old.txt").exists()  # the earlier result stays whole until the new one is complete
    assert os.listdir(final) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["exme"]


def test_publish_dir_on_other_processes_touches_nothing(tmp_path):
    with publish_dir(str(tmp_path / "exme"), write=False):
        pass
    assert os.listdir(tmp_path) == []


def test_safetensors_mapping_refuses_a_range_outside_the_tensor(tmp_path):
    """Two tensors in one file lie back to back: a read past the end of the first would return the second's bytes."""
    from safetensors.torch import save_file

    path = str(tmp_path / "shard.safetensors")
    save_file({"a": torch.zeros(4), "b": torch.full((4,), 7.0)}, path)
    mapping = SafetensorsMapping({"a": path, "b": path})
    assert torch.equal(mapping.read("a", 0, 4), torch.zeros(4)) and mapping.read("a", 4, 4).numel() == 0
    for start, stop in [(2, 6), (0, 5), (-1, 2), (3, 2), (5, 5)]:
        with pytest.raises(ValueError, match=rf"\[{start}, {stop}\) of tensor `a`, which has 4 elements"):
            mapping.read("a", start, stop)
    with pytest.raises(ValueError, match=r"\[5, 4\) of tensor `b`"):
        mapping.read("b", 5)
