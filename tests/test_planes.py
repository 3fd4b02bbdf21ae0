"""The planes: the span and the merges written into live tensors, the trained weights put back bit for bit."""

import pytest
import torch
from conftest import load, make_llama, perturbed
from torch.testing import assert_close

from exme_callback.merges import Merge, merge_task_vectors
from exme_callback.planes import DensePlane, Plane, make_plane
from exme_callback.snapshots import trainable_tensors


def states(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: {"w": torch.randn(6, 5, generator=g), "steps": torch.arange(3)}  # noqa: E731
    return make(), [make() for _ in range(k)]


# ---- make_plane on a plain model --------------------------------------------------------------------------------


def test_make_plane_on_a_plain_model_writes_the_span_of_three_checkpoints():
    model = make_llama()
    live = trainable_tensors(model)
    base = {n: t.clone() for n, t in live.items()}
    checkpoints = [perturbed(base, seed) for seed in (1, 2, 3)]
    trained = perturbed(base, 4)
    load(model, trained)

    plane = make_plane(model, base, checkpoints, trained)
    assert isinstance(plane, DensePlane)
    for coefficients in [(0.3, -0.5, 1.2), (0.0, 0.7, 0.0), (1.5, 0.0, 0.25)]:
        plane.apply(coefficients)
        for name, tensor in trainable_tensors(model).items():
            b = base[name].double()
            expected = b + sum(c * (ck[name].double() - b) for c, ck in zip(coefficients, checkpoints))
            assert_close(tensor, expected.float(), rtol=1e-6, atol=1e-6, msg=name)

    plane.close()
    for name, tensor in trainable_tensors(model).items():
        assert torch.equal(tensor, trained[name]), name


# ---- DensePlane ---------------------------------------------------------------------------------------------------


def test_dense_plane_applies_a_merge_of_the_checkpoints_it_names_then_the_span_again():
    base, checkpoints = states()
    trained = {n: t.clone() for n, t in checkpoints[0].items()}
    live = {n: t.clone() for n, t in trained.items()}
    plane = DensePlane(live, base, checkpoints, trained)
    assert isinstance(plane, Plane)
    merge = Merge("ties", checkpoints=(2, 0), weights=(1.0, 1.0), density=0.5)
    plane.apply(merge)
    deltas = [c["w"] - base["w"] for c in checkpoints]
    assert_close(live["w"], base["w"] + merge([deltas[0], deltas[1], deltas[2]]), rtol=1e-6, atol=1e-6)
    assert torch.equal(live["steps"], checkpoints[0]["steps"])  # non-floating: copied, never merged
    plane.apply((0.0, 1.0, 0.0))
    assert torch.equal(live["w"], checkpoints[1]["w"])
    plane.close()
    assert all(torch.equal(live[n], trained[n]) for n in trained)


def test_dense_plane_draws_the_same_dare_masks_every_time_and_leaves_the_global_generator_alone():
    base, checkpoints = states()
    live = {n: torch.zeros_like(t) for n, t in base.items()}
    plane = DensePlane(live, base, checkpoints, base)
    merge = Merge("dare", checkpoints=(0, 1, 2), weights=(1 / 3, 1 / 3, 1 / 3), density=0.5, seed=3)
    torch.manual_seed(11)
    plane.apply(merge)
    first, after = live["w"].clone(), torch.rand(4)
    plane.apply(Merge("dare", checkpoints=(0, 1, 2), weights=(1 / 3, 1 / 3, 1 / 3), density=0.5, seed=4))
    assert not torch.equal(live["w"], first)  # another seed, other masks
    torch.manual_seed(11)
    plane.apply(merge)
    assert torch.equal(live["w"], first) and torch.equal(torch.rand(4), after)
    reference = {n: torch.zeros_like(t) for n, t in base.items()}
    merge_task_vectors(base, checkpoints, merge, reference)
    assert torch.equal(reference["w"], first)


def test_dense_plane_without_save_model_cannot_save(tmp_path):
    base, checkpoints = states(k=2)
    plane = DensePlane({n: t.clone() for n, t in base.items()}, base, checkpoints, base)
    with pytest.raises(ValueError, match="built without `save_model`"):
        plane.save(str(tmp_path))
