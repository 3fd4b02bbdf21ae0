"""Merges off the span: the TIES and DARE baselines and DARE before an M^3 mixup, as one registry.

A merge off the span combines the task vectors `d_i = theta_i - base` of the kept checkpoints with something other
than a linear combination, tensor by tensor:

```
theta[name] = base[name] + f([d_1[name], ..., d_k[name]], weights, density)
```

`f` is a function of the registry `MERGES` (the tested tensor functions of `peft.utils.merge_utils`):

- `"ties"`: keep the `density` fraction of largest entries of each `d_i`, elect a sign per entry, then the weighted
  mean of the entries that agree with it (the TIES baseline: weights 1);
- `"dare"`: drop each entry with probability `1 - density`, rescale the rest by `1 / density`, then the weighted
  sum (the DARE baseline: weights 1/n; M^3 with DARE, `lambda * DARE(d_a) + (1 - lambda) * DARE(d_b)`: weights
  `(lambda, 1 - lambda)`).

A `Merge` names a method, the task vectors it merges, their weights, the density and the seed of DARE's random
masks; every application of a `Merge` (`merge_task_vectors`, the LoRA plane) draws inside `seeded(merge.seed)`, so
it is the same model every time. A new merge is one function here and one registry entry.

Pure torch (and `peft.utils.merge_utils`, imported when a merge runs): no transformers, no models.

Example:

```python
>>> import torch
>>> merge = Merge("ties", checkpoints=(0, 1), weights=(1.0, 1.0), density=0.5)
>>> merge([torch.tensor([1.0, -2.0, 0.1, 3.0]), torch.tensor([1.0, 2.5, -0.2, 0.0])])
tensor([1.0000, 2.5000, 0.0000, 3.0000])
```
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from dataclasses import asdict, dataclass

import torch

from .errors import InputError, MissingExtraError
from .span import StateDict, lookup

__all__ = ["MERGES", "Merge", "MergeFunction", "dare", "merge_task_vectors", "seeded", "ties"]

MergeFunction = Callable[[list[torch.Tensor], Sequence[float], float], torch.Tensor]
"""A merge of one tensor's task vectors: `(task_vectors, weights, density) -> the merged task vector`."""


def _merge_utils():
    try:
        from peft.utils import merge_utils
    except ImportError as error:
        raise MissingExtraError(
            "The TIES and DARE merges use `peft.utils.merge_utils`: `pip install 'exme-callback[peft]'`."
        ) from error
    return merge_utils


def ties(task_vectors: list[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """TIES-merging (Yadav et al. 2023): each task vector trimmed to its `density` fraction of largest entries, a
    sign elected per entry, then the weighted mean of the entries that agree with it (`merge_utils.ties`).

    Args:
        task_vectors (`list[torch.Tensor]`): one tensor's task vectors, all of one shape and dtype.
        weights (`Sequence[float]`): one weight per task vector.
        density (`float`): the fraction of entries each task vector keeps.
    """
    return _merge_utils().ties(task_vectors, torch.tensor(weights).to(task_vectors[0]), density)


def dare(task_vectors: list[torch.Tensor], weights: Sequence[float], density: float) -> torch.Tensor:
    """DARE (Yu et al. 2024): each entry of each task vector dropped with probability `1 - density` and the kept ones
    rescaled by `1 / density`, then the weighted sum `sum_i weights[i] * DARE(d_i)` (`merge_utils.dare_linear`).
    The masks are drawn from torch's global generator, task vector by task vector: seed it (`seeded`).

    Args:
        task_vectors (`list[torch.Tensor]`): one tensor's task vectors, all of one shape and dtype.
        weights (`Sequence[float]`): one weight per task vector (`1/n` for the DARE baseline, `lambda, 1 - lambda`
            for M^3 with DARE).
        density (`float`): the probability of keeping an entry.
    """
    return _merge_utils().dare_linear(task_vectors, torch.tensor(weights).to(task_vectors[0]), density)


MERGES: dict[str, MergeFunction] = {"ties": ties, "dare": dare}
"""The merges off the span, by method name."""


@dataclass(frozen=True)
class Merge:
    """A merge off the span of some of the kept checkpoints' task vectors: `MERGES[method]` applied to
    `[d_i for i in checkpoints]` with `weights` and `density`.

    Args:
        method (`str`): a key of `MERGES` (`"ties"`, `"dare"`).
        checkpoints (`tuple[int, ...]`): the positions of the task vectors it merges, in the plane's order.
        weights (`tuple[float, ...]`): one weight per merged task vector.
        density (`float`): the fraction of entries kept, in (0, 1].
        seed (`int`, *optional*, defaults to 0): the seed of the random masks (DARE), drawn inside `seeded(seed)`.

    Raises:
        `ValueError`: an unknown method, no checkpoints, a weight per checkpoint missing, or a density outside (0, 1].

    Example:

    ```python
    >>> Merge("dare", checkpoints=(0, 1), weights=(0.3, 0.7), density=0.5, seed=42).to_dict()  # M^3, lambda 0.3
    {'method': 'dare', 'checkpoints': [0, 1], 'weights': [0.3, 0.7], 'density': 0.5, 'seed': 42}
    ```
    """

    method: str
    checkpoints: tuple[int, ...]
    weights: tuple[float, ...]
    density: float
    seed: int = 0

    def __post_init__(self):
        if self.method not in MERGES:
            raise InputError(f"Unknown merge method {self.method!r}; known: {', '.join(sorted(MERGES))}")
        checkpoints = tuple(self.checkpoints)
        if not checkpoints or not all(isinstance(i, int) and i >= 0 for i in checkpoints):
            raise InputError(
                f"`checkpoints` must be the positions (ints >= 0) of the task vectors merged, got {self.checkpoints!r}"
            )
        weights = tuple(float(w) for w in self.weights)
        if len(weights) != len(checkpoints) or not all(math.isfinite(w) for w in weights):
            raise InputError(
                f"`weights` must be one finite number per merged checkpoint ({len(checkpoints)}), got {self.weights!r}"
            )
        if not 0.0 < self.density <= 1.0:
            raise InputError(f"`density` must be in (0, 1], got {self.density!r}")
        object.__setattr__(self, "checkpoints", checkpoints)
        object.__setattr__(self, "weights", weights)
        object.__setattr__(self, "density", float(self.density))

    def __call__(self, task_vectors: list[torch.Tensor]) -> torch.Tensor:
        """The merged task vector of one tensor, from the task vectors of all the plane's checkpoints (in its order).

        Draws from torch's global generator: apply it inside `seeded(self.seed)` (`merge_task_vectors` does).

        Raises:
            `ValueError`: `checkpoints` names a task vector that `task_vectors` does not have.
        """
        if max(self.checkpoints) >= len(task_vectors):
            raise InputError(
                f"This merge uses the task vectors {self.checkpoints}, but {len(task_vectors)} were given: build it "
                "with the positions of the plane's checkpoints."
            )
        return MERGES[self.method]([task_vectors[i] for i in self.checkpoints], self.weights, self.density)

    def to_dict(self) -> dict:
        """The JSON form: `{"method", "checkpoints", "weights", "density", "seed"}`, sequences as lists."""
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> Merge:
        """The `Merge` of its JSON form (`to_dict`), validated like a new one."""
        return cls(**{**data, "checkpoints": tuple(data["checkpoints"]), "weights": tuple(data["weights"])})


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with torch's global generators (the CPU's and the initialized CUDA devices') seeded with `seed`,
    then put them back as they were: every application of a merge draws the same DARE masks, and the caller's
    random stream (training, data order) is untouched.

    Example:

    ```python
    >>> with seeded(merge.seed):
    ...     merged = merge(task_vectors)
    ```
    """
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def merge_task_vectors(
    base: StateDict,
    checkpoints: Sequence[StateDict],
    merge: Merge,
    out: MutableMapping[str, torch.Tensor],
    *,
    reseed: bool = True,
) -> None:
    """`out[name] = base[name] + merge([d_1, ..., d_k])` with `d_i = checkpoints[i][name] - base[name]`, tensor by
    tensor in the order of `base`'s names, inside `seeded(merge.seed)`.

    Computed like `span.span_point`: in float32 (float64 for float64 tensors) on `out`'s device, rounded once;
    non-floating tensors are copied from the first checkpoint.

    Args:
        base (`Mapping[str, torch.Tensor]`): the base model's tensors; its names are the names merged.
        checkpoints (`Sequence[Mapping[str, torch.Tensor]]`): the kept checkpoints' tensors, in the plane's order.
        merge (`Merge`): the merge; its `checkpoints` are positions in `checkpoints`.
        out (`MutableMapping[str, torch.Tensor]`): the tensors written in place (a live model's parameters).
        reseed (`bool`, *optional*, defaults to `True`): draw inside `seeded(merge.seed)`; `False` goes on with the
            caller's generator (a caller that merges more tensors inside one `seeded` block: the LoRA plane).

    Raises:
        `KeyError`: a name of `base` is missing from `out`.
    """
    with seeded(merge.seed) if reseed else contextlib.nullcontext():
        for name, b in base.items():
            target = lookup(out, "out", name)
            if not b.is_floating_point():
                target.copy_(checkpoints[0][name])
                continue
            wide = torch.float64 if b.dtype == torch.float64 else torch.float32
            b = b.to(device=target.device, dtype=wide)
            deltas = [c[name].to(device=target.device, dtype=wide) - b for c in checkpoints]
            target.copy_(b + merge(deltas))
