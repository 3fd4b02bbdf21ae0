"""Sharded runs (FSDP2): what each rank keeps, and the few collectives a sweep needs.

The candidate formula `base + sum_i c_i * d_i` is elementwise, so it commutes with sharding. Under FSDP2
(`torch.distributed.fsdp.fully_shard`, what `accelerate` and `Trainer` use with `fsdp_version: 2`) every parameter
is a `DTensor` whose rank-local shard (`DTensor.to_local()`) is a plain tensor: each rank keeps the base's and the
kept checkpoints' shards of its own parameters, writes candidates into its own shards, and never holds a full copy.
What is not elementwise is reduced across ranks: the Gram matrix of the task vectors (a sum over all entries), and
whether the trained weights equal a kept checkpoint (every rank must agree). The chosen model is saved as a full
model, gathered on the CPU by every rank and written by the main process.

FSDP2 leaves the root module's parameters unsharded after a forward pass in evaluation, and writing into the
shards would not reach them; `reshard` puts every FSDP module back into its sharded state before the kept tensors
are read or written.

Under DDP, and ZeRO-1/2, every rank holds full parameters: nothing here changes anything.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from .kinship import Gram

__all__ = [
    "agree",
    "barrier",
    "check_model",
    "gathered_state_dict",
    "is_sharded",
    "local",
    "rank",
    "reshard",
    "total",
    "world",
]


def world() -> int:
    """The number of processes of the run (1 without `torch.distributed`)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's global rank (0 without `torch.distributed`)."""
    return dist.get_rank() if world() > 1 else 0


def _fsdp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed support
        return []
    return [module for module in model.modules() if isinstance(module, FSDPModule)]


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is sharded with FSDP2 (`fully_shard`): its parameters are `DTensor` shards."""
    return bool(_fsdp_modules(model))


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP2 module of `model` into its sharded state (a no-op for other models), so that its parameters
    are the rank-local shards that candidates are written into."""
    for module in _fsdp_modules(model):
        module.reshard()


def local(param: torch.Tensor) -> torch.Tensor:
    """The tensor of `param` this rank holds and writes: its local shard for a `DTensor`, else its data."""
    return param.data.to_local() if hasattr(param, "to_local") else param.data


def check_model(model: torch.nn.Module) -> None:
    """Refuse FSDP1 (`FullyShardedDataParallel`): its flattened parameters do not keep the model's tensor names."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return
    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise NotImplementedError(
            "ExMeCallback does not support FSDP1 (`FullyShardedDataParallel`): its flat parameters hide the tensors "
            "ExMe keeps. Use FSDP2: `fsdp_version: 2` in the accelerate config, or `fsdp_config={'version': 2}` in "
            "the training arguments."
        )


def total(gram: Gram, model: torch.nn.Module) -> Gram:
    """The Gram of the whole task vectors from each rank's Gram of its shards (a sum over ranks); `gram` as is when
    `model` is not sharded (every rank measured the whole vectors)."""
    if world() == 1 or not is_sharded(model):
        return gram
    inner, sums = gram.inner.clone(), gram.sums.clone()
    numel = torch.tensor([gram.numel], dtype=torch.float64)
    for tensor in (inner, sums, numel):
        dist.all_reduce(tensor)
    return Gram(inner, sums, int(numel.item()))


def agree(value):
    """`value` if every rank has the same, else `None` (whether a kept snapshot equals the trained weights is
    decided per shard; every rank must use the same answer)."""
    if world() == 1:
        return value
    values = [None] * world()
    dist.all_gather_object(values, value)
    return value if all(v == value for v in values) else None


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if world() > 1:
        dist.barrier()


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded `model`, gathered on the CPU of the main process (collective: every rank
    calls it; the other ranks get an empty dict), as `accelerate`'s `get_state_dict` gathers it for saving."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    reshard(model)
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
