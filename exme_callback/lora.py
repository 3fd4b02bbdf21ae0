r"""PEFT glue: the candidates of a LoRA run, exactly, as one adapter of rank r1 + ... + rk.

For an adapted module with scaling `s`, checkpoint `i` (factors `A_i`, `B_i`) changes the weight by
`d_i = s * B_i @ A_i`. The candidate `c` is `W + c1 * d1 + ... + ck * dk`, and (for k = 2)

```
c1 * s * B1 @ A1 + c2 * s * B2 @ A2 = [B1, B2] @ [c1 * s * A1; c2 * s * A2]
```

is one LoRA adapter of rank `r1 + r2` with scaling 1: the B factors side by side, the A factors stacked with their
coefficients. The sweep adds that adapter (named `"exme"`) once, activates it in place of the trained adapter, and
switches candidates by rewriting its A factors: adapter-sized work that never touches the base weights. Blending
the A and B factors of the checkpoints separately would not be this model (`(B1 + B2)(A1 + A2) != B1 A1 + B2 A2`).

When the starting adapter is not zero (PiSSA, OLoRA and other initializations that set `B != 0`), one more block
with coefficient `1 - c1 - ... - ck` carries it, so the candidate is still `base + sum_i c_i * d_i` exactly.

Merges off the span (the TIES and DARE baselines) are not low-rank: they are applied to each adapted module's dense
delta `d_i` (PEFT's `get_delta_weight`), written into the base layer as DoRA's fallback does, with the `"exme"`
adapter silenced; the base layers are restored before the next point of the span. That keeps one dense copy of
every adapted weight while the baselines run.

DoRA is not linear in its scale (it renormalizes the weight), so DoRA modules fall back to dense effective weights:
`W_i` is the module's weight with checkpoint `i`'s adapter merged in (by PEFT), and the candidate weight
`W_0 + c1 * (W_1 - W_0) + c2 * (W_2 - W_0)` is written into the base layer, which is restored afterwards. This
keeps three dense copies of every DoRA-adapted weight in memory, and the result is saved as a fused model.

Trainable tensors outside the adapter factors (`modules_to_save`, biases, trainable tokens) are dense deltas,
combined as in full fine-tuning into the `"exme"` adapter's own copies (biases, which adapters share, in place).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence

import torch

from .errors import InputError, UnsupportedError
from .fusing import adapted_layers, is_quantized, merged_state_dict, save_fused, unquantized_base
from .kinship import Gram, LoraModule, dense_gram, lora_gram
from .merges import Merge, merge_task_vectors, seeded
from .span import StateDict, span_point

__all__ = ["LoraPlane", "check_peft_model", "is_peft_model", "quiet_peft_save"]

EXME_ADAPTER = "exme"


def is_peft_model(model: torch.nn.Module) -> bool:
    """Whether `model` is a `peft.PeftModel` (or carries adapters loaded through transformers' PEFT integration)."""
    if getattr(model, "_hf_peft_config_loaded", False):
        return True
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def check_peft_model(model: torch.nn.Module) -> None:
    """Refuse the PEFT set-ups the LoRA plane does not cover, saying what is supported."""
    from peft import PeftModel, PeftType

    if not isinstance(model, PeftModel):
        raise UnsupportedError(
            "ExMeCallback supports PEFT through `peft.PeftModel` (`get_peft_model(model, LoraConfig(...))`, or "
            "`SFTTrainer(..., peft_config=...)`), not adapters added with `model.add_adapter`."
        )
    config = model.peft_config[model.active_adapter]
    if config.peft_type != PeftType.LORA:
        raise UnsupportedError(
            f"ExMeCallback supports LoRA among PEFT methods, got {config.peft_type.value}; use a `LoraConfig`."
        )
    if getattr(config, "target_parameters", None):
        raise UnsupportedError("ExMeCallback does not support LoRA on `target_parameters`; use `target_modules`.")


class LoraPlane:
    """The candidates of a LoRA run, written into one live adapter of rank `r1 + ... + rk` (see the module
    docstring). Implements `planes.Plane`.

    Creating it adds the `"exme"` adapter and activates it; `apply(c)` makes the model compute `theta(c)` (or a merge
    off the span); `save(folder)` saves the current candidate; `close()` puts the trained adapter back as the active
    one and removes `"exme"`.

    Args:
        model (`peft.PeftModel`): the model whose active adapter was trained.
        base (`Mapping[str, torch.Tensor]`): trainable tensors at the start of training.
        checkpoints (`Sequence[Mapping[str, torch.Tensor]]`): trainable tensors at the kept checkpoints, best first.
        trained (`Mapping[str, torch.Tensor]`): trainable tensors at the end of training, restored by `close()`.
        save_merged (`bool`, *optional*, defaults to `False`): `save` also writes the candidate fused into the base
            weights, in `merged/`.
        base_model (`str`, *optional*): a quantized model's unquantized base (a folder or a cached model id), which
            the fused model is written from; defaults to the base the model records.
    """

    def __init__(
        self,
        model,
        base: StateDict,
        checkpoints: Sequence[StateDict],
        trained: StateDict,
        *,
        save_merged: bool = False,
        base_model: str | None = None,
    ):
        self.model, self.trained, self.save_merged_too, self.base_model = model, trained, save_merged, base_model
        self.adapter = model.active_adapter
        config = model.peft_config[self.adapter]
        layers = adapted_layers(model, self.adapter)
        dora = {prefix: layer for prefix, layer in layers.items() if layer.use_dora.get(self.adapter, False)}
        layers = {prefix: layer for prefix, layer in layers.items() if prefix not in dora}
        factor_names = {
            name for prefix, layer in {**layers, **dora}.items() for name in _factor_names(prefix, layer, self.adapter)
        }
        factor_names |= {f"{prefix}.lora_magnitude_vector.{self.adapter}.weight" for prefix in dora}
        self.exact_adapter = not dora  # whether the candidate can be saved as a LoRA adapter
        self._layers, self._base, self._checkpoints = layers, base, list(checkpoints)

        # The blocks of the "exme" adapter: each checkpoint, and the starting adapter when it is not zero.
        points = list(checkpoints)
        if any(torch.count_nonzero(base[_factor_names(p, m, self.adapter)[1]]) for p, m in layers.items()):
            points.append(base)
        self._points = points

        # What `close()` puts back besides `trained`, known before anything changes the model.
        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._originals: dict[str, torch.Tensor] = {}  # DoRA modules' base weights
        self._base_layers: dict[str, torch.Tensor] = {}  # adapted base weights, kept while off-span merges run
        self._off_span = False  # whether the live candidate is a merge off the span (never saved)
        self._dense: dict[str, torch.Tensor] = {}  # live dense tensors, by their name in the snapshots
        try:  # from here on the model changes: any error puts the trained model back (`close`)
            # DoRA modules: dense effective weights of every point, computed before anything else changes.
            parameters = dict(model.named_parameters())
            effective = [_effective_weights(dora, self.adapter, point, parameters) for point in (base, *checkpoints)]
            _load(parameters, trained)
            self._originals.update(
                {
                    f"{prefix}.base_layer.weight": layer.get_base_layer().weight.detach().to("cpu", copy=True)
                    for prefix, layer in dora.items()
                }
            )
            model.add_adapter(EXME_ADAPTER, _block_config(config, len(points)))
            model.set_adapter(EXME_ADAPTER)
            self._restore_requires_grad()
            self._factors = self._write_b_blocks(layers)
            self._dense_points = self._match_dense(factor_names, base, checkpoints, effective)
        except BaseException:
            self.close()
            raise

    def _write_b_blocks(self, layers: dict) -> list[tuple]:
        """Write the `"exme"` B factors (the same for every candidate: the blocks side by side) once."""
        factors = []  # (trained scaling, A name, B-bias name or None, live A, live B bias or None)
        with torch.no_grad():
            for prefix, layer in layers.items():
                a_name, b_name, bias_name = _factor_names(prefix, layer, self.adapter)
                live_a, live_b, live_bias = _live_factors(layer, EXME_ADAPTER)
                layer.scaling[EXME_ADAPTER] = 1.0
                live_b.copy_(torch.cat([p[b_name].to(live_b.device, torch.float32) for p in self._points], dim=1))
                factors.append((layer.scaling[self.adapter], a_name, bias_name, live_a, live_bias))
        return factors

    def _match_dense(self, factor_names, base, checkpoints, effective) -> list[dict[str, torch.Tensor]]:
        """Find the live tensor of every dense entry; return the dense parts of the base and the checkpoints."""
        parameters = dict(self.model.named_parameters())
        for name in base:
            if name not in factor_names:
                # The exme adapter's own copy when the tensor is per adapter, else the shared tensor (a bias).
                target = _rename_adapter(name, self.adapter, EXME_ADAPTER)
                self._dense[name] = parameters[target].data
        points = [{name: point[name] for name in self._dense} for point in (base, *checkpoints)]
        for name in self._originals:  # DoRA weights, written into the base layer (in the modules' order)
            self._dense[name] = parameters[name].data
            for point, effective_weights in zip(points, effective, strict=True):
                point[name] = effective_weights[name]
        return points

    def apply(self, point: Sequence[float] | Merge) -> None:
        """Make the model compute `base + sum_i c_i * d_i`, or `base + merge([d_1, ..., d_k])` off the span (its
        random masks drawn inside `seeded(merge.seed)`, for the adapted modules and then the dense tensors)."""
        self._restore_base_layers()
        self._off_span = isinstance(point, Merge)
        if self._off_span:
            with seeded(point.seed):
                self._apply_merge(point)
            return
        coefficients = [*point, 1.0 - sum(point)][: len(self._points)]
        with torch.no_grad():
            for scaling, a_name, bias_name, live_a, live_bias in self._factors:
                blocks = [
                    p[a_name].to(live_a.device, torch.float32) * (c * scaling)
                    for p, c in zip(self._points, coefficients, strict=True)
                ]
                live_a.copy_(torch.cat(blocks, dim=0))
                if live_bias is not None:
                    biases = [
                        p[bias_name].to(live_bias.device, torch.float32) * (c * scaling)
                        for p, c in zip(self._points, coefficients, strict=True)
                    ]
                    live_bias.copy_(torch.stack(biases).sum(0))
            span_point(self._dense_points[0], self._dense_points[1:], point, out=self._dense)

    def _apply_merge(self, merge: Merge) -> None:
        """A merge off the span: each adapted module's dense deltas merged into its base layer; "exme" silenced."""
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for prefix, layer in self._layers.items():
                names = [n for n in _factor_names(prefix, layer, self.adapter) if n is not None]
                deltas = {"weight": []}
                try:  # each point's factors in the trained adapter, for PEFT's delta; then the trained ones again
                    for point in (self._base, *self._checkpoints):
                        _load(parameters, {n: point[n] for n in names})
                        deltas["weight"].append(layer.get_delta_weight(self.adapter).float())
                        if names[2:]:  # lora_bias: B's bias, scaled, adds to the base layer's bias
                            bias = point[names[2]].float() * layer.scaling[self.adapter]
                            deltas.setdefault("bias", []).append(bias)
                finally:
                    _load(parameters, {n: self.trained[n] for n in names})
                base_layer = layer.get_base_layer()
                for key, values in deltas.items():
                    live = getattr(base_layer, key)
                    if live is None:
                        raise UnsupportedError(f"`{prefix}`: merging LoRA biases needs a base layer with a bias.")
                    name = f"{prefix}.base_layer.{key}"
                    self._base_layers.setdefault(name, live.detach().to("cpu", copy=True))
                    task_vectors = [v.to(live.device) - values[0].to(live.device) for v in values[1:]]
                    live.copy_(live.float() + merge(task_vectors))
            for _, _, _, live_a, live_bias in self._factors:  # the "exme" adapter adds nothing
                live_a.zero_()
                if live_bias is not None:
                    live_bias.zero_()
            merge_task_vectors(self._dense_points[0], self._dense_points[1:], merge, out=self._dense, reseed=False)

    def _restore_base_layers(self) -> None:
        parameters = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in self._base_layers.items():
                parameters[name].copy_(tensor)
        self._base_layers.clear()

    def gram(self) -> Gram:
        """The Gram matrix of the checkpoints' task vectors: rank-sized for the LoRA modules (their biases, DoRA
        modules and the other trainable tensors as dense deltas)."""
        base_b = {p: self._base[_factor_names(p, m, self.adapter)[1]] for p, m in self._layers.items()}
        modules, biases = [], [{} for _ in range(1 + len(self._checkpoints))]
        for prefix, layer in self._layers.items():
            a_name, b_name, bias_name = _factor_names(prefix, layer, self.adapter)
            scaling = layer.scaling[self.adapter]
            nonzero_base = bool(torch.count_nonzero(base_b[prefix]))
            modules.append(
                LoraModule(
                    scaling,
                    [(point[b_name], point[a_name]) for point in self._checkpoints],
                    (self._base[b_name], self._base[a_name]) if nonzero_base else None,
                )
            )
            if bias_name is not None:  # lora_bias: B's bias adds `scaling * bias` to the output
                for tensors, point in zip(biases, (self._base, *self._checkpoints), strict=True):
                    tensors[bias_name] = point[bias_name].float() * scaling
        gram = dense_gram(self._dense_points[0], self._dense_points[1:]) + dense_gram(biases[0], biases[1:])
        return gram + lora_gram(modules) if modules else gram

    def save(self, folder: str, merged: bool = False) -> dict[str, str]:
        """Save the current candidate: a PEFT adapter folder (and `merged/` with `save_merged`), or the fused model
        (`merged=True`, and always for DoRA runs and merges off the span, which are not low-rank). Returns
        `{"adapter": folder, "merged": ...}` or `{"model": folder}`."""
        if merged or self._off_span or not self.exact_adapter:  # dense weights (DoRA, merges off the span): fused
            self.save_merged(folder)
            return {"model": folder}
        self.save_adapter(folder)
        saved = {"adapter": folder}
        if self.save_merged_too:
            saved["merged"] = os.path.join(folder, "merged")
            self.save_merged(saved["merged"])
        return saved

    def close(self, keep: bool = False) -> None:
        """Restore the trained adapter (active, with its tensors and trainability) and remove `"exme"`.

        The trained tensors are copied from `trained`, so this also puts the trained model back, bit for bit, after
        an error anywhere in `__init__` (which calls it) or in `apply`. With `keep=True` the `"exme"` adapter stays
        loaded and active (the shared dense tensors hold the chosen candidate); the trained adapter stays loaded
        beside it.
        """
        if keep:
            return
        self._restore_base_layers()
        parameters = dict(self.model.named_parameters())
        _load(parameters, self._originals)
        _load(parameters, self.trained)  # the trained adapter and the shared tensors, whatever failed on the way
        self.model.set_adapter(self.adapter)
        if EXME_ADAPTER in self.model.peft_config:  # absent when `__init__` failed before adding it
            self.model.delete_adapter(EXME_ADAPTER)
        self._restore_requires_grad()

    def save_adapter(self, folder: str) -> None:
        """Save the current candidate as a PEFT adapter folder (rank `r1 + ... + rk`, scaling 1)."""
        if not self.exact_adapter:
            raise InputError("A DoRA candidate is dense effective weights, not a LoRA adapter: use `save_merged`.")
        staging = os.path.join(folder, ".adapter")
        config = self.model.peft_config[EXME_ADAPTER]
        config.bias = self.model.peft_config[self.adapter].bias  # so the candidate's biases are saved too
        try:
            with quiet_peft_save():  # PEFT's warning about a base without config.json (GGUF): nothing to act on
                self.model.save_pretrained(staging, selected_adapters=[EXME_ADAPTER])
        finally:
            config.bias = "none"
        source = os.path.join(staging, EXME_ADAPTER)  # PEFT writes adapters other than "default" to a subfolder
        for entry in os.listdir(source):
            os.replace(os.path.join(source, entry), os.path.join(folder, entry))
        shutil.rmtree(staging)

    def save_merged(self, folder: str) -> None:
        """Save the current candidate fused into the base weights, as a plain transformers model. On a quantized base
        (QLoRA) the fused model is written from the unquantized base's safetensors (`save_fused`), found from
        `base_model` or the base the model records (`unquantized_base`)."""
        if is_quantized(self.model):
            values = {_rename_adapter(n, self.adapter, EXME_ADAPTER): t for n, t in self._dense.items()}
            values = {n.removeprefix("base_model.model."): t for n, t in values.items()}
            base = unquantized_base(self.model, self.base_model)
            save_fused(self.model, EXME_ADAPTER, folder, base, values)
            return
        base_model = self.model.get_base_model()
        base_model.save_pretrained(folder, state_dict=merged_state_dict(self.model, EXME_ADAPTER))

    def _restore_requires_grad(self) -> None:
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(self._requires_grad.get(name, False))


def _block_config(config, blocks: int):
    """The `"exme"` adapter's config: `blocks` times each module's rank, alpha equal to rank (scaling 1)."""
    from dataclasses import replace

    ranks = {key: blocks * r for key, r in config.rank_pattern.items()}
    return replace(
        config,
        r=blocks * config.r,
        lora_alpha=blocks * config.r,
        rank_pattern=ranks,
        alpha_pattern=dict(ranks),
        use_rslora=False,
        use_dora=False,
        lora_dropout=0.0,
        bias="none",  # PEFT allows one adapter with biases; the trained biases are shared tensors, written in place
        init_lora_weights=True,  # an initialization that leaves the base weights alone (PiSSA, OLoRA change them)
        inference_mode=True,
    )


def _effective_weights(dora: dict, adapter: str, tensors: StateDict, parameters: dict) -> dict[str, torch.Tensor]:
    """Each DoRA module's weight with `tensors` loaded into its adapter and merged by PEFT (on the CPU). Each base
    weight is put back bit for bit, even when the merge fails; the adapter keeps `tensors` (the caller restores it)."""
    _load(parameters, tensors)
    weights = {}
    for prefix, layer in dora.items():
        weight = layer.get_base_layer().weight
        original = weight.detach().clone()
        try:
            layer.merge(adapter_names=[adapter])
            weights[f"{prefix}.base_layer.weight"] = weight.detach().to("cpu", copy=True)
        finally:
            if adapter in layer.merged_adapters:
                layer.unmerge()
            with torch.no_grad():
                weight.copy_(original)  # bit for bit, whatever rounding the unmerge did
    return weights


def _load(parameters: dict, tensors: StateDict) -> None:
    with torch.no_grad():
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def _factor_names(prefix: str, layer, adapter: str) -> tuple[str, str, str | None]:
    """The names of a LoRA layer's A and B factors (and B's bias) in the model's parameter names."""
    if adapter in layer.lora_embedding_A:
        return f"{prefix}.lora_embedding_A.{adapter}", f"{prefix}.lora_embedding_B.{adapter}", None
    bias = f"{prefix}.lora_B.{adapter}.bias" if layer.lora_B[adapter].bias is not None else None
    return f"{prefix}.lora_A.{adapter}.weight", f"{prefix}.lora_B.{adapter}.weight", bias


def _live_factors(layer, adapter: str):
    if adapter in layer.lora_embedding_A:
        return layer.lora_embedding_A[adapter].data, layer.lora_embedding_B[adapter].data, None
    bias = layer.lora_B[adapter].bias
    return layer.lora_A[adapter].weight.data, layer.lora_B[adapter].weight.data, None if bias is None else bias.data


def _rename_adapter(name: str, old: str, new: str) -> str:
    return ".".join(new if part == old else part for part in name.split("."))


@contextlib.contextmanager
def quiet_peft_save() -> Iterator[None]:
    """Save a PEFT adapter without PEFT's warning that the base model's folder has no `config.json`.

    `PeftModel.save_pretrained` (through `peft.utils.get_peft_model_state_dict`, with the default
    `save_embedding_layers="auto"`) looks for `config.json` in the base model's folder, to tell whether the
    vocabulary was resized. A base model loaded from a GGUF file has no such file, so PEFT warns
    `"Could not find a config file in {folder} - will assume that the vocabulary was not modified."` on every save.
    This hides exactly that warning during the block; every other warning shows as usual.

    Example:

    ```python
    >>> with quiet_peft_save():
    ...     peft_model.save_pretrained(output_dir)
    ```
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore",
            message=r"Could not find a config file in .* - will assume that the vocabulary was not modified\.",
            category=UserWarning,
            module=r"peft\.",
        )
        yield
