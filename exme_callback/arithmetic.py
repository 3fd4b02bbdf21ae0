"""Merges off the span of the kept checkpoints, and the `Plane` interface that the dense plane here and the LoRA
plane (`lora.py`) implement: the live model made to compute a candidate. The span itself is `span.py`.
"""

from __future__ import annotations

from collections.abc import Callable, MutableMapping, Sequence
from typing import Protocol, runtime_checkable

import torch

from .kinship import Gram, dense_gram
from .span import StateDict, lookup, span_point

__all__ = ["DensePlane", "Plane", "TaskVectorMerge", "merge_task_vectors"]

TaskVectorMerge = Callable[[list[torch.Tensor]], torch.Tensor]
"""A merge off the span: the task vectors `[d_1, ..., d_k]` of one tensor (float32) -> the merged task vector."""


def merge_task_vectors(
    base: StateDict,
    checkpoints: Sequence[StateDict],
    merge: TaskVectorMerge,
    out: MutableMapping[str, torch.Tensor],
) -> None:
    """`out[name] = base[name] + merge([d_1, ..., d_k])` with `d_i = checkpoints[i][name] - base[name]`, for merges
    off the span.

    Used for TIES and DARE (for example `lambda ds: peft.utils.merge_utils.ties(ds, weights, density)`). Computed
    like `span_point`: in float32 (float64 for float64 tensors) on `out`'s device, rounded once; non-floating
    tensors are copied from the first checkpoint.
    """
    for name, b in base.items():
        target = lookup(out, "out", name)
        if not b.is_floating_point():
            target.copy_(checkpoints[0][name])
            continue
        wide = torch.float64 if b.dtype == torch.float64 else torch.float32
        b = b.to(device=target.device, dtype=wide)
        deltas = [c[name].to(device=target.device, dtype=wide) - b for c in checkpoints]
        target.copy_(b + merge(deltas))


Point = Sequence[float] | TaskVectorMerge
"""What a plane applies: a coefficient vector `(c_1, ..., c_k)`, or a merge of the task vectors off the span."""


@runtime_checkable
class Plane(Protocol):
    """The live model made to compute candidates: what the sweep needs from full fine-tuning (`DensePlane`) and
    from LoRA and DoRA runs (`lora.LoraPlane`) alike.

    - `apply(point)`: make the live model compute `base + sum_i c_i * d_i` for a coefficient vector, or
      `base + merge([d_1, ..., d_k])` for a `TaskVectorMerge` (TIES, DARE);
    - `save(folder, merged=False)`: save the model it computes now; returns what was written, by kind
      (`{"model": folder}`, or `{"adapter": folder, "merged": ...}`); `merged=True` asks for a plain model
      (a LoRA candidate fused into the base weights);
    - `close(keep=False)`: put the trained weights back, bit for bit (`keep=True` leaves the last candidate);
    - `gram()`: the Gram matrix of the checkpoints' task vectors, for their kinship (`kinship.Gram`).
    """

    def apply(self, point: Point) -> None: ...

    def save(self, folder: str, merged: bool = False) -> dict[str, str]: ...

    def close(self, keep: bool = False) -> None: ...

    def gram(self) -> Gram: ...


class DensePlane:
    """The span written into live tensors (a model's parameters): full fine-tuning's candidates.

    `apply(c)` sets every live tensor to `theta(c)`, one tensor at a time; `save(folder)` calls `save_model`;
    `close()` copies `trained` back, bit for bit (`close(keep=True)` leaves the last candidate in place). The live
    tensors may be a sharded model's local shards: the formula is elementwise.

    Args:
        live (`MutableMapping[str, torch.Tensor]`): the tensors written in place.
        base (`Mapping[str, torch.Tensor]`): the base model's tensors.
        checkpoints (`Sequence[Mapping[str, torch.Tensor]]`): the kept checkpoints' tensors, best first.
        trained (`Mapping[str, torch.Tensor]`): what `close()` puts back.
        save_model (`Callable[[str], None]`, *optional*): saves the live model into a folder (for example
            `model.save_pretrained`, or `trainer.save_model`).
        written (`Callable[[], None]`, *optional*): called after the live tensors are written (a sharded model drops
            its gathered copies of the parameters: `sharding.reshard`).
    """

    def __init__(
        self,
        live: MutableMapping[str, torch.Tensor],
        base: StateDict,
        checkpoints: Sequence[StateDict],
        trained: StateDict,
        save_model: Callable[[str], None] | None = None,
        written: Callable[[], None] | None = None,
    ):
        self.live, self.base, self.checkpoints, self.trained = live, base, list(checkpoints), trained
        self.save_model, self.written = save_model, written or (lambda: None)

    def apply(self, point: Point) -> None:
        if callable(point):
            merge_task_vectors(self.base, self.checkpoints, point, out=self.live)
        else:
            span_point(self.base, self.checkpoints, point, out=self.live)
        self.written()

    def save(self, folder: str, merged: bool = False) -> dict[str, str]:
        """Save the live model with `save_model` (it is a plain model already: `merged` changes nothing)."""
        if self.save_model is None:
            raise ValueError("This `DensePlane` was built without `save_model`: it cannot save the model.")
        self.save_model(folder)
        return {"model": folder}

    def close(self, keep: bool = False) -> None:
        if not keep:  # the trained weights themselves: copied exactly, slice by slice
            span_point(self.trained, [self.trained], (1.0,), out=self.live)
            self.written()

    def gram(self) -> Gram:
        """The Gram matrix of the task vectors, in one pass over the kept tensors."""
        return dense_gram(self.base, self.checkpoints)
