"""Reading tensors slice by slice, and publishing a folder atomically.

The passes over the kept tensors (a point of the span, the Gram matrix of the task vectors, a comparison) read each
tensor one slice at a time through `Flat`: a tensor in memory is sliced where it lies, and a tensor in a
safetensors file (`SafetensorsMapping`) is read with one positioned read per slice, so a pass over snapshots on
disk never holds a whole tensor. `publish_dir` fills a temporary folder and replaces the final one in one rename.

Pure torch and the standard library: no transformers, no models.

Example:

```python
>>> import torch
>>> from safetensors.torch import save_file
>>> save_file({"w": torch.arange(6.0).reshape(2, 3)}, "shard.safetensors")
>>> mapping = SafetensorsMapping({"w": "shard.safetensors"})
>>> mapping.read("w", 2, 5)  # elements [2, 5) of the flattened tensor, read from the file
tensor([2., 3., 4.])
```
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import torch
from safetensors import safe_open

from .errors import InputError, StorageError

__all__ = [
    "SAFETENSORS",
    "SAFETENSORS_INDEX",
    "Flat",
    "SafetensorsMapping",
    "flat",
    "publish_dir",
    "read_header",
    "safetensors_files",
]

SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"  # a checkpoint's weights


class Flat(NamedTuple):
    """One tensor, flattened, read slice by slice: `read(start, stop)` gives its elements `[start, stop)`;
    `storage` is the address of the memory it lives in (`None` for a file)."""

    shape: torch.Size
    dtype: torch.dtype
    device: torch.device
    read: Callable[[int, int], torch.Tensor]
    storage: int | None

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Flat:
        """A tensor in memory, sliced where it lies."""
        whole = tensor.reshape(-1)
        read = lambda start, stop: whole[start:stop]  # noqa: E731
        return cls(tensor.shape, tensor.dtype, tensor.device, read, tensor.untyped_storage().data_ptr())


def flat(tensors: Mapping[str, torch.Tensor], name: str) -> Flat:
    """Tensor `name` of `tensors` as a `Flat`. A mapping with `read(name, start, stop)`, `shape(name)` and
    `dtype(name)` (snapshots on disk: `SafetensorsMapping`) is read from its file one slice at a time, so a pass over
    it holds one slice, not the tensor; any other mapping's tensor is sliced in memory.

    Args:
        tensors (`Mapping[str, torch.Tensor]`): a state dict, in memory or on disk.
        name (`str`): the tensor's name.

    Returns:
        `Flat`: the tensor's shape, dtype and device, and how to read a slice of it.

    Raises:
        `KeyError`: `name` is not in `tensors`.
    """
    if not hasattr(tensors, "read"):
        return Flat.of(tensors[name])
    read = lambda start, stop: tensors.read(name, start, stop)  # noqa: E731
    return Flat(torch.Size(tensors.shape(name)), tensors.dtype(name), torch.device("cpu"), read, None)


class SafetensorsMapping(Mapping[str, torch.Tensor]):
    """Read-only mapping over safetensors shards (`{tensor name: file}`) that loads one tensor per access, or one
    slice of it (`read`): the span and kinship passes read snapshots on disk slice by slice (`flat`).

    Reads go into new tensors with one positioned read each. The files are not memory-mapped (as
    `safetensors.safe_open` does), so a sweep that reads every snapshot on disk for every candidate keeps one slice
    resident, not the mapped files: their pages stay in the kernel's cache, not in the process.

    Args:
        index (`dict[str, str]`): the file each tensor is in, by tensor name (a file may hold many tensors).
    """

    def __init__(self, index: dict[str, str]):
        self._index = index
        self._headers: dict[str, tuple[int, dict]] = {}  # path -> (offset of the data, header)

    def __getitem__(self, name: str) -> torch.Tensor:
        return self.read(name).reshape(self.shape(name))

    def read(self, name: str, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """Elements `[start, stop)` of tensor `name` flattened (all of them by default), read from its file.

        Args:
            name (`str`): the tensor's name.
            start (`int`, *optional*, defaults to 0): the first element read.
            stop (`int`, *optional*): one past the last element read; defaults to the tensor's number of elements.

        Returns:
            `torch.Tensor`: a new one-dimensional tensor of the tensor's dtype, `stop - start` elements.

        Raises:
            `KeyError`: no tensor `name` in the mapping.
            `ValueError`: `[start, stop)` is not a range of the tensor's elements.
            `OSError`: the file ends before the tensor's data does (a truncated file).
        """
        path = self._index[name]  # a KeyError names the missing tensor
        offset, header = self._header(path)
        entry = header[name]
        dtype = _DTYPES[entry["dtype"]]
        size = dtype.itemsize
        begin, end = entry["data_offsets"]
        numel = (end - begin) // size
        stop = numel if stop is None else stop
        if not 0 <= start <= stop <= numel:  # the file goes on with the next tensor's bytes: never read them
            raise InputError(
                f"Cannot read elements [{start}, {stop}) of tensor `{name}`, which has {numel} elements: ask for "
                f"`0 <= start <= stop <= {numel}`."
            )
        data = torch.empty((stop - start) * size, dtype=torch.uint8)
        with open(path, "rb", buffering=0) as f:
            f.seek(offset + begin + start * size)
            if f.readinto(data.numpy()) != data.numel():
                raise StorageError(f"{path} ends inside tensor `{name}`: the file is truncated.")
        return data.view(dtype)

    def shape(self, name: str) -> tuple[int, ...]:
        """The shape of tensor `name`, read from the file's header without loading the tensor."""
        return tuple(self._header(self._index[name])[1][name]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        """The dtype of tensor `name`, read from the file's header."""
        return _DTYPES[self._header(self._index[name])[1][name]["dtype"]]

    def _header(self, path: str) -> tuple[int, dict]:
        if path not in self._headers:
            self._headers[path] = read_header(path)
        return self._headers[path]

    def __contains__(self, name: object) -> bool:
        return name in self._index  # without reading the tensor

    def __iter__(self) -> Iterator[str]:
        return iter(self._index)

    def __len__(self) -> int:
        return len(self._index)


_DTYPES = {  # safetensors' dtype names
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16,
    "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip


def read_header(path: str) -> tuple[int, dict]:
    """Where a safetensors file's data starts, and its header (each tensor's dtype, shape and data offsets)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


def safetensors_files(folder: str) -> dict[str, str]:
    """`{tensor name: file}` of a checkpoint folder's safetensors weights (`model.safetensors`, or the shards that
    `model.safetensors.index.json` names); empty when it has neither."""
    index_path = os.path.join(folder, SAFETENSORS_INDEX)
    if os.path.isfile(index_path):
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: os.path.join(folder, shard) for name, shard in weight_map.items()}
    path = os.path.join(folder, SAFETENSORS)
    if not os.path.isfile(path):
        return {}
    with safe_open(path, framework="pt", device="cpu") as f:
        return dict.fromkeys(f.keys(), path)


@contextlib.contextmanager
def publish_dir(final: str, write: bool = True) -> Iterator[str]:
    """Yield a temporary folder to fill; on success it replaces `final` in one rename.

    An earlier `final` stays whole until the new folder is complete, and on an error the temporary folder is
    removed and `final` is untouched. With `write=False` (processes other than the main one) nothing is touched.

    Args:
        final (`str`): the folder to publish (`<output_dir>/exme`); the temporary one is `<final>.incomplete`.
        write (`bool`, *optional*, defaults to `True`): whether this process writes (the main process).

    Example:

    ```python
    >>> with publish_dir("runs/exme") as folder:
    ...     model.save_pretrained(folder)  # runs/exme appears, complete, when the block ends without an error
    ```
    """
    final = os.path.abspath(final)
    tmp, old = final + ".incomplete", final + ".previous"
    if write:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        if write:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if write:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
