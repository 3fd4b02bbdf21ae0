"""What a finished sweep leaves behind: `exme_report.json`, the paper-style table in `exme_report.md`, the sweep's
figure `exme_sweep.png`, a model card (`README.md`) and the same merge as a mergekit recipe (`mergekit.yml`)."""

from __future__ import annotations

import json
import math
import os
import re
import textwrap
from collections.abc import Sequence
from dataclasses import dataclass, field

from .kinship import METRICS as KINSHIP
from .scoring import metric_key
from .search import Candidate, Checkpoint, best

__all__ = ["Report"]

REPORT_JSON = "exme_report.json"
REPORT_MD = "exme_report.md"
REPORT_PNG = "exme_sweep.png"
MODEL_CARD = "README.md"
MERGEKIT_RECIPE = "mergekit.yml"


@dataclass
class Report:
    """Everything a sweep found, in the form `exme_report.json` stores it.

    `columns` are the metrics the selection score averages, `heldout_columns` those of the report evaluator's
    score (`heldout_metric`), when there is one. `sources` names what the model card and the mergekit recipe
    refer to: `base_model` (an id or folder), `checkpoints` (the kept checkpoints' folders, best first) and
    `adapter` (whether they are LoRA adapters).
    """

    metric: str
    greater_is_better: bool
    checkpoints: list[Checkpoint]
    candidates: list[Candidate]
    final: Candidate | None  # None when the sweep failed before choosing
    alphas: Sequence[float]
    betas: Sequence[float]
    choose_from: str
    base: Candidate | None = None
    columns: list[str] = field(default_factory=list)
    heldout_metric: str | None = None
    heldout_greater_is_better: bool = True
    heldout_columns: list[str] = field(default_factory=list)
    saved: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # why the sweep stopped, when it failed
    sources: dict = field(default_factory=dict)
    kinship: dict = field(default_factory=dict)  # {"checkpoints": {metric: k x k}, "pairs": [{...}, ...]}
    strategy: str = "exme"
    confidence: float = 0.95  # the level of the gains' intervals (`Candidate.interval`)
    min_gain: float | str | None = None  # the choice's threshold over the best checkpoint, if any
    search: str = "grid"  # how each stage of the ExMe search was scored: "grid" or "racing"
    item_evaluations: int | None = None  # items scored by the search (per-item evaluations only)
    grid_item_evaluations: int | None = None  # what the full grid scores: every candidate on every item

    @property
    def best_sft(self) -> Candidate | None:
        return best(self.candidates, self.greater_is_better, kinds=("sft",))

    @property
    def best_exme(self) -> Candidate | None:
        return best(self.candidates, self.greater_is_better, kinds=("exme",))

    def summary(self) -> tuple[str, dict[str, float]]:
        """One line saying what was chosen and what it gained over the best checkpoint, and the same as scalar logs
        under `exme/` keys (`exme/score`, `exme/c1`, ..., `exme/gain`, ...)."""
        reference, final = self.best_sft, self.final
        coefficients = {f"c{i + 1}": c for i, c in enumerate(final.coefficients or ())}  # none off the span
        logs = {"exme/score": final.score, **{f"exme/{name}": c for name, c in coefficients.items()}}
        terms = ", ".join(f"{name}={c:.4g}" for name, c in coefficients.items()) or _hyper(final)
        message = f"ExMe: chose {final.kind} ({terms}), {self.metric}={final.score:.6g}"
        if reference is not None:
            logs["exme/best_sft_score"] = reference.score
            logs["exme/gain"] = (final.score - reference.score) * (1 if self.greater_is_better else -1)
            message += f"; best checkpoint {reference.score:.6g}, gain {logs['exme/gain']:+.6g}"
        if self.best_exme is not None:
            logs["exme/best_exme_score"] = self.best_exme.score
        return message, logs

    def rows(self) -> list[tuple[str, Candidate]]:
        """The rows of the ExMe paper's Table 1: Base, SFT-1, SFT-2, the baselines (best of each), EXPO-1, EXPO-2
        (best alpha each), the best ExMe merge and the chosen model. Rows without a candidate are left out."""
        gib = self.greater_is_better
        sft, expo = [], []
        k = len(self.checkpoints)
        for i, step in enumerate(c.step for c in self.checkpoints):
            on_i = [
                c
                for c in self.candidates
                if c.on_span and c.step(i) == step and all(c.coefficient(j) == 0.0 for j in range(k) if j != i)
            ]
            sft.append((f"SFT-{i + 1}", next((c for c in on_i if c.kind == "sft"), None)))
            expo.append((f"EXPO-{i + 1}", best(on_i, gib, kinds=("expo",))))
        baselines = [(label, best(self.candidates, gib, kinds=(kind,))) for kind, label in _BASELINES.items()]
        strategies = [(label, best(self.candidates, gib, kinds=(kind,))) for kind, label in _STRATEGIES.items()]
        rows = [("Base", self.base), *sft, *baselines, *expo, *strategies]
        if self.final is not None:
            rows.append((f"Chosen ({self.final.kind})", self.final))
        return [(label, c) for label, c in rows if c is not None]

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "greater_is_better": self.greater_is_better,
            "columns": list(self.columns),
            "heldout_metric": self.heldout_metric,
            "heldout_greater_is_better": self.heldout_greater_is_better,
            "heldout_columns": list(self.heldout_columns),
            "alphas": list(self.alphas),
            "betas": list(self.betas),
            "choose_from": self.choose_from,
            "base": None if self.base is None else self.base.to_dict(),
            "checkpoints": [{"step": c.step, "score": c.score} for c in self.checkpoints],
            "candidates": [c.to_dict() for c in self.candidates],
            "best_exme": None if self.best_exme is None else self.best_exme.to_dict(),
            "final": None if self.final is None else self.final.to_dict(),
            "saved": dict(self.saved),
            "error": self.error,
            "sources": dict(self.sources),
            "kinship": dict(self.kinship),
            "strategy": self.strategy,
            "confidence": self.confidence,
            "min_gain": self.min_gain,
            "search": self.search,
            "item_evaluations": self.item_evaluations,
            "grid_item_evaluations": self.grid_item_evaluations,
        }

    def to_markdown(self) -> str:
        """The paper-style table: per-metric values, the selection score and, with a report evaluator, the held-out
        score, each with its gain over the best SFT checkpoint."""
        reference = self.best_sft
        heldout = self.heldout_metric is not None
        lines = [
            "# ExMe report",
            "",
            f"Selection score: `{self.metric}` ({_better(self.greater_is_better)} is better).",
            *(
                [
                    f"Held-out score: `{self.heldout_metric}` ({_better(self.heldout_greater_is_better)} is better), "
                    "from the report evaluator, on data that chose nothing."
                ]
                if heldout
                else []
            ),
            "Gains (Δ) are against the best SFT checkpoint, positive when better.",
            *self._interval_lines(),
            "",
            *(
                [f"**The sweep failed** after {len(self.candidates)} candidates: {self.error}", ""]
                if self.error
                else []
            ),
        ]
        # One metric is the score itself: no column of its own.
        columns = self.columns if len(self.columns) > 1 else []
        heldout_columns = self.heldout_columns if len(self.heldout_columns) > 1 else []
        k = max(2, len(self.checkpoints))
        header = ["model", "hyper-parameters", *(f"c{i + 1}" for i in range(k)), *columns, "selection", "Δ selection"]
        if heldout:
            header += [f"held-out {c}" for c in heldout_columns] + ["held-out", "Δ held-out"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
        for label, c in self.rows():
            cells = [label, _hyper(c), *(_number(c.coefficient(i)) for i in range(k))]
            cells += [_number(_metric(c.metrics, name)) for name in columns]
            gain = _gain(c.score, reference and reference.score, self.greater_is_better)
            cells += [_number(c.score), gain + _interval(c.interval)]
            if heldout:
                cells += [_number(_metric(c.heldout_metrics, name)) for name in heldout_columns]
                ref = reference and reference.heldout_score
                gain = _gain(c.heldout_score, ref, self.heldout_greater_is_better)
                cells += [_number(c.heldout_score), gain + _interval(c.heldout_interval)]
            lines.append("| " + " | ".join(cells) + " |")
        skipped = [c for c in self.candidates if not c.valid]
        if skipped:
            lines += ["", "Skipped candidates (never chosen):", ""]
            lines += [f"- {c.kind} {_hyper(c)} ({_coefficients(c)}): {c.error}" for c in skipped]
        lines += self._kinship_lines() + self._generation_lines()
        if self.saved:
            lines += ["", "Saved: " + ", ".join(f"{k} in `{v}`" for k, v in self.saved.items()) + "."]
        return "\n".join(lines) + "\n"

    def _interval_lines(self) -> list[str]:
        """How to read the intervals in brackets, or why there are none."""
        scores = [("selection", "interval")] + ([("held-out", "heldout_interval")] if self.heldout_metric else [])
        lines = []
        for name, attribute in scores:
            if any(getattr(c, attribute) is not None for _, c in self.rows()):
                lines.append(
                    f"[low, high] after a {name} gain: its {self.confidence:.0%} confidence interval (paired "
                    "bootstrap over the evaluation's items, seeded); a gain whose interval contains 0 is within the "
                    "noise."
                )
            else:
                lines.append(
                    f"No confidence interval for the {name} gains: the evaluator gave aggregate scores only (return "
                    "per-item scores, as `LMEvalEvaluator` does, to get them)."
                )
        if self.search == "racing" and self.item_evaluations:
            stopped = sum(1 for c in self.candidates if (c.error or "").startswith("stopped by racing"))
            lines.append(
                f"Racing: {self.item_evaluations:,} item evaluations, against {self.grid_item_evaluations:,} for the "
                f"grid ({self.grid_item_evaluations / self.item_evaluations:.1f}x fewer); {stopped} candidates "
                "stopped early, below the leader."
            )
        if self.min_gain is not None:
            rule = "above zero" if self.min_gain == "significant" else f"above {self.min_gain:g}"
            lines.append(f"Chosen with `min_gain={self.min_gain!r}`: a candidate only if its gain is {rule}.")
        return lines

    def _generation_lines(self) -> list[str]:
        """Top-k greedy merging: each merge with its generation, parents, their kinship and its score."""
        merges = [c for c in self.candidates if c.kind == "topk"]
        if not merges:
            return []
        labels = {id(c): f"SFT-{i + 1}" for i, c in enumerate(c for c in self.candidates if c.kind == "sft")}
        lines = ["", "Top-k greedy merging, by generation (merge #n is the n-th merge):", ""]
        lines += ["| merge | generation | parents | kinship | selection |", "|---:|---:|---|---:|---:|"]
        for n, c in enumerate(merges, start=1):
            labels[id(c)] = f"#{n}"
            parents = " + ".join(labels[id(self.candidates[i])] for i in c.parents)
            explored = " (exploration)" if c.hyper.get("exploration") else ""
            cells = [f"#{n}", f"{c.hyper['generation']:g}", parents + explored, _number(c.hyper["kinship"])]
            lines.append("| " + " | ".join([*cells, _number(c.score)]) + " |")
        return lines

    def _kinship_lines(self) -> list[str]:
        """Model kinship of the kept checkpoints and of each merged pair (Pearson, cosine, Euclidean distance of
        their task vectors)."""
        pairs = self.kinship.get("pairs", [])
        if not pairs:
            return []
        lines = ["", "Model kinship of the merged models' task vectors (Hu et al. 2024):", ""]
        lines += ["| models | pearson | cosine | euclidean |", "|---|---:|---:|---:|"]
        for pair in pairs:
            lines.append(f"| {pair['models']} | " + " | ".join(_number(pair[m]) for m in KINSHIP) + " |")
        return lines

    def plot(self, path: str) -> None:
        """The sweep's figure (the ExMe paper's Figures 5 and 6): score against alpha for each checkpoint, and
        score against beta, with the SFT and EXPO scores as reference lines, and error bars from the gains'
        confidence intervals where there are per-item scores."""
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt

        fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
        # A score that averages several metrics has a long name: the axes say "selection score", the title says which.
        ylabel = self.metric if len(self.metric) <= 40 else "selection score"
        if ylabel != self.metric:
            fig.suptitle(textwrap.fill(f"selection score = {self.metric}", 120), fontsize=8)
        rows = dict(self.rows())
        for i, color in zip(range(len(self.checkpoints)), ("tab:blue", "tab:orange")):
            alpha = ("alpha1", "alpha2")[i]
            expo = [c for c in self.candidates if c.kind == "expo" and c.valid and getattr(c, alpha) is not None]
            expo.sort(key=lambda c: getattr(c, alpha))
            if expo:
                x = [getattr(c, alpha) for c in expo]
                left.errorbar(x, *self._with_errors(expo), marker="o", capsize=3, color=color, label=f"EXPO-{i + 1}")
            if f"SFT-{i + 1}" in rows:
                left.axhline(rows[f"SFT-{i + 1}"].score, color=color, linestyle="--", label=f"SFT-{i + 1}")
        left.set(xlabel="alpha", ylabel=ylabel, title="Extrapolation (EXPO)")
        left.legend()
        merges = sorted((c for c in self.candidates if c.kind == "exme" and c.valid), key=lambda c: c.beta)
        if merges:
            x = [c.beta for c in merges]
            right.errorbar(x, *self._with_errors(merges), marker="o", capsize=3, color="tab:green", label="ExMe")
        mixups = sorted((c.hyper["lambda"], c.score) for c in self.candidates if c.kind == "mixup" and c.valid)
        if mixups:
            right.plot(*zip(*mixups), marker="s", linestyle="none", color="tab:purple", label="M^3 draws")
        for i, color in zip(range(len(self.checkpoints)), ("tab:blue", "tab:orange")):
            if f"EXPO-{i + 1}" in rows:
                right.axhline(rows[f"EXPO-{i + 1}"].score, color=color, linestyle=":", label=f"EXPO-{i + 1}")
        if self.best_sft is not None:
            right.axhline(self.best_sft.score, color="gray", linestyle="--", label="best SFT")
        xlabel = "lambda (weight of SFT-1)" if mixups and not merges else "beta (weight of EXPO-1)"
        right.set(xlabel=xlabel, ylabel=ylabel, title="Merge (M^3)" if mixups and not merges else "Merge (ExMe)")
        right.legend()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def _with_errors(self, candidates: Sequence[Candidate]) -> tuple[list[float], list[list[float]] | None]:
        """The candidates' scores and, where their gains have intervals, the error bars those put around the scores
        (the best checkpoint's score plus the interval, in the score's direction)."""
        scores = [c.score for c in candidates]
        reference = self.best_sft
        if reference is None or any(c.interval is None for c in candidates):
            return scores, None
        sign = 1.0 if self.greater_is_better else -1.0
        ends = [sorted(reference.score + sign * end for end in c.interval) for c in candidates]
        below = [max(0.0, score - low) for score, (low, _) in zip(scores, ends)]
        above = [max(0.0, high - score) for score, (_, high) in zip(scores, ends)]
        return scores, [below, above]

    def mergekit_recipe(self) -> str | None:
        """The chosen model as a mergekit `task_arithmetic` configuration: `base + sum_i c_i * (checkpoint_i - base)`
        with `normalize: false`, LoRA checkpoints as `base+adapter`. `mergekit-yaml mergekit.yml OUT` on the
        original checkpoints rebuilds the same weights up to rounding. `None` when nothing on the span was chosen."""
        import yaml

        if self.final is None or not self.final.on_span:
            return None
        base = self.sources.get("base_model") or "BASE_MODEL"
        folders = self.sources.get("checkpoints") or [f"checkpoint-{c.step}" for c in self.checkpoints]
        models = [
            {"model": f"{base}+{folder}" if self.sources.get("adapter") else folder, "parameters": {"weight": c}}
            for folder, c in zip(folders, self.final.coefficients)
        ]
        recipe = {
            "merge_method": "task_arithmetic",
            "base_model": base,
            "models": models,
            "parameters": {"normalize": False},
            "dtype": "float32",
        }
        replay = f"mergekit-yaml {MERGEKIT_RECIPE} OUTPUT_FOLDER" + (
            " --lora-merge-cache CACHE_FOLDER" if self.sources.get("adapter") else ""  # mergekit fuses adapters there
        )
        header = (
            f"# ExMe's chosen model ({self.final.kind}, {_hyper(self.final)}) as mergekit task arithmetic:\n"
            "# base + sum_i weight_i * (model_i - base). Replay on the original checkpoints with\n"
            f"#   {replay}\n"
        )
        return header + yaml.safe_dump(recipe, sort_keys=False)

    def model_card(self) -> str:
        """`README.md` of the output folder: what the model is, how it was chosen, the table, the figure, how to load
        it, with Hugging Face model-card metadata (`base_model`, `tags: [exme, merge]`, `library_name`)."""
        from huggingface_hub import ModelCardData

        base, adapter, final = self.sources.get("base_model"), self.sources.get("adapter", False), self.final
        hub_id = base if base and re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base) else None  # local folders are not ids
        metadata = ModelCardData(
            base_model=hub_id, library_name="peft" if adapter else "transformers", tags=["exme", "merge"]
        )
        steps = ", ".join(f"SFT-{i + 1} = step {c.step}" for i, c in enumerate(self.checkpoints))
        terms = " + ".join(f"{c:.4g} * (SFT-{i + 1} - base)" for i, c in enumerate(final.coefficients or ()))
        load = (
            f'model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base or "BASE_MODEL"}"), '
            '"path/to/this/folder")'
            if "adapter" in self.saved
            else 'model = AutoModelForCausalLM.from_pretrained("path/to/this/folder")'
        )
        imports = "from peft import PeftModel\n" if "adapter" in self.saved else ""
        lines = [
            "---",
            metadata.to_yaml(),
            "---",
            "",
            "# ExMe merge" + (f" of `{base}`" if base else ""),
            "",
            f"This model merges the checkpoints of one fine-tuning run, with exme-callback: they were ranked by "
            f"`{self.metric}` ({steps}), {_METHODS[self.strategy]}; every candidate was evaluated and the best kept "
            f"({final.kind}, {_hyper(final)}).",
            "",
            f"Weights: `base + {terms}`." if terms else "",
            "",
            *(line for line in self.to_markdown().splitlines()[1:] if not line.startswith("Saved: ")),
            "",
            *([f"![The sweep]({REPORT_PNG})", ""] if self.checkpoints else []),
            "## How to load",
            "",
            "```python",
            f"from transformers import AutoModelForCausalLM\n{imports}{load}",
            "```",
            "",
            *(
                ["`merged/` holds the same model fused into the base weights (a plain transformers model).", ""]
                if "merged" in self.saved
                else []
            ),
            f"`{MERGEKIT_RECIPE}` is the same merge as a mergekit configuration (task arithmetic, "
            f"`normalize: false`; its first lines say how to replay it), `{REPORT_JSON}` every candidate evaluated.",
        ]
        return "\n".join(lines) + "\n"

    def write(self, directory: str) -> None:
        """Write `exme_report.json`, `exme_report.md` and `exme_sweep.png` into `directory`, and for a finished
        sweep the model card `README.md` and `mergekit.yml`."""
        with open(os.path.join(directory, REPORT_JSON), "w") as f:
            json.dump(self.to_dict(), f, indent=2, allow_nan=True)
            f.write("\n")
        with open(os.path.join(directory, REPORT_MD), "w") as f:
            f.write(self.to_markdown())
        if self.checkpoints:
            self.plot(os.path.join(directory, REPORT_PNG))
        if self.final is not None and self.error is None:
            with open(os.path.join(directory, MODEL_CARD), "w") as f:
                f.write(self.model_card())
            recipe = self.mergekit_recipe()
            if recipe is not None:
                with open(os.path.join(directory, MERGEKIT_RECIPE), "w") as f:
                    f.write(recipe)


_BASELINES = {"weighted": "Weighted", "ties": "TIES", "dare": "DARE"}
_STRATEGIES = {"exme": "ExMe", "mixup": "M^3", "topk": "Top-k greedy"}  # each strategy's best candidate
_METHODS = {  # what each strategy did, for the model card
    "exme": "each extrapolated away from the base model ([EXPO](https://arxiv.org/abs/2404.16792)) and the two "
    "merged (Extrapolation Merging, [ExMe](https://arxiv.org/abs/2503.04834))",
    "mixup": "and the two best merged with ratios drawn from Beta(a, a) (Mixup Model Merge, "
    "[M^3](https://arxiv.org/abs/2502.15434))",
    "topk_greedy": "and merged pairwise, generation after generation (Top-k greedy merging with model kinship, "
    "[Hu et al. 2024](https://arxiv.org/abs/2410.12613))",
}


def _better(greater_is_better: bool) -> str:
    return "higher" if greater_is_better else "lower"


def _metric(metrics: dict[str, float], name: str) -> float | None:
    return metrics.get(metric_key(name, metrics))


def _gain(value: float | None, reference: float | None, greater_is_better: bool) -> str:
    if value is None or reference is None or not math.isfinite(value):
        return "-"
    sign = 1.0 if greater_is_better else -1.0
    return _number(sign * (value - reference) + 0.0, signed=True)  # + 0.0: no "-0.0000" for equal scores


def _interval(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f" [{interval[0]:+.4f}, {interval[1]:+.4f}]"


def _hyper(c: Candidate) -> str:
    if c.kind == "sft":
        return f"step={next(s for s in c.steps if s is not None)}"
    return ", ".join(f"{name}={value:g}" for name, value in c.hyper.items() if value is not None) or "-"


def _coefficients(c: Candidate) -> str:
    if c.coefficients is None:
        return "off the span"
    return ", ".join(f"c{i + 1}={_number(x)}" for i, x in enumerate(c.coefficients))


def _number(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return (f"{x:+.4f}" if signed else f"{x:.4f}") if math.isfinite(x) else str(x)
