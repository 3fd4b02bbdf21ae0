"""The tensors ExMe keeps: the base and the best checkpoints, in CPU memory or on disk, and the run state saved
into each Trainer checkpoint so that a resumed run ends like an uninterrupted one.

Only trainable tensors are kept (what fine-tuning changes), each in its own dtype, so the kept state is exact and
costs what the trainable parameters cost, once per snapshot. From a GPU, `storage="cpu"` copies into pinned memory
without blocking, so training does not wait for a snapshot. `storage="disk"` writes safetensors shards and reads them
back slice by slice, so a sweep never holds a whole snapshot, or a whole tensor of one, in memory.

The run state of a checkpoint folder is `exme/exme_state.json` (scores and which snapshots it names, JSON) beside
the snapshots as safetensors files: nothing is pickled.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import sharding
from .errors import InputError, MissingFileError, MissingNameError
from .io import SafetensorsMapping

__all__ = ["SnapshotStore", "load_state", "save_state", "trainable_tensors"]

STORAGES = ("cpu", "disk")
STATE_DIR, STATE_FILE = "exme", "exme_state.json"  # the run state inside each checkpoint folder
_SHARD_BYTES = 1 << 30  # bounds the CPU memory a disk snapshot needs while it is written
_SLICE = 1 << 19  # elements compared at once in `find` for snapshots on disk
ORDER = "exme.order"  # safetensors metadata: the tensor names in their model order (seeded DARE masks follow it)


def trainable_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The live tensors of `model`'s trainable parameters, by name (tied parameters once).

    The tensors are the parameters' own storage (`param.data`): writing into them changes the model. Under FSDP2 and
    ZeRO-3 they are this rank's shards (`sharding.local`).
    """
    return sharding.local_tensors(model)


class SnapshotStore:
    """Named copies of state dicts, kept in CPU memory (`storage="cpu"`) or as safetensors files (`"disk"`).

    Args:
        storage (`str`, *optional*, defaults to `"cpu"`): `"cpu"` or `"disk"`.
        directory (`str`, *optional*): where `"disk"` snapshots are written; required for `"disk"`.
    """

    def __init__(self, storage: str = "cpu", directory: str | os.PathLike | None = None):
        if storage not in STORAGES:
            raise InputError(f"`storage` must be one of {STORAGES}, got {storage!r}")
        if storage == "disk" and directory is None:
            raise InputError("`storage='disk'` needs a `directory` to write snapshots to.")
        self.storage = storage
        self.directory = None if directory is None else os.fspath(directory)
        self._memory: dict[str, dict[str, torch.Tensor]] = {}
        self._files: dict[str, dict[str, str]] = {}  # key -> tensor name -> shard path
        self._exported: dict[str, dict[str, str]] = {}  # files written for `export` of in-memory snapshots
        self._pending: dict[str, torch.cuda.Event] = {}  # in-memory snapshots whose copies may still be running

    def __contains__(self, key: str) -> bool:
        return key in self._memory or key in self._files

    def keys(self) -> list[str]:
        return [*self._memory, *self._files]

    def save(self, key: str, tensors: Mapping[str, torch.Tensor]) -> None:
        """Copy `tensors` under `key` (replacing an earlier snapshot of that key)."""
        self.delete(key)
        if self.storage == "cpu":
            self._memory[key] = {name: _host_copy(t.detach()) for name, t in tensors.items()}
            if any(t.is_cuda for t in tensors.values()):  # the copies run on the device's stream: done when this is
                self._pending[key] = torch.cuda.Event()
                self._pending[key].record()
        else:
            self._files[key] = self._write(key, tensors)

    def load(self, key: str) -> Mapping[str, torch.Tensor]:
        """The snapshot `key`: a `dict` for `"cpu"`, a mapping that reads each tensor on access for `"disk"`."""
        self._wait(key)
        if key in self._memory:
            return self._memory[key]
        if key in self._files:
            return SafetensorsMapping(self._files[key])
        raise MissingNameError(f"No snapshot named {key!r}; kept: {self.keys()}")

    def find(self, tensors: Mapping[str, torch.Tensor], keys: Sequence[str]) -> str | None:
        """The first of `keys` whose snapshot equals `tensors` bit for bit, or `None` (a mismatch stops at the first
        tensor that differs, so this is cheap when nothing matches)."""
        for key in keys:
            snapshot = self.load(key)
            if snapshot.keys() == tensors.keys() and all(_equal(snapshot, n, t) for n, t in tensors.items()):
                return key
        return None

    def delete(self, key: str) -> None:
        self._wait(key)
        self._memory.pop(key, None)
        for path in {*self._files.pop(key, {}).values(), *self._exported.pop(key, {}).values()}:
            os.remove(path)

    def nbytes(self) -> int:
        """The bytes held by the kept snapshots (in memory or on disk)."""
        in_memory = sum(t.numel() * t.element_size() for s in self._memory.values() for t in s.values())
        return in_memory + sum(os.path.getsize(p) for s in self._files.values() for p in set(s.values()))

    def export(self, key: str, directory: str) -> None:
        """Put snapshot `key` into `directory` as safetensors files (`{key}-00000.safetensors`, ...).

        The files are written once, to the store's own directory, then hard-linked (copied where links are not
        possible), so exporting the same snapshot into many checkpoint folders costs its bytes once.
        """
        self._wait(key)
        if key in self._memory and key not in self._exported:
            if self.directory is None:
                raise InputError("Exporting a snapshot needs the store's `directory`.")
            self._exported[key] = self._write(key, self._memory[key])
        index = self._exported[key] if key in self._memory else self._files[key]
        os.makedirs(directory, exist_ok=True)
        for path in set(index.values()):
            _link_or_copy(path, os.path.join(directory, os.path.basename(path)))

    def import_(self, key: str, directory: str) -> None:
        """Take snapshot `key` from files written by `export`.

        The files are linked into the store's directory (never moved) and count as exported, so exporting the
        snapshot again (into the next checkpoint, after a resume) links them instead of writing them again.
        """
        paths = sorted(
            os.path.join(directory, name)
            for name in os.listdir(directory)
            if name.startswith(f"{key}-") and name.endswith(".safetensors")
        )
        if not paths:
            raise MissingFileError(f"No snapshot {key!r} in {directory}")
        self.delete(key)
        if self.directory is not None:
            os.makedirs(self.directory, exist_ok=True)
            linked = [os.path.join(self.directory, os.path.basename(path)) for path in paths]
            for source, destination in zip(paths, linked, strict=True):
                _link_or_copy(source, destination)
            paths = linked
        index = {}
        for path in paths:  # in the order the tensors were saved (a file lists its keys sorted)
            with safe_open(path, framework="pt", device="cpu") as f:
                order = (f.metadata() or {}).get(ORDER)
                index.update(dict.fromkeys(json.loads(order) if order else f.keys(), path))
        if self.storage == "disk":
            self._files[key] = index
            return
        self.save(key, SafetensorsMapping(index))
        if self.directory is not None:
            self._exported[key] = index

    def clear(self) -> None:
        for key in {*self.keys(), *self._exported}:
            self.delete(key)
        if self.directory is not None and os.path.isdir(self.directory) and not os.listdir(self.directory):
            shutil.rmtree(self.directory)

    def _wait(self, key: str) -> None:
        """Wait for the copies of snapshot `key` from a CUDA device to finish (nothing to wait for elsewhere)."""
        event = self._pending.pop(key, None)
        if event is not None:
            event.synchronize()

    def _write(self, key: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
        os.makedirs(self.directory, exist_ok=True)
        index: dict[str, str] = {}
        shard: dict[str, torch.Tensor] = {}
        size = 0

        def flush() -> None:
            nonlocal shard, size
            path = os.path.join(self.directory, f"{key}-{len(set(index.values())):05d}.safetensors")
            save_file(shard, path + ".tmp", metadata={ORDER: json.dumps(list(shard))})
            os.replace(path + ".tmp", path)  # a snapshot file is complete or absent
            index.update(dict.fromkeys(shard, path))
            shard, size = {}, 0

        for name, tensor in tensors.items():
            shard[name] = tensor.detach().to("cpu").contiguous()
            size += tensor.numel() * tensor.element_size()
            if size >= _SHARD_BYTES:
                flush()
        if shard or not index:
            flush()
        return index


def save_state(store: SnapshotStore, checkpoint: str, info: Mapping, keys: Sequence[str], shards: int = 1) -> None:
    """Write the run state into a checkpoint folder: the snapshots `keys` as safetensors files (hard-linked to the
    store's, so every checkpoint costs their bytes once) and `info` (JSON-able) in `exme/exme_state.json`, written
    last and atomically: a state file always names complete snapshots.

    A sharded run (`shards` ranks, each keeping its shards) calls this on every rank: each writes its snapshots into
    `exme/rank-<r>/`, and the main process writes the state file once all of them are written.
    """
    folder = os.path.join(checkpoint, STATE_DIR)
    for key in keys:
        store.export(key, _shard_folder(folder, shards))
    if shards > 1:
        sharding.barrier()
        if sharding.rank() != 0:
            return
    path = os.path.join(folder, STATE_FILE)
    with open(path + ".tmp", "w") as f:
        json.dump({"info": dict(info), "snapshots": list(keys), "shards": shards}, f, indent=2)
    os.replace(path + ".tmp", path)


def load_state(store: SnapshotStore, checkpoint: str, shards: int = 1) -> dict:
    """Read the run state written by `save_state` from a checkpoint folder: import its snapshots into `store` (this
    rank's, for a sharded run of `shards` ranks) and return its `info`.

    Raises:
        `FileNotFoundError`: the folder has no ExMe state, or a snapshot it names is missing.
        `ValueError`: the state was saved by another number of shards.
    """
    path = os.path.join(checkpoint, STATE_DIR, STATE_FILE)
    if not os.path.isfile(path):
        raise MissingFileError(f"{checkpoint} has no ExMe state ({STATE_DIR}/{STATE_FILE}).")
    with open(path) as f:
        saved = json.load(f)
    saved_shards = saved.get("shards", 1)
    if saved_shards != shards:
        saved_as = f"sharded over {saved_shards} ranks" if saved_shards > 1 else "by an unsharded run"
        now = f"sharded over {shards} ranks" if shards > 1 else "unsharded"
        raise InputError(
            f"The ExMe state of {checkpoint} was saved {saved_as} (each rank keeps its own shards), but this run is "
            f"{now}. Resume with the same number of processes and the same FSDP setting."
        )
    for key in saved["snapshots"]:
        store.import_(key, _shard_folder(os.path.dirname(path), shards))
    return saved["info"]


def _shard_folder(folder: str, shards: int) -> str:
    """Where this rank's snapshots are in a checkpoint's state folder."""
    return folder if shards == 1 else os.path.join(folder, f"rank-{sharding.rank():05d}")


def _equal(snapshot: Mapping[str, torch.Tensor], name: str, tensor: torch.Tensor) -> bool:
    """Whether `snapshot[name]` equals `tensor` bit for bit; a snapshot on disk is compared slice by slice."""
    if not isinstance(snapshot, SafetensorsMapping):
        return torch.equal(snapshot[name], tensor.to(snapshot[name].device))
    if snapshot.dtype(name) != tensor.dtype or snapshot.shape(name) != tuple(tensor.shape):
        return False
    flat = tensor.reshape(-1)
    return all(
        torch.equal(snapshot.read(name, start, start + len(piece)), piece.cpu())
        for start in range(0, flat.numel(), _SLICE)
        for piece in [flat[start : start + _SLICE]]
    )


def _host_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A CPU copy of `tensor`. From a CUDA device, into pinned memory with a non-blocking copy: training goes on
    while it runs (the optimizer's next update of `tensor` is queued after it on the same stream)."""
    if not tensor.is_cuda:
        return tensor.to("cpu", copy=True)
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    return host.copy_(tensor, non_blocking=True)


def _link_or_copy(source: str, destination: str) -> None:
    if os.path.exists(destination):
        os.remove(destination)
    try:
        os.link(source, destination)
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(source, destination)
