"""A finished run on disk: its evaluated checkpoints, ranked from `trainer_state.json`, and the plane over them.

What the `exme` command needs from a `Trainer`/`SFTTrainer` output folder, as library functions:

- `rank_run(run_dir, metric)`: the run's evaluated checkpoints, best first, by a metric of its log history (the
  same ranking as the callback's, `candidates.rank_checkpoints`), and which of them are no longer on disk;
- `load_plane(base, checkpoints)`: the live model (the base, loaded once) and the plane of the checkpoints over it.
  Full checkpoints (`model.safetensors`, sharded with an index) are read tensor by tensor with
  `safetensors.safe_open`, never all at once; LoRA checkpoints (`adapter_model.safetensors`) are adapter-sized.

Nothing is unpickled: a checkpoint with only `pytorch_model.bin` is refused, and `training_args.bin` is never read.
"""

from __future__ import annotations

import glob
import json
import logging
import math
import os
import re
import warnings
from dataclasses import dataclass, field

import torch

from .candidates import Checkpoint, rank_checkpoints
from .errors import InputError, MissingExtraError, MissingFileError, MissingNameError, UnsupportedError
from .io import SAFETENSORS, SAFETENSORS_INDEX, SafetensorsMapping, safetensors_files
from .objective import metric_key
from .planes import Plane, make_plane
from .preflight import check_model
from .snapshots import STATE_DIR, STATE_FILE, trainable_tensors

__all__ = ["LoadedRun", "RankedRun", "base_of", "load_plane", "rank_run", "resolve_metric"]

logger = logging.getLogger(__name__)

CHECKPOINT = re.compile(r"checkpoint-(\d+)$")
FULL, SHARDED, ADAPTER = SAFETENSORS, SAFETENSORS_INDEX, "adapter_model.safetensors"
PICKLES = ("pytorch_model.bin", "pytorch_model.bin.index.json", "adapter_model.bin")


@dataclass
class RankedRun:
    """The evaluated checkpoints of a run, best first, by `metric`.

    `checkpoints` are those still on disk, with their scores from the log history; `folders` maps each step to its
    folder; `missing` lists the steps that ranked among the kept ones but whose folder is gone.
    """

    metric: str
    greater_is_better: bool
    checkpoints: list[Checkpoint]
    folders: dict[int, str]
    missing: list[int] = field(default_factory=list)


def find_checkpoints(run_dir: str) -> dict[int, str]:
    """`{step: folder}` of the `checkpoint-<step>` folders of a run."""
    found = {}
    for path in glob.glob(os.path.join(run_dir, "checkpoint-*")):
        match = CHECKPOINT.search(path)
        if match and os.path.isdir(path):
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def read_trainer_state(run_dir: str) -> dict:
    """The most complete `trainer_state.json` of a run: the run folder's or its latest checkpoint's."""
    candidates = [os.path.join(run_dir, "trainer_state.json")]
    candidates += [os.path.join(f, "trainer_state.json") for f in find_checkpoints(run_dir).values()]
    states = []
    for path in candidates:
        if os.path.isfile(path):
            try:
                with open(path) as f:
                    states.append(json.load(f))
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise InputError(f"{path} is not valid JSON ({error}); the run's history cannot be read.") from None
    if not states:
        raise MissingFileError(
            f"{run_dir} has no trainer_state.json (neither in the folder nor in a checkpoint-* folder): is it a "
            "Trainer output folder? Name the checkpoints with --checkpoint instead."
        )
    return max(states, key=lambda s: (s.get("global_step", 0), len(s.get("log_history", []))))


def resolve_metric(state: dict, metric: str | None = None) -> tuple[str, bool]:
    """The ranking metric's key in the log history and whether greater is better.

    `metric` is looked up with the `eval_` prefix the trainer adds, then as given (`exme/checkpoint/score`, the
    callback's own scores, works too). Without it, the run's `metric_for_best_model` as
    the state records it (the key whose value is `best_metric` at `best_global_step`), else `eval_loss`. The
    direction follows the callback's rule: lower is better for names ending in `loss`.
    """
    history = state.get("log_history", [])
    keys = {key for entry in history for key in entry}
    if metric is None:
        best, step = state.get("best_metric"), state.get("best_global_step")
        recorded = [
            key
            for entry in history
            if entry.get("step") == step and best is not None
            for key, value in entry.items()
            if key.startswith("eval_") and isinstance(value, (int, float)) and value == best
        ]
        metric = recorded[0] if len(set(recorded)) == 1 else "eval_loss"
    # `eval_` first: training logs have a `loss` of their own, and `--metric loss` means the evaluation's.
    name = metric_key(metric, keys)
    if name is None:
        timings = ("_runtime", "_samples_per_second", "_steps_per_second")
        evaluated = sorted(k for k in keys if k.startswith(("eval_", "exme/checkpoint/")) and not k.endswith(timings))
        raise MissingNameError(
            f"--metric: {metric!r} is not in the run's log history; its evaluations have {evaluated or 'no metrics'}."
        )
    return name, not name.endswith("loss")


def rank_run(run_dir: str, metric: str | None = None, keep: int = 2) -> RankedRun:
    """Rank a finished run's evaluated checkpoints by `metric` and keep the best `keep` still on disk.

    Raises:
        `FileNotFoundError`: no run history, or no evaluated checkpoint left on disk.
        `KeyError`: the metric is not in the history.
    """
    state = read_trainer_state(run_dir)
    name, greater_is_better = resolve_metric(state, metric)
    evaluated = [
        Checkpoint(int(entry["step"]), float(entry[name]))
        for entry in state.get("log_history", [])
        if name in entry and "step" in entry and isinstance(entry[name], (int, float)) and math.isfinite(entry[name])
    ]
    folders = find_checkpoints(run_dir)
    ranked = rank_checkpoints([c for c in evaluated if c.step > 0], greater_is_better)
    on_disk = [c for c in ranked if c.step in folders][:keep]
    cutoff = ranked.index(on_disk[-1]) + 1 if len(on_disk) == keep else len(ranked)  # would have been kept
    missing = [c.step for c in ranked[:cutoff] if c.step not in folders]
    if not on_disk:
        raise MissingFileError(
            f"{run_dir}: none of the {len(ranked)} checkpoints evaluated by {name} is on disk "
            f"(checkpoint folders: {sorted(folders) or 'none'}). Save checkpoints at the evaluation steps, or name "
            "them with --checkpoint."
        )
    return RankedRun(name, greater_is_better, on_disk, {c.step: folders[c.step] for c in on_disk}, missing)


def checkpoint_kind(folder: str) -> str:
    """`"full"` (model.safetensors, sharded or not) or `"adapter"` (adapter_model.safetensors).

    Raises:
        `FileNotFoundError`: the folder is missing, holds only pickled weights (refused, with how to convert), or no
            weights at all.
    """
    if not os.path.isdir(folder):
        raise MissingFileError(f"Checkpoint folder {folder} does not exist.")
    if os.path.isfile(os.path.join(folder, ADAPTER)):
        return "adapter"
    if os.path.isfile(os.path.join(folder, FULL)) or os.path.isfile(os.path.join(folder, SHARDED)):
        return "full"
    pickled = [name for name in PICKLES if os.path.isfile(os.path.join(folder, name))]
    if pickled:
        raise MissingFileError(
            f"{folder} holds only pickled weights ({', '.join(pickled)}), which exme never loads (unpickling runs "
            "code). Convert it once, where you trust the file: `AutoModelForCausalLM.from_pretrained(folder)."
            "save_pretrained(folder)` (or `PeftModel...save_pretrained`) writes safetensors."
        )
    raise MissingFileError(f"{folder} has no {FULL}, {SHARDED} or {ADAPTER}: not a checkpoint folder.")


def base_of(folder: str) -> str | None:
    """The base model a checkpoint records: `base_model_name_or_path` of an adapter, `_name_or_path` of a config
    (transformers before v5 writes it), or the base `ExMeCallback` recorded in the checkpoint's ExMe state."""
    for name, key in (
        ("adapter_config.json", "base_model_name_or_path"),
        ("config.json", "_name_or_path"),
        (os.path.join(STATE_DIR, STATE_FILE), "info"),
    ):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            with open(path) as f:
                value = json.load(f).get(key)
            if isinstance(value, dict):
                value = value.get("base_model")
            if value:
                return value
    return None


def _full_tensors(folder: str) -> SafetensorsMapping:
    """A checkpoint's tensors as a mapping that reads one tensor per access."""
    return SafetensorsMapping(safetensors_files(folder))


@dataclass
class LoadedRun:
    """The live model (the base, loaded from `base`), its tokenizer, and the plane of the checkpoints over it."""

    model: torch.nn.Module
    tokenizer: object
    plane: Plane
    adapter: bool
    base: str


def _load_base(base: str, model_class, dtype: torch.dtype | None, device: str, quantization=None):
    """The base model, from a model id or folder (a folder holding one GGUF file and no config is read with it),
    quantized on loading with a `quantization` config (bitsandbytes)."""
    kwargs = {"dtype": dtype or "auto"}
    if os.path.isdir(base) and not os.path.isfile(os.path.join(base, "config.json")):
        ggufs = sorted(glob.glob(os.path.join(base, "*.gguf")))
        if len(ggufs) == 1:
            kwargs = {"gguf_file": os.path.basename(ggufs[0]), "dtype": dtype or torch.float32}
    if quantization is not None:
        if "gguf_file" in kwargs:
            raise UnsupportedError(f"--load-in-4bit/--load-in-8bit: {base} is a GGUF file; give a safetensors base.")
        kwargs.update(quantization_config=quantization, device_map={"": device})  # placed on loading
    try:
        model = model_class.from_pretrained(base, **kwargs)
    except OSError as error:
        raise MissingFileError(
            f"--base: cannot load {base!r} offline ({str(error).splitlines()[0]}). Give a local folder, or a model id "
            "already in the Hugging Face cache."
        ) from None
    if "gguf_file" in kwargs:
        # transformers dequantizes GGUF weights to plain tensors but leaves its quantizer marker on the model.
        model.hf_quantizer, model.is_quantized = None, False
        model.config.__dict__.pop("quantization_config", None)
    return (model if quantization is not None else model.to(device)), kwargs.get("gguf_file")


def _quantization(load_in_4bit: bool, load_in_8bit: bool, dtype: torch.dtype | None):
    """The bitsandbytes config of `--load-in-4bit` (NF4, QLoRA's data type, computing in `dtype`, else float32) or
    `--load-in-8bit`; None for neither."""
    if load_in_4bit and load_in_8bit:
        raise InputError("Give one of `load_in_4bit` and `load_in_8bit`, not both.")
    if not (load_in_4bit or load_in_8bit):
        return None
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        message = "Loading the base in 4 or 8 bits needs bitsandbytes: pip install bitsandbytes"
        raise MissingExtraError(message) from None
    from transformers import BitsAndBytesConfig

    if load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype or torch.float32
    )


def _tokenizer(base: str, folders: list[str], gguf_file: str | None):
    """The checkpoints' tokenizer (the trainer saves its processing class into each), else the base's, else None."""
    from transformers import AutoTokenizer

    for folder in folders:
        if os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
            return AutoTokenizer.from_pretrained(folder)
    try:
        return AutoTokenizer.from_pretrained(base, gguf_file=gguf_file)
    except (OSError, ValueError):  # no tokenizer files: only scoring needs one, and it says so
        return None


def load_plane(
    base: str | None,
    folders: list[str],
    *,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    save_merged: bool = False,
    load_in_4bit: bool = False,
    load_in_8bit: bool = False,
) -> LoadedRun:
    """Load the base model once and build the plane of the checkpoints in `folders` (best first) over it.

    Memory: one model, plus a CPU copy of its trainable tensors at the base (exact, in their dtype); full
    checkpoints stay on disk and are read one tensor at a time, LoRA checkpoints are held (adapter-sized).

    Args:
        base (`str`, *optional*): a model id or folder; defaults to the base the first checkpoint records.
        folders (`list[str]`): checkpoint folders, all full or all LoRA adapters of the same configuration.
        dtype (`torch.dtype`, *optional*): the live model's dtype; defaults to the checkpoint's own.
        device (`str`, *optional*, defaults to `"cpu"`): where the live model runs.
        save_merged (`bool`, *optional*, defaults to `False`): LoRA: the plane also saves the fused model.
        load_in_4bit (`bool`, *optional*, defaults to `False`): LoRA: load the base quantized to 4 bits (NF4, with
            bitsandbytes), as a QLoRA run trained it; by default it is loaded unquantized. The fused model is
            written from the unquantized base's weights all the same.
        load_in_8bit (`bool`, *optional*, defaults to `False`): LoRA: load the base quantized to 8 bits.

    Raises:
        `FileNotFoundError`: a missing or pickled-only checkpoint, or a base that cannot be loaded offline.
        `ValueError`: checkpoints of different kinds, architectures or tensor shapes.
    """
    import transformers

    kinds = {folder: checkpoint_kind(folder) for folder in folders}
    if len(set(kinds.values())) > 1:
        raise InputError(f"The checkpoints mix full models and LoRA adapters: {kinds}. Give checkpoints of one run.")
    adapter = kinds[folders[0]] == "adapter"
    quantization = _quantization(load_in_4bit, load_in_8bit, dtype)
    if quantization is not None and not adapter:
        raise InputError("--load-in-4bit/--load-in-8bit are for LoRA checkpoints: full checkpoints are blended whole.")
    base = base or base_of(folders[0])
    if base is None:
        raise InputError(f"{folders[0]} does not record its base model: give it with --base.")
    if adapter:
        model_class = transformers.AutoModelForCausalLM
    else:
        with open(os.path.join(folders[0], "config.json")) as f:
            architectures = json.load(f).get("architectures") or ["AutoModelForCausalLM"]
        model_class = getattr(transformers, architectures[0], transformers.AutoModelForCausalLM)
    model, gguf_file = _load_base(base, model_class, dtype, device, quantization)
    tokenizer = _tokenizer(base, folders, gguf_file)
    if adapter:
        model, base_tensors, checkpoints = _adapters(model, folders)
    else:
        model.requires_grad_(True)
        base_tensors = {n: t.detach().to("cpu", copy=True) for n, t in trainable_tensors(model).items()}
        checkpoints = [_full_tensors(folder) for folder in folders]
        for folder, tensors in zip(folders, checkpoints, strict=True):
            for name, tensor in base_tensors.items():
                if name not in tensors:
                    raise InputError(
                        f"{folder} has no tensor `{name}` of the base model {base}: they are different "
                        "architectures (or the checkpoint is incomplete)."
                    )
                if tensors.shape(name) != tuple(tensor.shape):
                    raise InputError(
                        f"{folder}: tensor `{name}` has shape {tensors.shape(name)} but {tuple(tensor.shape)} in "
                        f"the base model {base}: they are different architectures."
                    )
    check_model(model, save_merged=save_merged, base_model=base)
    plane = make_plane(model, base_tensors, checkpoints, base_tensors, save_merged=save_merged, base_model=base)
    return LoadedRun(model, tokenizer, plane, adapter, base)


def _adapters(model, folders: list[str]):
    """The LoRA run's model (a fresh adapter of the checkpoints' configuration: the base has `B = 0`) and the
    trainable tensors of the base and of each checkpoint."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from peft.utils import load_peft_weights

    configs = [LoraConfig.from_pretrained(folder) for folder in folders]
    shape = ("r", "lora_alpha", "target_modules", "modules_to_save", "use_dora", "use_rslora", "bias")
    for folder, config in zip(folders[1:], configs[1:], strict=True):
        differ = [key for key in shape if getattr(config, key) != getattr(configs[0], key)]
        if differ:
            raise InputError(
                f"{folder}'s adapter differs from {folders[0]}'s in {differ}: not checkpoints of one run."
            )
    if configs[0].init_lora_weights not in (True, False, "gaussian"):
        raise InputError(
            f"{folders[0]}: adapters initialized with {configs[0].init_lora_weights!r} start from a non-zero adapter "
            "that changes the base weights; the start is not in the checkpoints. Use the callback during training."
        )
    configs[0].inference_mode = False  # saved adapters say True; the plane works on trainable tensors
    with warnings.catch_warnings():  # PEFT reads transformers' deprecated `is_gradient_checkpointing`
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = get_peft_model(model, configs[0])

    def snapshot() -> dict[str, torch.Tensor]:
        return {n: t.detach().to("cpu", copy=True) for n, t in trainable_tensors(model).items()}

    base = snapshot()  # a fresh adapter, B = 0: the base model itself
    checkpoints = []
    for folder in folders:
        try:  # PEFT reads the safetensors file (checked present) and maps its names to this model's
            result = set_peft_model_state_dict(model, load_peft_weights(folder, device="cpu"))
        except RuntimeError as error:  # a size mismatch
            raise InputError(f"{folder}: {str(error).splitlines()[0]}") from None
        if result.unexpected_keys:
            raise InputError(f"{folder} has tensors the adapter does not: {result.unexpected_keys[:3]} ...")
        checkpoints.append(snapshot())
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name in base:
                parameter.copy_(base[name])
    return model, base, checkpoints
