"""What makes an output folder portable: the model card (`README.md`, Hugging Face metadata, the table, how to load)
and the chosen model as a mergekit recipe (`mergekit.yml`) that rebuilds it from the original checkpoints."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .files import MERGEKIT_RECIPE, REPORT_JSON, REPORT_PNG
from .markdown import hyper_text, to_markdown

if TYPE_CHECKING:
    from .report import Report

__all__ = ["mergekit_recipe", "model_card"]


def mergekit_recipe(report: Report) -> str | None:
    """The chosen model as a mergekit `task_arithmetic` configuration: `base + sum_i c_i * (checkpoint_i - base)`
    with `normalize: false`, LoRA checkpoints as `base+adapter`. `mergekit-yaml mergekit.yml OUT` on the
    original checkpoints rebuilds the same weights up to rounding. `None` when nothing on the span was chosen."""
    import yaml

    if report.final is None or not report.final.on_span:
        return None
    base = report.sources.get("base_model") or "BASE_MODEL"
    folders = report.sources.get("checkpoints") or [f"checkpoint-{c.step}" for c in report.checkpoints]
    models = [
        {"model": f"{base}+{folder}" if report.sources.get("adapter") else folder, "parameters": {"weight": c}}
        for folder, c in zip(folders, report.final.coefficients, strict=True)
    ]
    recipe = {
        "merge_method": "task_arithmetic",
        "base_model": base,
        "models": models,
        "parameters": {"normalize": False},
        "dtype": "float32",
    }
    replay = f"mergekit-yaml {MERGEKIT_RECIPE} OUTPUT_FOLDER" + (
        " --lora-merge-cache CACHE_FOLDER" if report.sources.get("adapter") else ""  # mergekit fuses adapters there
    )
    header = (
        f"# ExMe's chosen model ({report.final.kind}, {hyper_text(report.final)}) as mergekit task arithmetic:\n"
        "# base + sum_i weight_i * (model_i - base). Replay on the original checkpoints with\n"
        f"#   {replay}\n"
    )
    return header + yaml.safe_dump(recipe, sort_keys=False)


def model_card(report: Report) -> str:
    """`README.md` of the output folder: what the model is, how it was chosen, the table, the figure, how to load
    it, with Hugging Face model-card metadata (`base_model`, `tags: [exme, merge]`, `library_name`)."""
    from huggingface_hub import ModelCardData

    base, adapter, final = report.sources.get("base_model"), report.sources.get("adapter", False), report.final
    hub_id = base if base and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base) else None  # local folders are not ids
    metadata = ModelCardData(
        base_model=hub_id, library_name="peft" if adapter else "transformers", tags=["exme", "merge"]
    )
    steps = ", ".join(f"SFT-{i + 1} = step {c.step}" for i, c in enumerate(report.checkpoints))
    terms = " + ".join(f"{c:.4g} * (SFT-{i + 1} - base)" for i, c in enumerate(final.coefficients or ()))
    load = (
        f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base or "BASE_MODEL"}"), '
        '"path/to/this/folder")'
        if "adapter" in report.saved
        else 'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")'
    )
    imports = "from peft import PeftModel\n" if "adapter" in report.saved else ""
    lines = [
        "---",
        metadata.to_yaml(),
        "---",
        "",
        "# ExMe merge" + (f" of `{base}`" if base else ""),
        "",
        f"This model merges the checkpoints of one fine-tuning run, with exme-callback: they were ranked by "
        f"`{report.metric}` ({steps}), {report.method}; every candidate was evaluated and the best kept "
        f"({final.kind}, {hyper_text(final)}).",
        "",
        f"Weights: `base + {terms}`." if terms else "",
        "",
        *(line for line in to_markdown(report).splitlines()[1:] if not line.startswith("Saved: ")),
        "",
        *([f"![The sweep]({REPORT_PNG})", ""] if report.checkpoints else []),
        "## How to load",
        "",
        "```python",
        f"from transformers import AutoModelForCausalLM\n{imports}{load}",
        "```",
        "",
        *(
            ["`merged/` holds the same model fused into the base weights (a plain transformers model).", ""]
            if "merged" in report.saved
            else []
        ),
        f"`{MERGEKIT_RECIPE}` is the same merge as a mergekit configuration (task arithmetic, "
        f"`normalize: false`; its first lines say how to replay it), `{REPORT_JSON}` every candidate evaluated.",
    ]
    return "\n".join(lines) + "\n"
