"""The merges off the span: one registry over `peft.utils.merge_utils`, validated, seeded, applied tensor by tensor."""

import json
import sys

import pytest
import torch

pytest.importorskip("peft")
from peft.utils import merge_utils  # noqa: E402

from exme_callback import merges  # noqa: E402
from exme_callback.merges import MERGES, Merge, merge_task_vectors, seeded  # noqa: E402


def task_vectors(k=3, n=200, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype) for _ in range(k)]


def test_unknown_method_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown merge method 'magic'; known: dare, ties"):
        Merge("magic", (0, 1), (0.5, 0.5), 0.5)
    assert sorted(MERGES) == ["dare", "ties"]


@pytest.mark.parametrize(
    "arguments, message",
    [
        (((), (), 0.5), "`checkpoints` must be the positions"),
        (((0, -1), (1.0, 1.0), 0.5), "`checkpoints` must be the positions"),
        (((0, 1), (1.0,), 0.5), r"`weights` must be one finite number per merged checkpoint \(2\)"),
        (((0, 1), (1.0, float("nan")), 0.5), "`weights` must be one finite number"),
        (((0, 1), (1.0, 1.0), 0.0), r"`density` must be in \(0, 1\], got 0.0"),
        (((0, 1), (1.0, 1.0), 1.5), r"`density` must be in \(0, 1\], got 1.5"),
    ],
)
def test_arguments_are_validated(arguments, message):
    with pytest.raises(ValueError, match=message):
        Merge("ties", *arguments)


def test_ties_equals_peft_on_the_task_vectors_it_names():
    d = task_vectors()
    merge = Merge("ties", checkpoints=(2, 0), weights=(1.0, 0.5), density=0.3)
    expected = merge_utils.ties([d[2], d[0]], torch.tensor([1.0, 0.5]), 0.3)
    assert torch.equal(merge(d), expected)
    with pytest.raises(ValueError, match=r"uses the task vectors \(2, 0\), but 2 were given"):
        merge(d[:2])


def test_dare_equals_peft_with_the_same_generator():
    d = task_vectors()
    merge = Merge("dare", checkpoints=(0, 1, 2), weights=(1 / 3, 1 / 3, 1 / 3), density=0.4, seed=5)
    torch.manual_seed(5)
    expected = merge_utils.dare_linear(d, torch.full((3,), 1 / 3), 0.4)
    with seeded(merge.seed):
        assert torch.equal(merge(d), expected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_dare_with_weights_lambda_is_m3_with_dare(dtype):
    """M^3 with DARE, `lambda * DARE(d_a) + (1 - lambda) * DARE(d_b)` (the formula the pipeline used), is "dare" with
    weights `(lambda, 1 - lambda)`: the same masks in the same order; the same bits in float32, and within float32's
    rounding of `lambda` in float64 (the weights are a float32 tensor, as peft's baselines use)."""
    d = task_vectors(k=2, n=10_000, dtype=dtype)
    lam = 0.37
    with seeded(9):
        pruned = [merge_utils.random_pruning(t, 0.5, rescale=True) for t in d]
    formula = sum(w * p for w, p in zip((lam, 1 - lam), pruned, strict=True))
    with seeded(9):
        merged = Merge("dare", (0, 1), (lam, 1 - lam), 0.5, seed=9)(d)
    if dtype == torch.float32:
        assert torch.equal(merged, formula)
    else:  # each weight rounded once to float32: half its epsilon, relative to each term
        terms = sum(w * p.abs() for w, p in zip((lam, 1 - lam), pruned, strict=True))
        assert torch.all((merged - formula).abs() <= torch.finfo(torch.float32).eps / 2 * terms)
        assert not torch.equal(merged, formula)


def test_seeded_draws_the_same_masks_and_restores_the_generator():
    d = task_vectors(k=2)
    merge = Merge("dare", (0, 1), (0.5, 0.5), 0.5, seed=1)
    torch.manual_seed(0)
    with seeded(merge.seed):
        first = merge(d)
    after = torch.rand(3)
    torch.manual_seed(0)
    with seeded(merge.seed):
        again = merge(d)
    assert torch.equal(first, again) and torch.equal(torch.rand(3), after)
    with seeded(2):
        assert not torch.equal(merge(d), first)


def test_merge_task_vectors_is_the_base_plus_the_merge_seeded():
    g = torch.Generator().manual_seed(1)
    base = {"w": torch.randn(4, 5, generator=g).bfloat16(), "steps": torch.arange(2)}
    checkpoints = [{"w": torch.randn(4, 5, generator=g).bfloat16(), "steps": torch.arange(2) + i} for i in (1, 2)]
    merge = Merge("dare", (0, 1), (0.3, 0.7), 0.5, seed=4)
    out = {n: torch.empty_like(t) for n, t in base.items()}
    merge_task_vectors(base, checkpoints, merge, out)
    with seeded(4):
        deltas = [c["w"].float() - base["w"].float() for c in checkpoints]
        expected = (base["w"].float() + merge(deltas)).bfloat16()
    assert torch.equal(out["w"], expected) and torch.equal(out["steps"], checkpoints[0]["steps"])
    with pytest.raises(KeyError, match="`w` is missing from `out`"):
        merge_task_vectors(base, checkpoints, merge, {})


def test_json_form_round_trips():
    merge = Merge("dare", [1, 0], [0.25, 0.75], 0.5, seed=7)
    assert merge.checkpoints == (1, 0) and merge.weights == (0.25, 0.75)
    data = json.loads(json.dumps(merge.to_dict()))
    assert data == {"method": "dare", "checkpoints": [1, 0], "weights": [0.25, 0.75], "density": 0.5, "seed": 7}
    assert Merge.from_dict(data) == merge
    with pytest.raises(ValueError, match="Unknown merge method 'tie'"):
        Merge.from_dict({**data, "method": "tie"})


def test_registry_entries_are_looked_up_when_a_merge_runs(monkeypatch):
    merge = Merge("ties", (0, 1), (1.0, 1.0), 0.5)
    monkeypatch.setitem(MERGES, "ties", lambda tvs, weights, density: sum(tvs) * density)
    assert torch.equal(merge([torch.ones(2), torch.ones(2)]), torch.ones(2))


def test_without_peft_the_error_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft.utils", None)
    with pytest.raises(ImportError, match=r"pip install 'exme-callback\[peft\]'"):
        merges.ties(task_vectors(k=2), (1.0, 1.0), 0.5)
