import pytest
import torch
from torch.testing import assert_close

from exme_callback import combine, extrapolate, interpolate, span
from exme_callback.span import combine_tensor


def states(dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: {"w": torch.randn(4, 3, generator=g).to(dtype), "b": torch.randn(3, generator=g).to(dtype)}  # noqa: E731
    return make(), make(), make()


def reference(base, sft1, sft2, c1, c2):
    """The closed form in float64."""
    return {
        k: base[k].double() + c1 * (sft1[k].double() - base[k].double()) + c2 * (sft2[k].double() - base[k].double())
        for k in base
    }


@pytest.mark.parametrize("c1, c2", [(0.0, 0.0), (1.0, 0.0), (0.0, 1.0), (1.3, 0.0), (0.36, 0.72), (-0.5, 2.0)])
def test_combine_matches_closed_form(c1, c2):
    base, sft1, sft2 = states()
    result = combine(base, sft1, sft2, c1, c2)
    for name, expected in reference(base, sft1, sft2, c1, c2).items():
        assert result[name].dtype == torch.float32
        assert_close(result[name].double(), expected, rtol=1e-6, atol=1e-6)


def test_plane_corners_are_exact():
    base, sft1, sft2 = states(torch.bfloat16)
    for (c1, c2), expected in {(0.0, 0.0): base, (1.0, 0.0): sft1, (0.0, 1.0): sft2}.items():
        result = combine(base, sft1, sft2, c1, c2)
        for name in base:
            assert torch.equal(result[name], expected[name])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_is_rounded_once_from_float32(dtype):
    base, sft1, sft2 = states(dtype)
    c1, c2 = 0.3 * 1.2, 0.7 * 1.4
    result = combine(base, sft1, sft2, c1, c2)
    for name in base:
        b, t1, t2 = base[name].float(), sft1[name].float(), sft2[name].float()
        expected = (b + c1 * (t1 - b) + c2 * (t2 - b)).to(dtype)
        assert result[name].dtype == dtype
        assert torch.equal(result[name], expected)


def test_float64_is_computed_in_float64():
    base, sft1, sft2 = states(torch.float64)
    result = combine(base, sft1, sft2, 0.1, 1e-9)
    for name, expected in reference(base, sft1, sft2, 0.1, 1e-9).items():
        assert result[name].dtype == torch.float64
        assert_close(result[name], expected, rtol=0, atol=1e-15)


def test_out_is_written_in_place_in_its_own_dtype():
    base, sft1, sft2 = states()
    out = {k: torch.zeros_like(v, dtype=torch.bfloat16) for k, v in base.items()}
    storage = {k: v.data_ptr() for k, v in out.items()}
    result = combine(base, sft1, sft2, 0.5, 0.25, out=out)
    for name, expected in reference(base, sft1, sft2, 0.5, 0.25).items():
        assert result[name] is out[name] and out[name].data_ptr() == storage[name]
        assert torch.equal(out[name], expected.float().to(torch.bfloat16))


def test_inputs_are_not_modified():
    base, sft1, sft2 = states()
    copies = [{k: v.clone() for k, v in s.items()} for s in (base, sft1, sft2)]
    combine(base, sft1, sft2, 0.7, 0.6)
    for original, copy in zip((base, sft1, sft2), copies, strict=True):
        for name in original:
            assert torch.equal(original[name], copy[name])


def test_non_floating_tensors_are_copied_from_sft1():
    base = {"steps": torch.tensor([1, 2]), "mask": torch.tensor([True, False])}
    sft1 = {"steps": torch.tensor([5, 6]), "mask": torch.tensor([False, False])}
    sft2 = {"steps": torch.tensor([9, 9]), "mask": torch.tensor([True, True])}
    result = combine(base, sft1, sft2, 0.4, 0.9)
    assert torch.equal(result["steps"], sft1["steps"]) and torch.equal(result["mask"], sft1["mask"])
    out = {"steps": torch.zeros(2, dtype=torch.long), "mask": torch.zeros(2, dtype=torch.bool)}
    combine(base, sft1, sft2, 0.4, 0.9, out=out)
    assert torch.equal(out["steps"], sft1["steps"])


def test_missing_tensor_is_named():
    base, sft1, sft2 = states()
    del sft2["b"]
    with pytest.raises(KeyError, match="`b` is missing from `sft2`"):
        combine(base, sft1, sft2, 0.5, 0.5)
    with pytest.raises(KeyError, match="`w` is missing from `out`"):
        combine(base, sft1, sft1, 0.5, 0.5, out={})


def test_shape_mismatch_is_named():
    base, sft1, sft2 = states()
    sft1["w"] = torch.zeros(3, 4)
    with pytest.raises(ValueError, match=r"`w` has shape \(3, 4\) in `sft1` but \(4, 3\) in `base`"):
        combine(base, sft1, sft2, 0.5, 0.5)


def test_extrapolate_is_expo():
    base, sft, _ = states()
    result = extrapolate(base, sft, 0.3)
    for name in base:
        assert_close(result[name], sft[name] + 0.3 * (sft[name] - base[name]))


def test_interpolate_is_weighted_merge():
    _, model1, model2 = states()
    result = interpolate(model1, model2, 0.25)
    for name in model1:
        assert_close(result[name], 0.25 * model1[name] + 0.75 * model2[name])


def test_exme_is_merge_of_two_expo_models():
    base, sft1, sft2 = states()
    alpha1, alpha2, beta = 0.2, 0.4, 0.3
    expo1, expo2 = extrapolate(base, sft1, alpha1), extrapolate(base, sft2, alpha2)
    merged = interpolate(expo1, expo2, beta)
    direct = combine(base, sft1, sft2, beta * (1 + alpha1), (1 - beta) * (1 + alpha2))
    for name in base:
        assert_close(direct[name], merged[name])


def test_combine_tensor_computes_on_the_device_of_out():
    b, t = torch.zeros(3), torch.ones(3)
    out = torch.empty(3, dtype=torch.float16)
    assert combine_tensor(b, t, t, 1.5, 0.0, out=out) is out
    assert torch.equal(out, torch.full((3,), 1.5, dtype=torch.float16))


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64]


@settings(max_examples=200, deadline=None)
@given(
    shape=st.lists(st.integers(0, 5), max_size=3),
    dtype=st.sampled_from(DTYPES),
    out_dtype=st.sampled_from([None, *DTYPES]),
    c1=st.floats(-3, 3, allow_nan=False),
    c2=st.floats(-3, 3, allow_nan=False),
    seed=st.integers(0, 2**16),
)
def test_combine_property_against_float64(shape, dtype, out_dtype, c1, c2, seed):
    """For any shape, dtype and coefficients: within one rounding of the wide sum of the float64 closed form."""
    g = torch.Generator().manual_seed(seed)
    base, sft1, sft2 = ({"t": (torch.randn(shape, generator=g) * 4).to(dtype)} for _ in range(3))
    out = None if out_dtype is None else {"t": torch.empty(shape, dtype=out_dtype)}
    result = combine(base, sft1, sft2, c1, c2, out=out)["t"]
    target = dtype if out_dtype is None else out_dtype
    assert result.dtype == target and result.shape == torch.Size(shape)

    b, t1, t2 = base["t"].double(), sft1["t"].double(), sft2["t"].double()
    reference = b + c1 * (t1 - b) + c2 * (t2 - b)
    wide = torch.float64 if torch.float64 in (dtype, target) else torch.float32
    # One rounding to the target dtype, plus the wide dtype's error on the terms' magnitudes.
    magnitude = b.abs() + abs(c1) * (t1 - b).abs() + abs(c2) * (t2 - b).abs()
    bound = torch.finfo(target).eps * reference.abs() + 4 * torch.finfo(wide).eps * magnitude
    bound += torch.finfo(target).tiny
    assert torch.all((result.double() - reference).abs() <= bound)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_tensors_larger_than_a_slice_equal_the_whole_tensor_sum(dtype, monkeypatch):
    """The sum runs slice by slice (here 1000 elements); the result is the same float32 sum over the whole tensor at
    once, rounded once."""
    monkeypatch.setitem(span._CHUNK, "cpu", 1000)
    g = torch.Generator().manual_seed(0)
    base, sft1, sft2 = ({"w": torch.randn(37, 101, generator=g).to(dtype)} for _ in range(3))
    c1, c2 = 0.3 * 1.2, 0.7 * 1.4
    b, t1, t2 = base["w"].float(), sft1["w"].float(), sft2["w"].float()
    expected = b.clone().add_(t1 - b, alpha=c1).add_(t2 - b, alpha=c2).to(dtype)
    out = {"w": torch.empty(37, 101, dtype=dtype)}
    for result in (combine(base, sft1, sft2, c1, c2)["w"], combine(base, sft1, sft2, c1, c2, out=out)["w"]):
        assert torch.equal(result, expected)


@pytest.mark.parametrize("alias", ["base", "sft1"])
def test_out_may_be_an_input(alias):
    base, sft1, sft2 = states()
    expected = reference(base, sft1, sft2, 0.6, 0.55)
    inputs = {"base": base, "sft1": sft1}
    result = combine(base, sft1, sft2, 0.6, 0.55, out=inputs[alias])
    for name in base:
        assert result[name] is inputs[alias][name]
        assert_close(result[name].double(), expected[name], rtol=1e-6, atol=1e-6)


def test_non_contiguous_out_is_written():
    base, sft1, sft2 = ({"w": t["w"].T.contiguous()} for t in states())
    out = {"w": torch.empty(4, 3).T}
    assert not out["w"].is_contiguous()
    combine(base, sft1, sft2, 0.6, 0.55, out=out)
    assert_close(out["w"].double(), reference(base, sft1, sft2, 0.6, 0.55)["w"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_equals_the_float64_value_rounded_once_but_at_exact_ties(dtype):
    """Low-precision values times decimal coefficients often sum exactly to a tie of two neighbours, or to zero
    (0.6 * 85 * 2**-14 is 51 * 2**-14): there float32's coefficient (0.6000000238) decides. Everywhere else the
    result is the float64 value rounded once."""
    g = torch.Generator().manual_seed(0)
    base = (0.02 * torch.randn(1 << 20, generator=g)).to(dtype)
    sft1, sft2 = (base + (0.01 * torch.randn(1 << 20, generator=g)).to(dtype) for _ in range(2))
    c1, c2 = 0.6, 0.55
    result = combine({"w": base}, {"w": sft1}, {"w": sft2}, c1, c2)["w"]
    b, t1, t2 = base.double(), sft1.double(), sft2.double()
    exact = b + c1 * (t1 - b) + c2 * (t2 - b)
    expected = exact.to(dtype)
    differ = result != expected
    assert 0 < differ.float().mean() < 0.01
    # Where they differ, the float64 value lies on the boundary between the two, to float32's error on the terms.
    magnitude = (b.abs() + c1 * (t1 - b).abs() + c2 * (t2 - b).abs())[differ]
    boundary = (result[differ].double() + expected[differ].double()) / 2
    assert torch.all((exact[differ] - boundary).abs() <= 4 * torch.finfo(torch.float32).eps * magnitude)
