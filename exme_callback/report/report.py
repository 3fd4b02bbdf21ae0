"""`Report`: everything a sweep found, in the form `exme_report.json` stores it, and its one-line summary."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from ..candidates import Candidate, Checkpoint, best
from .card import mergekit_recipe, model_card
from .figure import plot
from .files import MERGEKIT_RECIPE, MODEL_CARD, REPORT_ITEMS, REPORT_JSON, REPORT_MD, REPORT_PNG
from .markdown import hyper_text, to_markdown

__all__ = ["Report"]


@dataclass
class Report:
    """Everything a sweep found, in the form `exme_report.json` stores it.

    `columns` are the metrics the selection score averages, `heldout_columns` those of the report evaluator's
    score (`heldout_metric`), when there is one. `table` holds the labelled rows of the paper's Table 1 between the
    Base row and the chosen model (the kept checkpoints, the baselines, then the strategy's own rows: each strategy
    says which of its candidates the table shows), and `notes` the strategy's lines after the table. `sources`
    names what the model card and the mergekit recipe refer to: `base_model` (an id or folder), `checkpoints` (the
    kept checkpoints' folders, best first) and `adapter` (whether they are LoRA adapters).

    The per-item scores of every evaluated row go to `exme_items.json` beside the report (`items`), with what the
    intervals were computed with (`gain_weights`, `confidence`, `seed`), so they can be recomputed from the folder:
    `intervals.gain_interval(items["candidates"][i]["items"], items["candidates"][j]["items"], items["gain_weights"],
    items["confidence"], seed=items["seed"])` is candidate `i`'s interval over the best checkpoint `j`.
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
    method: str = ""  # what the strategy did, in the model card's words (`Strategy.description`)
    table: list[tuple[str, Candidate]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    confidence: float = 0.95  # the level of the gains' intervals (`Candidate.interval`)
    min_gain: float | str | None = None  # the choice's threshold over the best checkpoint, if any
    search: str = "grid"  # how the strategy's stages were scored: "grid" or "racing"
    racing_margin: float = 0.0  # racing's indifference margin (`SearchSettings.racing_margin`)
    item_evaluations: int | None = None  # items scored by the search (per-item evaluations only)
    grid_item_evaluations: int | None = None  # what the full grid scores: every candidate on every item
    seed: int = 0  # the seed of the intervals' bootstrap
    gain_weights: dict[str, float] = field(default_factory=dict)  # a gain's weight of each metric (`Objective`)
    heldout_gain_weights: dict[str, float] = field(default_factory=dict)  # the same for the held-out score

    @property
    def best_sft(self) -> Candidate | None:
        return best(self.candidates, self.greater_is_better, kinds=("sft",))

    @property
    def best_exme(self) -> Candidate | None:
        return best(self.candidates, self.greater_is_better, kinds=("exme",))

    def rows(self) -> list[tuple[str, Candidate]]:
        """The rows of the ExMe paper's Table 1: Base, the `table` (SFT-1, SFT-2, the baselines, the strategy's rows:
        EXPO-1, EXPO-2 and ExMe for the paper's search) and the chosen model. Rows without a candidate are left
        out."""
        rows = [("Base", self.base), *self.table]
        if self.final is not None:
            rows.append((f"Chosen ({self.final.kind})", self.final))
        return [(label, c) for label, c in rows if c is not None]

    def summary(self) -> tuple[str, dict[str, float]]:
        """One line saying what was chosen and what it gained over the best checkpoint, and the same as scalar logs
        under `exme/` keys (`exme/score`, `exme/c1`, ..., `exme/gain`, ...)."""
        reference, final = self.best_sft, self.final
        coefficients = {f"c{i + 1}": c for i, c in enumerate(final.coefficients or ())}  # none off the span
        logs = {"exme/score": final.score, **{f"exme/{name}": c for name, c in coefficients.items()}}
        terms = ", ".join(f"{name}={c:.4g}" for name, c in coefficients.items()) or hyper_text(final)
        message = f"ExMe: chose {final.kind} ({terms}), {self.metric}={final.score:.6g}"
        if reference is not None:
            logs["exme/best_sft_score"] = reference.score
            logs["exme/gain"] = (final.score - reference.score) * (1 if self.greater_is_better else -1)
            message += f"; best checkpoint {reference.score:.6g}, gain {logs['exme/gain']:+.6g}"
        if self.best_exme is not None:
            logs["exme/best_exme_score"] = self.best_exme.score
        return message, logs

    def to_dict(self) -> dict:
        positions = {id(c): i for i, c in enumerate(self.candidates)}
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
            "rows": [{"label": label, "candidate": positions.get(id(c))} for label, c in self.table],
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
            "racing_margin": self.racing_margin,
            "item_evaluations": self.item_evaluations,
            "grid_item_evaluations": self.grid_item_evaluations,
            "items_file": REPORT_ITEMS if self._has_items() else None,
        }

    def items(self) -> dict | None:
        """The per-item scores of the base and of every candidate (in `candidates`' order), as `exme_items.json`
        stores them, with what the intervals were computed with; `None` when no evaluation was per item."""
        if not self._has_items():
            return None
        return {
            "gain_weights": dict(self.gain_weights),
            "heldout_gain_weights": dict(self.heldout_gain_weights),
            "confidence": self.confidence,
            "seed": self.seed,
            "base": None if self.base is None else _items(self.base),
            "candidates": [_items(c) for c in self.candidates],
        }

    def _has_items(self) -> bool:
        return any(c is not None and (c.items or c.heldout_items) for c in [self.base, *self.candidates])

    def to_markdown(self) -> str:
        """The paper-style table (`markdown.to_markdown`)."""
        return to_markdown(self)

    def plot(self, path: str) -> None:
        """The sweep's figure (`figure.plot`)."""
        plot(self, path)

    def model_card(self) -> str:
        """The output folder's `README.md` (`card.model_card`)."""
        return model_card(self)

    def mergekit_recipe(self) -> str | None:
        """The chosen model as a mergekit recipe (`card.mergekit_recipe`); `None` off the span."""
        return mergekit_recipe(self)

    def write(self, directory: str) -> None:
        """Write `exme_report.json`, `exme_report.md`, `exme_sweep.png` and `exme_items.json` (when there are per-item
        scores) into `directory`, and for a finished
        sweep the model card `README.md` and `mergekit.yml`."""
        files = {REPORT_JSON: json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n"}
        items = self.items()
        if items is not None:
            files[REPORT_ITEMS] = json.dumps(items, allow_nan=True) + "\n"
        files[REPORT_MD] = to_markdown(self)
        if self.final is not None and self.error is None:
            files[MODEL_CARD] = model_card(self)
            recipe = mergekit_recipe(self)
            if recipe is not None:
                files[MERGEKIT_RECIPE] = recipe
        for name, text in files.items():
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
        if self.checkpoints:
            plot(self, os.path.join(directory, REPORT_PNG))


def _items(candidate: Candidate) -> dict:
    return {"items": candidate.items, "heldout_items": candidate.heldout_items}
