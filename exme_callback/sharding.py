"""Sharded runs (FSDP2, DeepSpeed ZeRO-3): what each rank keeps, and the few collectives a sweep needs.

The candidate formula `base + sum_i c_i * d_i` is elementwise, so it commutes with sharding. Each rank keeps the
base's and the kept checkpoints' shards of its own parameters, writes candidates into its own shards, and never holds
a full copy:

- FSDP2 (`torch.distributed.fsdp.fully_shard`, what `accelerate` and `Trainer` use with `fsdp_version: 2`): every
  parameter is a `DTensor`, and its shard is `DTensor.to_local()`;
- DeepSpeed ZeRO-3: every parameter's shard is its flat partition `param.ds_tensor` (without the last rank's padding).

What is not elementwise is reduced across ranks: the Gram matrix of the task vectors (a sum over all entries), and
whether the trained weights equal a kept checkpoint (every rank must agree). The chosen model is saved as a full
model, gathered on the CPU (one parameter at a time under ZeRO-3) and written by the main process.

Both keep gathered copies of some parameters between forward passes (FSDP2 the root module's after a forward in
evaluation, ZeRO-3 its persistent small parameters), which writes into the shards would not reach: `reshard` drops
them after candidates are written. Under ZeRO-3 the optimizer's float32 master weights are not touched: training is
over when the sweep runs, and the trained weights are put back into the shards exactly.

Under DDP, and ZeRO-1/2, every rank holds full parameters: nothing here changes anything.

Evaluation is split across the ranks of any distributed run: `share` gives each rank its items (round robin), and
`gather` brings every rank's results to every rank, so all of them make the same choice.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from .errors import UnsupportedError
from .kinship import Gram

__all__ = [
    "agree",
    "barrier",
    "broadcast",
    "check_model",
    "gather",
    "gathered_state_dict",
    "is_sharded",
    "launched_processes",
    "local",
    "local_tensors",
    "rank",
    "reshard",
    "share",
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


def _is_zero3(param: torch.Tensor) -> bool:
    return hasattr(param, "ds_id")  # DeepSpeed's own test (`deepspeed.runtime.zero.utils.is_zero_param`)


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model`'s parameters are sharded across ranks: FSDP2 (`fully_shard`) or DeepSpeed ZeRO-3."""
    return bool(_fsdp_modules(model)) or any(_is_zero3(p) for p in model.parameters())


def reshard(model: torch.nn.Module) -> None:
    """Drop every gathered copy of `model`'s parameters (a no-op for a model that is not sharded), so the next
    forward pass gathers them from the shards, where candidates are written."""
    for module in _fsdp_modules(model):
        module.reshard()
    for param in model.parameters():
        if _is_zero3(param) and param.ds_status.name == "AVAILABLE":
            param.partition()  # local: this rank's partition stays, the gathered data is freed


def local_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of `model`'s trainable parameters this rank holds and writes, by name: the parameters' own data,
    or their shards (`local`)."""
    for module in _fsdp_modules(model):  # FSDP2 names `DTensor`s only in the sharded state
        module.reshard()
    return {name: local(param) for name, param in model.named_parameters() if param.requires_grad}


def local(param: torch.Tensor) -> torch.Tensor:
    """The tensor of `param` this rank holds and writes: its data, its local shard for an FSDP2 `DTensor`, its flat
    partition (padding excluded) under ZeRO-3. Writing into it writes into the parameter's storage."""
    if _is_zero3(param):
        partition = param.ds_tensor
        start = partition.numel() * dist.get_rank(group=getattr(param, "ds_process_group", None))
        return partition.narrow(0, 0, max(0, min(partition.numel(), param.ds_numel - start)))
    return param.data.to_local() if hasattr(param, "to_local") else param.data


def check_model(model: torch.nn.Module) -> None:
    """Refuse the sharded set-ups whose shards ExMe cannot read or write: FSDP1 (`FullyShardedDataParallel`), whose
    flattened parameters hide the model's tensors, and ZeRO-3 parameters offloaded to NVMe."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return
    if any(isinstance(module, FullyShardedDataParallel) for module in model.modules()):
        raise UnsupportedError(
            "ExMeCallback does not support FSDP1 (`FullyShardedDataParallel`): its flat parameters hide the tensors "
            "ExMe keeps. Use FSDP2: `fsdp_version: 2` in the accelerate config, or `fsdp_config={'version': 2}` in "
            "the training arguments."
        )
    if any(_is_zero3(p) and getattr(p.ds_tensor, "final_location", None) == "nvme" for p in model.parameters()):
        raise UnsupportedError(
            "ExMeCallback does not support ZeRO-3 parameters offloaded to NVMe (`offload_param.device='nvme'`): their "
            "partitions are not in memory to blend. Offload them to the CPU instead, or not at all."
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
    return value if all(v == value for v in gather(value)) else None


def gather(value) -> list:
    """Every rank's `value` (any picklable object), in rank order, on every rank (`[value]` in one process)."""
    if world() == 1:
        return [value]
    values = [None] * world()
    dist.all_gather_object(values, value)
    return values


def share(n: int) -> range:
    """This rank's positions among `n` items, round robin (`rank, rank + world, ...`): the ranks' shares differ in
    size by one at most, and position `i` belongs to rank `i % world`.

    Example:

    ```python
    >>> share(5)  # rank 1 of 2
    range(1, 5, 2)
    ```
    """
    return range(rank(), n, world())


def broadcast(value):
    """The main process's `value` on every rank (`value` as is in one process)."""
    if world() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def launched_processes(device: str = "cpu"):
    """Under `torchrun` or `accelerate launch` (`WORLD_SIZE` > 1 in the environment, no process group yet): join
    the launcher's processes for the block (gloo on the CPU, NCCL on GPUs), each rank on its own device (`"cuda"`
    becomes `"cuda:<LOCAL_RANK>"`), and leave the group at the end. Yields the device to use; in one process, or
    when the group exists already, `device` as is (`exme run` under a launcher: the evaluation is split)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or (dist.is_available() and dist.is_initialized()):
        yield device
        return
    if device == "cuda":
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(torch.device(device))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        yield device
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    """Wait for every rank (a no-op in one process)."""
    if world() > 1:
        dist.barrier()


def gathered_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full state dict of a sharded `model`, gathered on the CPU of the main process (collective: every rank
    calls it; the other ranks get an empty dict), as `accelerate`'s `get_state_dict` gathers it for saving. Under
    ZeRO-3 one parameter is gathered at a time."""
    reshard(model)
    if not any(_is_zero3(p) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    import deepspeed

    state = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        with deepspeed.zero.GatheredParameters([tensor]) if _is_zero3(tensor) else contextlib.nullcontext():
            if rank() == 0:
                state[name] = tensor.detach().to("cpu", copy=True)
    return state
