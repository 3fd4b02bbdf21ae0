"""The live model made to compute a candidate: the `Plane` interface, the dense plane of full fine-tuning, and
`make_plane`, which picks the plane of a model.

A plane holds the base and the kept checkpoints' trainable tensors and writes a candidate into the live model's
parameters: a point of the span, `base + sum_i c_i * d_i` (`span.span_point`), or a merge off the span,
`base + merge([d_1, ..., d_k])` (`merges.Merge`). The LoRA plane (`lora.LoraPlane`) does the same for a PEFT model
through one rank-concatenated adapter.

Example:

```python
>>> plane = make_plane(model, base, [sft1, sft2], trained)
>>> plane.apply((0.6 * 1.2, 0.4 * 1.3))  # ExMe: alphas 0.2 / 0.3, beta 0.6
>>> plane.apply(Merge("ties", checkpoints=(0, 1), weights=(1.0, 1.0), density=0.5))
>>> plane.close()  # the trained weights, bit for bit
```
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping, Sequence
from functools import partial
from typing import Protocol, runtime_checkable

import torch

from . import sharding
from .errors import InputError
from .kinship import Gram, dense_gram
from .lora import LoraPlane, is_peft_model
from .merges import Merge, merge_task_vectors
from .snapshots import trainable_tensors
from .span import StateDict, span_point

__all__ = ["DensePlane", "Plane", "Point", "make_plane", "save_pretrained", "sources_of"]

Point = Sequence[float] | Merge
"""What a plane applies: a coefficient vector `(c_1, ..., c_k)`, or a `Merge` of the task vectors off the span."""


@runtime_checkable
class Plane(Protocol):
    """The live model made to compute candidates: what the sweep needs from full fine-tuning (`DensePlane`) and
    from LoRA and DoRA runs (`lora.LoraPlane`) alike.

    - `apply(point)`: make the live model compute `base + sum_i c_i * d_i` for a coefficient vector, or
      `base + merge([d_1, ..., d_k])` for a `Merge` (TIES, DARE), its random masks drawn inside `seeded(merge.seed)`;
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

    `apply(c)` sets every live tensor to `theta(c)`, one tensor at a time (a `Merge`: `merges.merge_task_vectors`);
    `save(folder)` calls `save_model`; `close()` copies `trained` back, bit for bit (`close(keep=True)` leaves the
    last candidate in place). The live tensors may be a sharded model's local shards: the formula is elementwise.

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
        if isinstance(point, Merge):
            merge_task_vectors(self.base, self.checkpoints, point, out=self.live)
        else:
            span_point(self.base, self.checkpoints, point, out=self.live)
        self.written()

    def save(self, folder: str, merged: bool = False) -> dict[str, str]:
        """Save the live model with `save_model` (it is a plain model already: `merged` changes nothing)."""
        if self.save_model is None:
            raise InputError("This `DensePlane` was built without `save_model`: it cannot save the model.")
        self.save_model(folder)
        return {"model": folder}

    def close(self, keep: bool = False) -> None:
        if not keep:  # the trained weights themselves: copied exactly, slice by slice
            span_point(self.trained, [self.trained], (1.0,), out=self.live)
            self.written()

    def gram(self) -> Gram:
        """The Gram matrix of the task vectors, in one pass over the kept tensors."""
        return dense_gram(self.base, self.checkpoints)


def make_plane(
    model: torch.nn.Module,
    base: StateDict,
    checkpoints: Sequence[StateDict],
    trained: StateDict,
    *,
    save_model: Callable[[str], None] | None = None,
    save_merged: bool = False,
    base_model: str | None = None,
) -> Plane:
    """The plane of `model`: a `LoraPlane` for a PEFT model (an exact adapter), else a `DensePlane` over its
    trainable parameters.

    Args:
        model (`torch.nn.Module`): the live model; its trainable tensors are the ones the kept tensors name.
        base (`Mapping[str, torch.Tensor]`): the trainable tensors at the start of training.
        checkpoints (`Sequence[Mapping[str, torch.Tensor]]`): the kept checkpoints' trainable tensors, best first.
        trained (`Mapping[str, torch.Tensor]`): what `close()` puts back.
        save_model (`Callable[[str], None]`, *optional*): how a full model is saved (defaults to
            `model.save_pretrained`; under FSDP2, of the gathered full state dict, written by the main process).
        save_merged (`bool`, *optional*, defaults to `False`): LoRA: also save the chosen model fused.
        base_model (`str`, *optional*): LoRA on a quantized base: the unquantized base the fused model is written
            from (a folder or a cached model id); defaults to the base the model records.
    """
    if is_peft_model(model):
        return LoraPlane(model, base, checkpoints, trained, save_merged=save_merged, base_model=base_model)
    save_model = save_model or partial(save_pretrained, model)
    return DensePlane(
        trainable_tensors(model), base, checkpoints, trained, save_model, partial(sharding.reshard, model)
    )


def save_pretrained(model: torch.nn.Module, folder: str) -> None:
    """`model.save_pretrained(folder)`; a sharded model's full state dict is gathered first (every rank calls this)
    and written by the main process alone."""
    if not sharding.is_sharded(model):
        model.save_pretrained(folder)
        return
    state_dict = sharding.gathered_state_dict(model)
    if sharding.rank() == 0:
        model.save_pretrained(folder, state_dict=state_dict)


def sources_of(model: torch.nn.Module, checkpoints: Sequence[str]) -> dict:
    """What the model card and the mergekit recipe name: the base model the live model records (an adapter's
    `base_model_name_or_path`, else the config's `name_or_path`), the kept checkpoints' folders (absolute paths),
    and whether they are LoRA adapters."""
    adapter = is_peft_model(model)
    config = model.peft_config[model.active_adapter] if adapter else None
    base = getattr(config, "base_model_name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if base and os.path.isdir(base):  # a local folder: absolute, so the recipe replays from anywhere
        base = os.path.abspath(base)
    folders = [os.path.abspath(folder) for folder in checkpoints]
    return {"base_model": base or None, "checkpoints": folders, "adapter": adapter}
