"""Pure tensor arithmetic on the ExMe plane.

Every model that Extrapolation Merging looks at is a point of one plane spanned by two task vectors
``d1 = sft1 - base`` and ``d2 = sft2 - base``:

```
theta(c1, c2) = base + c1 * d1 + c2 * d2
```

| model                                  | c1                     | c2                           |
|----------------------------------------|------------------------|------------------------------|
| base                                   | 0                      | 0                            |
| SFT-1, SFT-2                           | 1, 0                   | 0, 1                         |
| EXPO-i with ``alpha``                  | 1 + alpha (i = 1)      | 1 + alpha (i = 2)            |
| ExMe of EXPO-1, EXPO-2 with ``beta``   | beta * (1 + alpha1)    | (1 - beta) * (1 + alpha2)    |
| weighted merge of SFT-1, SFT-2         | lambda                 | 1 - lambda                   |

This module only knows tensors: no `transformers`, no models. State dicts are any `Mapping[str, torch.Tensor]`
(a lazy on-disk mapping works as well as a `dict`), matched by name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, MutableMapping

import torch

__all__ = ["DensePlane", "combine", "combine_tensor", "extrapolate", "interpolate", "merge_task_vectors"]

StateDict = Mapping[str, torch.Tensor]


def combine_tensor(
    base: torch.Tensor,
    sft1: torch.Tensor,
    sft2: torch.Tensor,
    c1: float,
    c2: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`base + c1 * (sft1 - base) + c2 * (sft2 - base)` for one floating-point tensor.

    The sum is computed on the device of `out` (of `base` when `out` is `None`) in float32, or float64 for float64
    inputs, and rounded once to the dtype of `out` (of `base`). A coefficient of exactly zero skips its term, so
    `combine_tensor(b, t, t, 1.0, 0.0)` reproduces `t` bit for bit.

    Args:
        base (`torch.Tensor`): the tensor of the base model.
        sft1 (`torch.Tensor`): the same tensor in the first fine-tuned model.
        sft2 (`torch.Tensor`): the same tensor in the second fine-tuned model.
        c1 (`float`): the coefficient of `sft1 - base`.
        c2 (`float`): the coefficient of `sft2 - base`.
        out (`torch.Tensor`, *optional*): written in place and returned when given.

    Returns:
        `torch.Tensor`: `out`, or a new tensor of `base`'s dtype and device.
    """
    target = base if out is None else out
    wide = torch.float64 if torch.float64 in (base.dtype, sft1.dtype, sft2.dtype, target.dtype) else torch.float32
    b = base.to(device=target.device, dtype=wide)  # may alias `base`: only read
    result = b.clone()
    for coefficient, tensor in ((c1, sft1), (c2, sft2)):
        if coefficient != 0.0:
            result.add_(tensor.to(device=target.device, dtype=wide).sub(b), alpha=coefficient)
    if out is None:
        return result.to(base.dtype)
    return out.copy_(result)


def combine(
    base: StateDict,
    sft1: StateDict,
    sft2: StateDict,
    c1: float,
    c2: float,
    out: MutableMapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """The point `(c1, c2)` of the ExMe plane, tensor by tensor.

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
    result: dict[str, torch.Tensor] = {}
    for name, b in base.items():
        t1, t2 = _lookup(sft1, "sft1", name), _lookup(sft2, "sft2", name)
        target = _lookup(out, "out", name) if out is not None else None
        for label, tensor in (("sft1", t1), ("sft2", t2), ("out", target)):
            if tensor is not None and tensor.shape != b.shape:
                raise ValueError(
                    f"Tensor `{name}` has shape {tuple(tensor.shape)} in `{label}` but {tuple(b.shape)} in `base`."
                )
        if not b.is_floating_point():
            result[name] = t1.clone() if target is None else target.copy_(t1)
        else:
            result[name] = combine_tensor(b, t1, t2, c1, c2, out=target)
    return result


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


def merge_task_vectors(
    base: StateDict,
    sft1: StateDict,
    sft2: StateDict,
    merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    out: MutableMapping[str, torch.Tensor],
) -> None:
    """`out[name] = base[name] + merge(d1, d2)` with `d_i = sft_i[name] - base[name]`, for merges off the plane.

    Used for TIES and DARE (for example `lambda d1, d2: peft.utils.merge_utils.ties([d1, d2], weights, density)`).
    Computed like `combine`: in float32 (float64 for float64 tensors) on `out`'s device, rounded once; non-floating
    tensors are copied from `sft1`.
    """
    for name, b in base.items():
        target = _lookup(out, "out", name)
        if not b.is_floating_point():
            target.copy_(sft1[name])
            continue
        wide = torch.float64 if b.dtype == torch.float64 else torch.float32
        b = b.to(device=target.device, dtype=wide)
        d1, d2 = (t[name].to(device=target.device, dtype=wide) - b for t in (sft1, sft2))
        target.copy_(b + merge(d1, d2))


def _lookup(tensors: StateDict | None, label: str, name: str) -> torch.Tensor:
    try:
        return tensors[name]
    except KeyError:
        raise KeyError(
            f"Tensor `{name}` is missing from `{label}`; the models must have the same tensor names."
        ) from None


class DensePlane:
    """The plane written into live tensors (a model's parameters): full fine-tuning's candidates.

    `apply(c1, c2)` sets every live tensor to `theta(c1, c2)`, one tensor at a time; `close()` copies `trained`
    back, bit for bit (`close(keep=True)` leaves the last candidate in place).

    Args:
        live (`MutableMapping[str, torch.Tensor]`): the tensors written in place.
        base, sft1, sft2 (`Mapping[str, torch.Tensor]`): the plane's three points.
        trained (`Mapping[str, torch.Tensor]`): what `close()` puts back.
    """

    def __init__(self, live, base: StateDict, sft1: StateDict, sft2: StateDict, trained: StateDict):
        self.live, self.base, self.sft1, self.sft2, self.trained = live, base, sft1, sft2, trained

    def apply(self, c1: float, c2: float) -> None:
        combine(self.base, self.sft1, self.sft2, c1, c2, out=self.live)

    def apply_merge(self, merge: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        """Set every live tensor to `base + merge(d1, d2)` (see `merge_task_vectors`)."""
        merge_task_vectors(self.base, self.sft1, self.sft2, merge, out=self.live)

    def close(self, keep: bool = False) -> None:
        if not keep:
            for name, tensor in self.trained.items():
                self.live[name].copy_(tensor)
