"""Pure tensor arithmetic on the span of the kept checkpoints.

Every model that Extrapolation Merging (and the other methods of the project) looks at is a point of the span of
the task vectors `d_i = theta_i - base` of the kept checkpoints:

```
theta(c) = base + c_1 * d_1 + ... + c_k * d_k
```

| model (k = 2)                          | c1                     | c2                           |
|----------------------------------------|------------------------|------------------------------|
| base                                   | 0                      | 0                            |
| SFT-1, SFT-2                           | 1, 0                   | 0, 1                         |
| EXPO-i with ``alpha``                  | 1 + alpha (i = 1)      | 1 + alpha (i = 2)            |
| ExMe of EXPO-1, EXPO-2 with ``beta``   | beta * (1 + alpha1)    | (1 - beta) * (1 + alpha2)    |
| weighted merge of SFT-1, SFT-2         | lambda                 | 1 - lambda                   |

This module only knows tensors: no `transformers`, no models. State dicts are any `Mapping[str, torch.Tensor]`
(a lazy on-disk mapping, `io.SafetensorsMapping`, works as well as a `dict`), matched by name, and read slice by
slice (`io.flat`). Merges off the span (TIES, DARE) are in `merges.py`; the live model made to compute a point is a
plane (`planes.py`).
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping, Sequence

import torch

from .errors import InputError, MissingNameError
from .io import Flat, flat

__all__ = [
    "StateDict",
    "combine",
    "combine_tensor",
    "extrapolate",
    "interpolate",
    "lookup",
    "span_point",
    "span_tensor",
]

StateDict = Mapping[str, torch.Tensor]


def span_tensor(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`base + sum_i coefficients[i] * (tensors[i] - base)` for one floating-point tensor.

    The sum is computed on the device of `out` (of `base` when `out` is `None`) in float32, or float64 when an input
    is float64, and rounded once to the dtype of `out` (of `base`). A coefficient of exactly zero skips its term,
    and a checkpoint itself (one coefficient 1, the others 0) is copied, so it is reproduced bit for bit.

    The wide sum runs over slices of the tensor through three slice-sized buffers that stay in the CPU's cache, so
    a low-precision tensor costs no full-size float32 temporaries; the result is the same, bit for bit, as the sum
    over the whole tensor at once.

    Args:
        base (`torch.Tensor`): the tensor of the base model.
        tensors (`Sequence[torch.Tensor]`): the same tensor in each kept checkpoint.
        coefficients (`Sequence[float]`): one coefficient per checkpoint.
        out (`torch.Tensor`, *optional*): written in place and returned when given.

    Returns:
        `torch.Tensor`: `out`, or a new tensor of `base`'s dtype and device.
    """
    if out is None:
        out = torch.empty_like(base, memory_format=torch.contiguous_format)
    return _span_into(out, Flat.of(base), [Flat.of(t) for t in tensors], coefficients, {})


_CHUNK = {"cpu": 1 << 19, None: 1 << 24}  # elements per slice: in cache on a CPU, few kernel launches elsewhere


def _span_into(
    out: torch.Tensor,
    base: Flat,
    tensors: Sequence[Flat],
    coefficients: Sequence[float],
    workspaces: dict,
) -> torch.Tensor:
    """`span_tensor` into `out`, reading the inputs slice by slice (from memory or from files: `io.Flat`), with
    slice-sized buffers from `workspaces` (one per wide dtype and device, reused across the tensors of a model)."""
    terms = [(c, t) for c, t in zip(coefficients, tensors, strict=True) if c != 0.0]
    numel = out.numel()
    if not out.is_contiguous():
        return out.copy_(_span_into(out.contiguous(), base, tensors, coefficients, workspaces))
    flat_out, device = out.view(-1), out.device
    size = max(1, min(numel, _CHUNK.get(device.type, _CHUNK[None])))
    if not terms or (len(terms) == 1 and terms[0][0] == 1.0):  # the base or a checkpoint itself: a copy
        source = terms[0][1] if terms else base
        for start in range(0, numel, size):
            flat_out[start : start + size].copy_(source.read(start, min(start + size, numel)))
        return out
    wide = torch.float64 if torch.float64 in {base.dtype, out.dtype, *(t.dtype for t in tensors)} else torch.float32
    aliased = out.untyped_storage().data_ptr() in {base.storage, *(t.storage for _, t in terms)}
    direct = out.dtype == wide and not aliased  # the sum goes straight into `out`: no final conversion
    workspace = workspaces.get((wide, device))
    if workspace is None or workspace.shape[1] < size:
        workspace = workspaces[wide, device] = torch.empty(3, size, dtype=wide, device=device)
    for start in range(0, numel, size):
        stop = min(start + size, numel)
        b, difference, total = (row[: stop - start] for row in workspace)
        piece = base.read(start, stop)
        if piece.dtype == wide and piece.device == device:
            b = piece
        else:
            b.copy_(piece, non_blocking=True)
        if direct:
            total = flat_out[start:stop]
        for index, (coefficient, tensor) in enumerate(terms):
            torch.sub(tensor.read(start, stop).to(device, non_blocking=True), b, out=difference)
            if index == 0:
                torch.add(b, difference, alpha=coefficient, out=total)
            else:
                total.add_(difference, alpha=coefficient)
        if not direct:
            flat_out[start:stop].copy_(total)
    return out


def combine_tensor(
    base: torch.Tensor,
    sft1: torch.Tensor,
    sft2: torch.Tensor,
    c1: float,
    c2: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`base + c1 * (sft1 - base) + c2 * (sft2 - base)` for one floating-point tensor: `span_tensor` with two
    checkpoints (same precision rules)."""
    return span_tensor(base, (sft1, sft2), (c1, c2), out=out)


def span_point(
    base: StateDict,
    checkpoints: Sequence[StateDict],
    coefficients: Sequence[float],
    out: MutableMapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The point `coefficients` of the span of the checkpoints' task vectors, tensor by tensor.

    ```
    theta[name] = base[name] + sum_i coefficients[i] * (checkpoints[i][name] - base[name])
    ```

    Floating-point tensors are computed in float32 (float64 when an input is float64) and rounded once to their
    own dtype. Non-floating tensors (integer or boolean buffers) are copied from the first checkpoint, never
    blended. Inputs are read slice by slice (`io.flat`): snapshots on disk are never loaded whole.

    Args:
        base (`Mapping[str, torch.Tensor]`): the base model's tensors; its names are the names combined.
        checkpoints (`Sequence[Mapping[str, torch.Tensor]]`): the kept checkpoints' tensors.
        coefficients (`Sequence[float]`): one coefficient per checkpoint.
        out (`MutableMapping[str, torch.Tensor]`, *optional*): tensors written in place (for example a live model's
            parameters); each keeps its own dtype and device. When `None`, new tensors are returned.

    Returns:
        `dict[str, torch.Tensor]`: the combined tensors (the tensors of `out` when it is given).

    Raises:
        `KeyError`: a name of `base` is missing from a checkpoint or from `out`.
        `ValueError`: a tensor's shape differs between the inputs, or the coefficients do not match the checkpoints.
    """
    if len(coefficients) != len(checkpoints) or not checkpoints:
        raise InputError(
            f"`coefficients` must have one entry per checkpoint ({len(checkpoints)}), got {tuple(coefficients)}"
        )
    labels = ["sft1", "sft2"] if len(checkpoints) == 2 else [f"checkpoints[{i}]" for i in range(len(checkpoints))]
    result: dict[str, torch.Tensor] = {}
    workspaces: dict = {}  # slice-sized buffers shared by the tensors
    for name in base:
        b = flat(base, name)
        tensors = [_flat(c, label, name) for c, label in zip(checkpoints, labels, strict=True)]
        target = None if out is None else lookup(out, "out", name)
        for label, tensor in (*zip(labels, tensors, strict=True), ("out", target)):
            if tensor is not None and tensor.shape != b.shape:
                raise InputError(
                    f"Tensor `{name}` has shape {tuple(tensor.shape)} in `{label}` but {tuple(b.shape)} in `base`."
                )
        if target is None:
            target = torch.empty(b.shape, dtype=b.dtype, device=b.device)
        if not b.dtype.is_floating_point:
            result[name] = target.copy_(tensors[0].read(0, target.numel()).reshape(b.shape))
        else:
            result[name] = _span_into(target, b, tensors, coefficients, workspaces)
    return result


def combine(
    base: StateDict,
    sft1: StateDict,
    sft2: StateDict,
    c1: float,
    c2: float,
    out: MutableMapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The point `(c1, c2)` of the ExMe plane, tensor by tensor: `span_point(base, [sft1, sft2], [c1, c2])`.

    ```
    theta[name] = base[name] + c1 * (sft1[name] - base[name]) + c2 * (sft2[name] - base[name])
    ```

    Floating-point tensors are computed in float32 (float64 when an input is float64) and rounded once to their
    own dtype. Non-floating tensors (integer or boolean buffers) are copied from `sft1`, never blended.

    Args:
        base (`Mapping[str, torch.Tensor]`): the base model's tensors; its names are the names combined.
        sft1 (`Mapping[str, torch.Tensor]`): the first fine-tuned model's tensors.
        sft2 (`Mapping[str, torch.Tensor]`): the second fine-tuned model's tensors.
        c1 (`float`): the coefficient of the first task vector.
        c2 (`float`): the coefficient of the second task vector.
        out (`MutableMapping[str, torch.Tensor]`, *optional*): tensors written in place (for example a live model's
            parameters); each keeps its own dtype and device. When `None`, new tensors are returned.

    Returns:
        `dict[str, torch.Tensor]`: the combined tensors (the tensors of `out` when it is given).

    Raises:
        `KeyError`: a name of `base` is missing from `sft1`, `sft2` or `out`.
        `ValueError`: a tensor's shape differs between the inputs.

    Example:

    ```python
    >>> import torch
    >>> from exme_callback import combine
    >>> base, sft1, sft2 = {"w": torch.tensor([0.0])}, {"w": torch.tensor([1.0])}, {"w": torch.tensor([3.0])}
    >>> combine(base, sft1, sft2, 0.5 * 1.2, 0.5 * 1.2)["w"]  # ExMe with alpha1 = alpha2 = 0.2, beta = 0.5
    tensor([2.4000])
    ```
    """
    return span_point(base, (sft1, sft2), (c1, c2), out=out)


def extrapolate(base: StateDict, sft: StateDict, alpha: float, out=None) -> dict[str, torch.Tensor]:
    """EXPO: `sft + alpha * (sft - base)`, that is `combine(base, sft, sft, 1 + alpha, 0)`.

    Args:
        base (`Mapping[str, torch.Tensor]`): the model fine-tuning started from.
        sft (`Mapping[str, torch.Tensor]`): the fine-tuned model.
        alpha (`float`): how far to continue along the training direction; 0 returns `sft`.
        out (`MutableMapping[str, torch.Tensor]`, *optional*): tensors written in place.
    """
    return combine(base, sft, sft, 1.0 + alpha, 0.0, out=out)


def interpolate(model1: StateDict, model2: StateDict, weight: float, out=None) -> dict[str, torch.Tensor]:
    """Weighted merge `weight * model1 + (1 - weight) * model2`: `combine(model1, model1, model2, 0, 1 - weight)`.

    Args:
        model1 (`Mapping[str, torch.Tensor]`): the first model.
        model2 (`Mapping[str, torch.Tensor]`): the second model.
        weight (`float`): the weight of `model1`; 1 returns `model1`, 0 returns `model2`.
        out (`MutableMapping[str, torch.Tensor]`, *optional*): tensors written in place.
    """
    return combine(model1, model1, model2, 0.0, 1.0 - weight, out=out)


def lookup(tensors: StateDict, label: str, name: str) -> torch.Tensor:
    """`tensors[name]`, or a `KeyError` that names the tensor and the mapping it is missing from (`label`)."""
    if name not in tensors:
        raise _missing(label, name)
    return tensors[name]


def _flat(tensors: StateDict, label: str, name: str) -> Flat:
    """`tensors[name]`, read slice by slice (a snapshot on disk is not loaded: `io.flat`)."""
    if name not in tensors:
        raise _missing(label, name)
    return flat(tensors, name)


def _missing(label: str, name: str) -> MissingNameError:
    return MissingNameError(f"Tensor `{name}` is missing from `{label}`; the models must have the same tensor names.")
