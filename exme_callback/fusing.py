"""A LoRA candidate fused into its base model's weights: in memory for an unquantized base (`merged_state_dict`),
and for a quantized one (QLoRA: bitsandbytes 4-bit or 8-bit) from the unquantized base's safetensors files, one
tensor at a time (`save_fused`), since a quantized weight's values are codes, not numbers to add a delta to.

The adapter's delta of each adapted weight is PEFT's `get_delta_weight` (and, with `lora_bias`, B's bias times the
scaling), computed in float32 and rounded once to the base tensor's dtype. Names map exactly from the PEFT model's
to the base checkpoint's: a tensor the base lacks, or has with another shape, is an error that names it.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from typing import NamedTuple

import torch

from .errors import InputError, MissingFileError, MissingNameError
from .io import SAFETENSORS, SAFETENSORS_INDEX, SafetensorsMapping, read_header, safetensors_files
from .span import StateDict

__all__ = [
    "UnquantizedBase",
    "adapted_layers",
    "check_fusable",
    "is_quantized",
    "merged_state_dict",
    "recorded_base",
    "save_fused",
    "unquantized_base",
]


def merged_state_dict(model, adapter: str) -> dict[str, torch.Tensor]:
    """The state dict of `model`'s base model with `adapter` fused in, under the base model's own names."""
    base_model = model.get_base_model()
    deltas = {}
    with torch.no_grad():
        for prefix, layer in adapted_layers(base_model, adapter).items():
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


def adapted_layers(base_model, adapter: str) -> dict:
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
    layers = adapted_layers(base_model, adapter)
    changed = {_base_name(key, adapter, values): key for key in values}  # name in the base -> key in `values`
    for prefix, layer in layers.items():
        changed.update({f"{prefix}.{k}": changed.get(f"{prefix}.{k}") for k in _delta_keys(layer, adapter)})
    index = os.path.join(base.folder, SAFETENSORS_INDEX)
    for path in sorted({*base.files.values(), *([index] if os.path.isfile(index) else [])}):
        target = os.path.join(folder, os.path.relpath(path, base.folder))
        os.makedirs(os.path.dirname(target), exist_ok=True)
        shutil.copyfile(path, target)  # the base's own files are only read
    for path in sorted({base.files[name] for name in changed}):
        start, header = read_header(path)
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
