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
import copy
import json
import os
import shutil
import warnings
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch

from .errors import InputError, MissingFileError, MissingNameError, UnsupportedError
from .io import SafetensorsMapping
from .kinship import Gram, LoraModule, dense_gram, lora_gram
from .merges import Merge, merge_task_vectors, seeded
from .span import StateDict, span_point

__all__ = [
    "LoraPlane",
    "UnquantizedBase",
    "check_fusable",
    "check_peft_model",
    "is_peft_model",
    "is_quantized",
    "quiet_peft_save",
    "recorded_base",
    "safetensors_files",
    "save_fused",
    "unquantized_base",
]

EXME_ADAPTER = "exme"
SAFETENSORS, SAFETENSORS_INDEX = "model.safetensors", "model.safetensors.index.json"


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
        layers = _adapted_layers(model, self.adapter)
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


def merged_state_dict(model, adapter: str) -> dict[str, torch.Tensor]:
    """The state dict of `model`'s base model with `adapter` fused in, under the base model's own names."""
    base_model = model.get_base_model()
    deltas = {}
    with torch.no_grad():
        for prefix, layer in _adapted_layers(base_model, adapter).items():
            for key in _delta_keys(layer, adapter):
                deltas[f"{prefix}.base_layer.{key}"] = _delta(layer, adapter, key)
    state_dict = base_model.state_dict()
    merged = {}
    for key, tensor in state_dict.items():
        name = _base_name(key, adapter, state_dict)
        if name is None:
            continue
        if key in deltas:
            tensor = (tensor.float() + deltas[key].to(tensor.device, torch.float32)).to(tensor.dtype)
        merged[name] = tensor
    return merged


def _adapted_layers(base_model, adapter: str) -> dict:
    """The LoRA layers that carry `adapter`, by module name in `base_model`."""
    from peft.tuners.lora import LoraLayer

    return {
        prefix: layer
        for prefix, layer in base_model.named_modules()
        if isinstance(layer, LoraLayer) and (adapter in layer.lora_A or adapter in layer.lora_embedding_A)
    }


def _delta_keys(layer, adapter: str) -> tuple[str, ...]:
    """What `adapter` changes in a LoRA layer's base layer: its weight, and its bias with `lora_bias`."""
    lora_bias = adapter not in layer.lora_embedding_A and layer.lora_B[adapter].bias is not None
    return ("weight", "bias") if lora_bias else ("weight",)


def _delta(layer, adapter: str, key: str) -> torch.Tensor:
    """What `adapter` adds to a LoRA layer's base `weight` (PEFT's `get_delta_weight`) or `bias` (`lora_bias`: B's
    bias times the scaling, as PEFT computes and merges it)."""
    if key == "weight":
        return layer.get_delta_weight(adapter)
    return layer.lora_B[adapter].bias.detach() * layer.scaling[adapter]


def _base_name(key: str, adapter: str, keys) -> str | None:
    """The name in the base checkpoint of `key`, a tensor of a PEFT model's base model once `adapter` is fused in, or
    None where the fused model has no such tensor: LoRA factors, other adapters' copies of `modules_to_save`, and
    the original module that `adapter`'s copy replaces (`keys`: every key, to tell that case)."""
    parts = key.split(".")
    if any(part.startswith("lora_") for part in parts):
        return None
    if "modules_to_save" in parts:
        i = parts.index("modules_to_save")
        if parts[i + 1] != adapter:
            return None
        parts = parts[:i] + parts[i + 2 :]
    elif "original_module" in parts:
        wrapper = ".".join(parts[: parts.index("original_module")])
        if f"{wrapper}.modules_to_save.{adapter}.{parts[-1]}" in keys:
            return None
        parts.remove("original_module")
    return ".".join(p for p in parts if p != "base_layer")


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether `model`'s weights are quantized (bitsandbytes, GPTQ, ...): transformers marks such a model (a
    `PeftModel` answers for its base model), and its quantized parameters are not floating point."""
    return bool(getattr(model, "is_quantized", False)) or any(not p.is_floating_point() for p in model.parameters())


def recorded_base(model) -> str | None:
    """The base model a PEFT model records: its active adapter's `base_model_name_or_path`, else the config's
    `_name_or_path` (the folder or model id it was loaded from)."""
    config = model.peft_config[model.active_adapter]
    return config.base_model_name_or_path or model.get_base_model().config._name_or_path or None


def safetensors_files(folder: str) -> dict[str, str]:
    """`{tensor name: file}` of a checkpoint folder's safetensors weights (`model.safetensors`, or the shards that
    `model.safetensors.index.json` names); empty when it has neither."""
    from safetensors import safe_open

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


class UnquantizedBase(NamedTuple):
    """A base checkpoint's folder and its safetensors weights: `{tensor name: file}`."""

    folder: str
    files: dict[str, str]


def unquantized_base(model, base_model: str | None = None) -> UnquantizedBase:
    """The unquantized weights of a quantized PEFT model's base, which its fused model is written from: the
    safetensors of `base_model` (a folder, or a model id in the local Hugging Face cache, never downloaded), by
    default of the base the model records (`recorded_base`).

    Raises:
        `MissingFileError`: no such folder or cached model, no safetensors weights in it, or weights that are
            quantized themselves; the message says to pass `base_model=`.
    """
    name = recorded_base(model) if base_model is None else base_model
    folder = name if name and os.path.isdir(name) else _cached_folder(name)
    files = safetensors_files(folder) if folder else {}
    config = os.path.join(folder or "", "config.json")
    if not name:
        why = "the model records no base model"
    elif folder is None:
        why = f"{name!r} is neither a folder nor a model in the local Hugging Face cache"
    elif not files or not all(os.path.isfile(path) for path in files.values()):
        why = f"{folder} has no safetensors weights ({SAFETENSORS}, or all the shards of {SAFETENSORS_INDEX})"
    elif os.path.isfile(config) and "quantization_config" in _read_json(config):
        why = f"the weights in {folder} are quantized themselves (its config.json has a `quantization_config`)"
    else:
        return UnquantizedBase(folder, files)
    raise MissingFileError(
        "`save_merged=True` on a quantized model writes the fused model into the unquantized base's weights, read "
        f"tensor by tensor, but {why}. Pass `base_model=` (`--base` to `exme`): the folder or model id of the "
        "unquantized model the run was quantized from."
    )


def check_fusable(model, adapter: str, base: UnquantizedBase) -> None:
    """Refuse an unquantized base whose tensors are not those of `model`'s base model with `adapter` fused in:
    every parameter must have its tensor in the base, by name, of the same (unquantized) shape."""
    tensors = SafetensorsMapping(base.files)
    parameters = dict(model.get_base_model().named_parameters())
    for key, parameter in parameters.items():
        name = _base_name(key, adapter, parameters)
        if name is None:
            continue
        if name not in tensors:
            raise MissingNameError(
                f"The unquantized base {base.folder} has no tensor `{name}` (the model's `{key}`): it is not the "
                "checkpoint the model was loaded from. Pass `base_model=` (`--base` to `exme`) with that checkpoint."
            )
        state = getattr(parameter, "quant_state", None)  # a bitsandbytes 4-bit weight is packed: its shape is here
        shape = tuple(parameter.shape if state is None else state.shape)
        if tensors.shape(name) != shape:
            raise InputError(
                f"Tensor `{name}` has shape {tensors.shape(name)} in the unquantized base {base.folder} but {shape} "
                "in the model: it is not the checkpoint the model was loaded from."
            )


def save_fused(model, adapter: str, folder: str, base: UnquantizedBase, values: StateDict) -> None:
    """Write `model`'s base model with `adapter` fused in as a plain model folder, from the unquantized base's weights
    (the model's own may be quantized), holding one tensor at a time.

    The base's safetensors files are copied, and each tensor that differs is rewritten in place, in its file's dtype
    (rounded once): an adapted weight (or bias, with `lora_bias`) is the base tensor plus the adapter's delta (PEFT's
    `get_delta_weight`, on the adapter factors, in float32); a tensor in `values` (the candidate's `modules_to_save`
    and biases, by the base model's parameter names) is that tensor, plus a `lora_bias` delta. The config is the
    model's, without its `quantization_config`, in the dtype of most of the base's floating tensors.

    Raises:
        `KeyError`, `ValueError`: a tensor of the model that the base lacks, or has with another shape (named).
    """
    check_fusable(model, adapter, base)
    base_model, tensors = model.get_base_model(), SafetensorsMapping(base.files)
    layers = _adapted_layers(base_model, adapter)
    changed = {_base_name(key, adapter, values): key for key in values}  # name in the base -> key in `values`
    for prefix, layer in layers.items():
        changed.update({f"{prefix}.{k}": changed.get(f"{prefix}.{k}") for k in _delta_keys(layer, adapter)})
    index = os.path.join(base.folder, SAFETENSORS_INDEX)
    for path in sorted({*base.files.values(), *([index] if os.path.isfile(index) else [])}):
        target = os.path.join(folder, os.path.relpath(path, base.folder))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)  # the base's own files are only read
    for path in sorted({base.files[name] for name in changed}):
        start, header = _header(path)
        with open(os.path.join(folder, os.path.relpath(path, base.folder)), "r+b") as f:
            for name in (n for n in changed if base.files[n] == path):
                tensor = (values[changed[name]] if changed[name] else tensors[name]).to("cpu", torch.float32)
                prefix, _, key = name.rpartition(".")
                if prefix in layers:
                    with torch.no_grad():
                        tensor = tensor + _delta(layers[prefix], adapter, key).to("cpu", torch.float32)
                data = tensor.to(tensors.dtype(name)).contiguous().reshape(-1).view(torch.uint8)
                begin, end = header[name]["data_offsets"]
                if data.numel() != end - begin:  # never write over the next tensor's bytes
                    raise InputError(f"`{name}` of the fused model does not fit its place in {path}.")
                f.seek(start + begin)
                f.write(data.numpy().tobytes())
    config = copy.deepcopy(base_model.config)
    config.__dict__.pop("quantization_config", None)
    dtypes = [tensors.dtype(name) for name in tensors if tensors.dtype(name).is_floating_point]
    config.dtype = max(set(dtypes), key=dtypes.count) if dtypes else config.dtype
    config.save_pretrained(folder)
    if base_model.can_generate() and base_model.generation_config is not None:
        base_model.generation_config.save_pretrained(folder)


def _cached_folder(name: str | None) -> str | None:
    """The folder of model id `name` in the local Hugging Face cache (its config.json's), without the network."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.errors import HFValidationError

    try:
        path = try_to_load_from_cache(name, "config.json") if name else None
    except HFValidationError:  # not a model id
        return None
    return os.path.dirname(path) if isinstance(path, str) else None


def _read_json(path: str) -> dict:
    with open(path) as f:
        return json.load(f)


def _header(path: str) -> tuple[int, dict]:
    """Where a safetensors file's data starts, and its header (each tensor's dtype, shape and data offsets)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return 8 + size, json.loads(f.read(size))


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
