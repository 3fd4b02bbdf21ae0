r"""PEFT glue: the ExMe plane of a LoRA run, exactly, as one adapter of rank r1 + r2.

For an adapted module with scaling `s`, checkpoint `i` (factors `A_i`, `B_i`) changes the weight by
`d_i = s * B_i @ A_i`. The candidate `(c1, c2)` is `W + c1 * d1 + c2 * d2`, and

```
c1 * s * B1 @ A1 + c2 * s * B2 @ A2 = [B1, B2] @ [c1 * s * A1; c2 * s * A2]
```

is one LoRA adapter of rank `r1 + r2` with scaling 1: the B factors side by side, the A factors stacked with their
coefficients. The sweep adds that adapter (named `"exme"`) once, activates it in place of the trained adapter, and
switches candidates by rewriting its A factors: adapter-sized work that never touches the base weights. Blending
the A and B factors of the checkpoints separately would not be this model (`(B1 + B2)(A1 + A2) != B1 A1 + B2 A2`).

When the starting adapter is not zero (PiSSA, OLoRA and other initializations that set `B != 0`), a third block
with coefficient `1 - c1 - c2` carries it, so the candidate is still `base + c1 * d1 + c2 * d2` exactly.

DoRA is not linear in its scale (it renormalizes the weight), so DoRA modules fall back to dense effective weights:
`W_i` is the module's weight with checkpoint `i`'s adapter merged in (by PEFT), and the candidate weight
`W_0 + c1 * (W_1 - W_0) + c2 * (W_2 - W_0)` is written into the base layer, which is restored afterwards. This
keeps three dense copies of every DoRA-adapted weight in memory, and the result is saved as a fused model.

Trainable tensors outside the adapter factors (`modules_to_save`, biases, trainable tokens) are dense deltas,
combined as in full fine-tuning into the `"exme"` adapter's own copies (biases, which adapters share, in place).
"""

from __future__ import annotations

import os
import shutil

import torch

from .arithmetic import StateDict, combine

__all__ = ["LoraPlane", "check_peft_model", "is_peft_model"]

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
        raise NotImplementedError(
            "ExMeCallback supports PEFT through `peft.PeftModel` (`get_peft_model(model, LoraConfig(...))`, or "
            "`SFTTrainer(..., peft_config=...)`), not adapters added with `model.add_adapter`."
        )
    config = model.peft_config[model.active_adapter]
    if config.peft_type != PeftType.LORA:
        raise NotImplementedError(
            f"ExMeCallback supports LoRA among PEFT methods, got {config.peft_type.value}; use a `LoraConfig`."
        )
    if getattr(config, "target_parameters", None):
        raise NotImplementedError("ExMeCallback does not support LoRA on `target_parameters`; use `target_modules`.")


class LoraPlane:
    """The candidates of a LoRA run, written into one live adapter of rank `r1 + r2` (see the module docstring).

    Creating it adds the `"exme"` adapter and activates it; `apply(c1, c2)` makes the model compute
    `theta(c1, c2)`; `close()` puts the trained adapter back as the active one and removes `"exme"`.

    Args:
        model (`peft.PeftModel`): the model whose active adapter was trained.
        base, sft1, sft2 (`Mapping[str, torch.Tensor]`): trainable tensors at the start and at the two checkpoints.
        trained (`Mapping[str, torch.Tensor]`): trainable tensors at the end of training, restored by `close()`.
    """

    def __init__(self, model, base: StateDict, sft1: StateDict, sft2: StateDict, trained: StateDict):
        from peft.tuners.lora import LoraLayer

        self.model, self.trained = model, trained
        self.adapter = model.active_adapter
        config = model.peft_config[self.adapter]
        layers = {
            prefix: layer
            for prefix, layer in model.named_modules()
            if isinstance(layer, LoraLayer)
            and (self.adapter in layer.lora_A or self.adapter in layer.lora_embedding_A)
        }
        dora = {prefix: layer for prefix, layer in layers.items() if layer.use_dora.get(self.adapter, False)}
        layers = {prefix: layer for prefix, layer in layers.items() if prefix not in dora}
        factor_names = {
            name for prefix, layer in {**layers, **dora}.items() for name in _factor_names(prefix, layer, self.adapter)
        }
        factor_names |= {f"{prefix}.lora_magnitude_vector.{self.adapter}.weight" for prefix in dora}
        self.exact_adapter = not dora  # whether `save_adapter` can save the candidate as a LoRA adapter

        # The plane's points, per block: each checkpoint, and the starting adapter when it is not zero.
        points = [sft1, sft2]
        if any(torch.count_nonzero(base[_factor_names(p, m, self.adapter)[1]]) for p, m in layers.items()):
            points.append(base)
        self._points = points

        # DoRA modules: dense effective weights of the three points, computed before anything else changes.
        parameters = dict(model.named_parameters())
        effective = [_effective_weights(dora, self.adapter, point, parameters) for point in (base, sft1, sft2)]
        _load(parameters, trained)
        self._originals = {
            f"{prefix}.base_layer.weight": layer.get_base_layer().weight.detach().to("cpu", copy=True)
            for prefix, layer in dora.items()
        }

        self._requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
        self._dense: dict[str, torch.Tensor] = {}  # live dense tensors, by their name in the snapshots
        model.add_adapter(EXME_ADAPTER, _block_config(config, len(points)))
        try:
            model.set_adapter(EXME_ADAPTER)
            self._restore_requires_grad()
            self._factors = self._write_b_blocks(layers)
            self._dense_points = self._match_dense(factor_names, base, sft1, sft2, trained, effective)
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

    def _match_dense(self, factor_names, base, sft1, sft2, trained, effective) -> list[dict[str, torch.Tensor]]:
        """Find the live tensor of every dense entry; return the dense parts of the plane's three points."""
        parameters = dict(self.model.named_parameters())
        for name in base:
            if name not in factor_names:
                # The exme adapter's own copy when the tensor is per adapter, else the shared tensor (a bias).
                target = _rename_adapter(name, self.adapter, EXME_ADAPTER)
                if target == name:
                    self._originals[name] = trained[name]
                self._dense[name] = parameters[target].data
        points = [{name: point[name] for name in self._dense} for point in (base, sft1, sft2)]
        for name in self._originals.keys() - self._dense.keys():  # DoRA weights, written into the base layer
            self._dense[name] = parameters[name].data
            for point, effective_weights in zip(points, effective):
                point[name] = effective_weights[name]
        return points

    def apply(self, c1: float, c2: float) -> None:
        """Make the model compute `base + c1 * d1 + c2 * d2`."""
        coefficients = (c1, c2, 1.0 - c1 - c2)[: len(self._points)]
        with torch.no_grad():
            for scaling, a_name, bias_name, live_a, live_bias in self._factors:
                blocks = [
                    point[a_name].to(live_a.device, torch.float32) * (c * scaling)
                    for point, c in zip(self._points, coefficients)
                ]
                live_a.copy_(torch.cat(blocks, dim=0))
                if live_bias is not None:
                    biases = [
                        p[bias_name].to(live_bias.device, torch.float32) * (c * scaling)
                        for p, c in zip(self._points, coefficients)
                    ]
                    live_bias.copy_(torch.stack(biases).sum(0))
            combine(*self._dense_points, c1, c2, out=self._dense)

    def close(self, keep: bool = False) -> None:
        """Restore the trained adapter (active, with its tensors and trainability) and remove `"exme"`.

        With `keep=True` the `"exme"` adapter stays loaded and active (the shared dense tensors hold the chosen
        candidate); the trained adapter stays loaded beside it.
        """
        if keep:
            return
        with torch.no_grad():
            for name, tensor in self._originals.items():
                if name in self._dense:  # absent only when `__init__` failed before writing it
                    self._dense[name].copy_(tensor)
        self.model.set_adapter(self.adapter)
        self.model.delete_adapter(EXME_ADAPTER)
        self._restore_requires_grad()

    def save_adapter(self, folder: str) -> None:
        """Save the current candidate as a PEFT adapter folder (rank `r1 + r2`, scaling 1)."""
        if not self.exact_adapter:
            raise ValueError("A DoRA candidate is dense effective weights, not a LoRA adapter: use `save_merged`.")
        staging = os.path.join(folder, ".adapter")
        config = self.model.peft_config[EXME_ADAPTER]
        config.bias = self.model.peft_config[self.adapter].bias  # so the candidate's biases are saved too
        try:
            self.model.save_pretrained(staging, selected_adapters=[EXME_ADAPTER])
        finally:
            config.bias = "none"
        source = os.path.join(staging, EXME_ADAPTER)  # PEFT writes adapters other than "default" to a subfolder
        for entry in os.listdir(source):
            os.replace(os.path.join(source, entry), os.path.join(folder, entry))
        shutil.rmtree(staging)

    def save_merged(self, folder: str) -> None:
        """Save the current candidate fused into the base weights, as a plain transformers model."""
        base_model = self.model.get_base_model()
        base_model.save_pretrained(folder, state_dict=merged_state_dict(self.model, EXME_ADAPTER))

    def _restore_requires_grad(self) -> None:
        for name, parameter in self.model.named_parameters():
            parameter.requires_grad_(self._requires_grad.get(name, False))


def merged_state_dict(model, adapter: str) -> dict[str, torch.Tensor]:
    """The state dict of `model`'s base model with `adapter` fused in, under the base model's own names."""
    from peft.tuners.lora import LoraLayer

    base_model = model.get_base_model()
    deltas = {}
    for prefix, layer in base_model.named_modules():
        if isinstance(layer, LoraLayer) and (adapter in layer.lora_A or adapter in layer.lora_embedding_A):
            with torch.no_grad():
                deltas[f"{prefix}.base_layer.weight"] = layer.get_delta_weight(adapter)
    merged = {}
    for key, tensor in base_model.state_dict().items():
        parts = key.split(".")
        if any(part.startswith("lora_") for part in parts):
            continue
        if "modules_to_save" in parts:
            i = parts.index("modules_to_save")
            if parts[i + 1] != adapter:
                continue
            parts = parts[:i] + parts[i + 2 :]
        elif "original_module" in parts:
            wrapper = ".".join(parts[: parts.index("original_module")])
            if f"{wrapper}.modules_to_save.{adapter}.{parts[-1]}" in base_model.state_dict():
                continue
            parts.remove("original_module")
        if key in deltas:
            tensor = (tensor.float() + deltas[key].to(tensor.device, torch.float32)).to(tensor.dtype)
        merged[".".join(p for p in parts if p != "base_layer")] = tensor
    return merged


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
    """Each DoRA module's weight with `tensors` loaded into its adapter and merged by PEFT (on the CPU)."""
    _load(parameters, tensors)
    weights = {}
    for prefix, layer in dora.items():
        weight = layer.get_base_layer().weight
        original = weight.detach().clone()
        layer.merge(adapter_names=[adapter])
        weights[f"{prefix}.base_layer.weight"] = weight.detach().to("cpu", copy=True)
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
