r"""Model kinship (Hu et al. 2024, "Exploring Model Kinship for Merging Large Language Models", arXiv 2410.12613):
how related two fine-tuned models are, measured on their task vectors, the changes from the shared base.

The kinship paper compares two models by the similarity of their flattened task vectors `u`, `v` (all parameters,
one long vector each): Pearson correlation, cosine similarity or Euclidean distance. Every model ExMe looks at is a
point `base + D c` of the span of the kept checkpoints' task vectors `D = [d_1, ..., d_k]`, so for two points with
coefficient vectors `a` and `b`, `u = D a` and `v = D b`, and all three follow from the `k x k` Gram matrix
`G = D^T D`, the sums `s_i = sum(d_i)` and the length `N` of the vectors:

$$
\cos(u, v) = \frac{a^\top G b}{\sqrt{a^\top G a \; b^\top G b}}, \qquad
\lVert u - v \rVert = \sqrt{(a - b)^\top G (a - b)}, \qquad
\rho(u, v) = \frac{a^\top G b / N - \bar u \bar v}{\sqrt{(a^\top G a / N - \bar u^2)(b^\top G b / N - \bar v^2)}}
$$

with the means \\( \bar u = s^\top a / N \\), \\( \bar v = s^\top b / N \\). One streaming pass over the kept
tensors (float64 accumulation) gives every pair's kinship, of the checkpoints and of any merge of them, where the
reference code flattens two whole models per pair. For a LoRA module with scaling `s`,
\\( \langle s B_i A_i, s B_j A_j \rangle = s^2 \operatorname{tr}((B_i^\top B_j)(A_j A_i^\top)) \\): rank-sized
products, never the dense delta.

Pure torch: no transformers, no models.

Example:

```python
>>> import torch
>>> base = {"w": torch.zeros(3)}
>>> gram = dense_gram(base, [{"w": torch.tensor([1.0, 2.0, 3.0])}, {"w": torch.tensor([2.0, 4.0, 6.5])}])
>>> round(gram.kinship((1, 0), (0, 1), "cosine"), 4)
0.9993
```
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch

from .errors import InputError, MissingNameError
from .io import flat

__all__ = ["METRICS", "Gram", "LoraModule", "dense_gram", "lora_gram"]

METRICS = ("pearson", "cosine", "euclidean")  # the kinship paper's three metrics
_WIDE = torch.float64
_CHUNK = 1 << 18  # entries of a tensor processed at once: k * 2 MiB of float64


@dataclass(frozen=True)
class Gram:
    """The task vectors `d_1, ..., d_k` of the kept checkpoints, summarized for kinship.

    Args:
        inner (`torch.Tensor`): `(k, k)` float64, `inner[i, j] = <d_i, d_j>`.
        sums (`torch.Tensor`): `(k,)` float64, the sum of the entries of each `d_i`.
        numel (`int`): the number of entries of each task vector.
    """

    inner: torch.Tensor
    sums: torch.Tensor
    numel: int

    def __add__(self, other: Gram) -> Gram:
        """The Gram of the concatenated task vectors (for example the dense part and the LoRA part of a model)."""
        return Gram(self.inner + other.inner, self.sums + other.sums, self.numel + other.numel)

    def permuted(self, order: Sequence[int]) -> Gram:
        """The same task vectors in another order: `d'_i = d_{order[i]}`."""
        index = torch.as_tensor(list(order))
        return Gram(self.inner[index][:, index], self.sums[index], self.numel)

    @property
    def k(self) -> int:
        return self.inner.shape[0]

    def kinship(self, a: Sequence[float], b: Sequence[float], metric: str = "pearson") -> float:
        """The kinship of the points `base + D a` and `base + D b` (coefficient vectors of length `k`).

        `"pearson"` and `"cosine"` are similarities in [-1, 1] (NaN when a task vector is constant or zero);
        `"euclidean"` is a distance (0 for the same model).
        """
        if metric not in METRICS:
            raise InputError(f"`metric` must be one of {METRICS}, got {metric!r}")
        a, b = self._vector(a, "a"), self._vector(b, "b")
        ab, aa, bb = a @ self.inner @ b, a @ self.inner @ a, b @ self.inner @ b
        if metric == "euclidean":
            return math.sqrt(max(float(aa - 2 * ab + bb), 0.0))  # rounding can leave a tiny negative
        if metric == "cosine":
            return _ratio(float(ab), float(aa * bb))
        mean_a, mean_b = float(self.sums @ a) / self.numel, float(self.sums @ b) / self.numel
        covariance = float(ab) / self.numel - mean_a * mean_b
        variances = (float(aa) / self.numel - mean_a**2) * (float(bb) / self.numel - mean_b**2)
        return _ratio(covariance, variances)

    def matrix(self, metric: str = "pearson") -> list[list[float]]:
        """The kinship of every pair of kept checkpoints, `k x k`."""
        unit = torch.eye(self.k, dtype=_WIDE)
        return [[self.kinship(unit[i], unit[j], metric) for j in range(self.k)] for i in range(self.k)]

    def merged_pairs(self, alphas: tuple[float, float] | None = None) -> list[dict]:
        """The kinship, in every metric, of the pairs ExMe's merges combine: SFT-1 and SFT-2 (the weighted merge,
        the baselines) and, given the best ExMe merge's `alphas`, EXPO-1 and EXPO-2 at those alphas; none with fewer
        than two checkpoints.

        Example:

        ```python
        >>> sft = [{"w": torch.tensor([1.0, 0.0])}, {"w": torch.tensor([1.0, 1.0])}]
        >>> gram = dense_gram({"w": torch.zeros(2)}, sft)
        >>> [(p["models"], round(p["cosine"], 4)) for p in gram.merged_pairs((0.1, 0.3))]
        [('SFT-1 / SFT-2', 0.7071), ('EXPO-1 (alpha1=0.1) / EXPO-2 (alpha2=0.3)', 0.7071)]
        ```
        """
        if self.k < 2:
            return []
        unit = [tuple(float(i == j) for j in range(self.k)) for i in range(2)]
        pairs = [("SFT-1 / SFT-2", unit[0], unit[1])]
        if alphas is not None:
            expo = [tuple((1.0 + alphas[i]) * c for c in unit[i]) for i in range(2)]
            pairs.append((f"EXPO-1 (alpha1={alphas[0]:g}) / EXPO-2 (alpha2={alphas[1]:g})", *expo))
        return [
            {"models": label, "a": list(a), "b": list(b), **{m: self.kinship(a, b, m) for m in METRICS}}
            for label, a, b in pairs
        ]

    def _vector(self, c: Sequence[float], name: str) -> torch.Tensor:
        vector = torch.as_tensor(c, dtype=_WIDE)
        if vector.shape != (self.k,):
            raise InputError(f"`{name}` must have one coefficient per kept checkpoint ({self.k}), got {tuple(c)}")
        return vector


def _ratio(numerator: float, squared_denominator: float) -> float:
    if squared_denominator <= 0.0:
        return math.nan
    return max(-1.0, min(1.0, numerator / math.sqrt(squared_denominator)))


def dense_gram(base: Mapping[str, torch.Tensor], checkpoints: Sequence[Mapping[str, torch.Tensor]]) -> Gram:
    """The Gram of the task vectors `d_i = checkpoints[i] - base`, in one pass, tensor by tensor (float64).

    Floating-point tensors only (integer buffers are not part of a task vector); names are those of `base`.

    Raises:
        `KeyError`: a tensor of `base` is missing from a checkpoint.
        `ValueError`: a tensor's shape differs from the base's.
    """
    k = len(checkpoints)
    inner, sums, numel = torch.zeros(k, k, dtype=_WIDE), torch.zeros(k, dtype=_WIDE), 0
    for name in base:
        b = flat(base, name)
        if not b.dtype.is_floating_point:
            continue
        tensors = []
        for i, checkpoint in enumerate(checkpoints):
            if name not in checkpoint:
                raise MissingNameError(
                    f"Tensor `{name}` is missing from checkpoint {i}; kinship needs the same tensor names."
                )
            tensor = flat(checkpoint, name)
            if tensor.shape != b.shape:
                raise InputError(
                    f"Tensor `{name}` has shape {tuple(tensor.shape)} in checkpoint {i} but {tuple(b.shape)} in the "
                    "base; kinship needs the same shapes."
                )
            tensors.append(tensor)
        size = b.shape.numel()
        for start in range(0, size, _CHUNK):  # bounded float64 temporaries, whatever the tensor's size
            stop = min(start + _CHUNK, size)
            b_chunk = b.read(start, stop).to(device="cpu", dtype=_WIDE)
            deltas = torch.stack([t.read(start, stop).to(device="cpu", dtype=_WIDE) - b_chunk for t in tensors])
            inner += deltas @ deltas.T
            sums += deltas.sum(dim=1)
        numel += size
    return Gram(inner, sums, numel)


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted weight: `d_i = scaling * (B_i A_i - B_0 A_0)` for each kept checkpoint `i`.

    Args:
        scaling (`float`): the adapter's scaling (`lora_alpha / r`, or its rsLoRA form).
        checkpoints (`Sequence[tuple[torch.Tensor, torch.Tensor]]`): `(B_i, A_i)` of each kept checkpoint.
        base (`tuple[torch.Tensor, torch.Tensor]`, *optional*): `(B_0, A_0)` of the starting adapter, when it is
            not zero (PiSSA, OLoRA).
    """

    scaling: float
    checkpoints: Sequence[tuple[torch.Tensor, torch.Tensor]]
    base: tuple[torch.Tensor, torch.Tensor] | None = None


def lora_gram(modules: Iterable[LoraModule]) -> Gram:
    """The Gram of LoRA task vectors from their factors: `<c B A, c' B' A'> = c c' tr((B^T B')(A' A^T))` and
    `sum(c B A) = c (1^T B)(A 1)`, rank-sized products only (float64).

    Args:
        modules (`Iterable[LoraModule]`): the adapted weights, each with the factors of the same kept checkpoints.

    Returns:
        `Gram`: the Gram of the task vectors, concatenated over the modules.

    Raises:
        `ValueError`: `modules` is empty, or two modules have different numbers of checkpoints.
    """
    inner, sums, numel, k = None, None, 0, None
    for position, module in enumerate(modules):
        terms = []  # each checkpoint's delta as a list of (coefficient, B, A)
        for b, a in module.checkpoints:
            own = [(module.scaling, b.to(_WIDE).cpu(), a.to(_WIDE).cpu())]
            if module.base is not None:
                own.append((-module.scaling, module.base[0].to(_WIDE).cpu(), module.base[1].to(_WIDE).cpu()))
            terms.append(own)
        if k is None:
            k = len(terms)
            inner, sums = torch.zeros(k, k, dtype=_WIDE), torch.zeros(k, dtype=_WIDE)
        elif len(terms) != k:
            raise InputError(
                f"`modules[{position}]` has {len(terms)} checkpoints but `modules[0]` has {k}: every LoRA module "
                "needs the factors `(B_i, A_i)` of every kept checkpoint, in the same order."
            )
        for i in range(k):
            sums[i] += sum(c * (b.sum(0) @ a.sum(1)) for c, b, a in terms[i])
            for j in range(i, k):
                value = sum(
                    c1 * c2 * torch.trace((b1.T @ b2) @ (a2 @ a1.T))
                    for c1, b1, a1 in terms[i]
                    for c2, b2, a2 in terms[j]
                )
                inner[i, j] = inner[j, i] = inner[i, j] + value
        b, a = module.checkpoints[0]
        numel += b.shape[0] * a.shape[1]
    if k is None:
        raise InputError("`modules` is empty: no LoRA module to measure.")
    return Gram(inner, sums, numel)
