"""What a finished sweep leaves behind: `exme_report.json`, the paper-style table in `exme_report.md`, and the
atomic publication of the output folder."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from .search import Candidate, Checkpoint, best

__all__ = ["Report", "publish_dir"]

REPORT_JSON = "exme_report.json"
REPORT_MD = "exme_report.md"


@dataclass
class Report:
    """Everything a sweep found, in the form `exme_report.json` stores it."""

    metric: str
    greater_is_better: bool
    checkpoints: list[Checkpoint]
    candidates: list[Candidate]
    final: Candidate | None  # None when the sweep failed before choosing
    alphas: Sequence[float]
    betas: Sequence[float]
    choose_from: str
    base: Candidate | None = None
    saved: dict[str, str] = field(default_factory=dict)
    error: str | None = None  # why the sweep stopped, when it failed

    @property
    def best_sft(self) -> Candidate | None:
        return best(self.candidates, self.greater_is_better, kinds=("sft",))

    @property
    def best_exme(self) -> Candidate | None:
        return best(self.candidates, self.greater_is_better, kinds=("exme",))

    def rows(self) -> list[tuple[str, Candidate]]:
        """The table's rows: Base, SFT-1, SFT-2, EXPO-1, EXPO-2 (best alpha each), best ExMe, chosen."""
        gib = self.greater_is_better
        rows = [("Base", self.base)] if self.base is not None else []
        for i, step in enumerate(c.step for c in self.checkpoints):
            on_i = [c for c in self.candidates if (c.step1 if i == 0 else c.step2) == step and c.kind != "exme"]
            rows.append((f"SFT-{i + 1}", next((c for c in on_i if c.kind == "sft"), None)))
            rows.append((f"EXPO-{i + 1}", best(on_i, gib, kinds=("expo",))))
        rows.sort(key=lambda row: row[0].startswith("EXPO"))  # SFT rows first, like the paper's tables
        rows.append(("ExMe", self.best_exme))
        if self.final is not None:
            rows.append((f"Chosen ({self.final.kind})", self.final))
        return [(label, c) for label, c in rows if c is not None]

    def to_dict(self) -> dict:
        return {
            "metric": self.metric,
            "greater_is_better": self.greater_is_better,
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
        }

    def to_markdown(self) -> str:
        """The paper-style table: each row's hyper-parameters, plane coordinates, score and gain over SFT."""
        reference = self.best_sft
        arrow = "higher" if self.greater_is_better else "lower"
        lines = [
            "# ExMe report",
            "",
            f"Selection score: `{self.metric}` ({arrow} is better). Gain: against the best SFT checkpoint.",
            "",
            *(
                [f"**The sweep failed** after {len(self.candidates)} candidates: {self.error}", ""]
                if self.error
                else []
            ),
            "| model | step(s) | hyper-parameters | c1 | c2 | score | gain |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        for label, c in self.rows():
            steps = "/".join(str(s) for s in (c.step1, c.step2) if s is not None) or "-"
            gain = (
                "-"
                if reference is None or not c.valid
                else _number(_gain(c, reference, self.greater_is_better), signed=True)
            )
            lines.append(
                f"| {label} | {steps} | {_hyper(c)} | {c.c1:.4g} | {c.c2:.4g} | {_number(c.score)} | {gain} |"
            )
        skipped = [c for c in self.candidates if not c.valid]
        if skipped:
            lines += ["", "Skipped candidates (never chosen):", ""]
            lines += [f"- {c.kind} c1={c.c1:.4g} c2={c.c2:.4g}: {c.error}" for c in skipped]
        if self.saved:
            lines += ["", "Saved: " + ", ".join(f"{k} in `{v}`" for k, v in self.saved.items()) + "."]
        return "\n".join(lines) + "\n"

    def write(self, directory: str) -> None:
        with open(os.path.join(directory, REPORT_JSON), "w") as f:
            json.dump(self.to_dict(), f, indent=2, allow_nan=True)
            f.write("\n")
        with open(os.path.join(directory, REPORT_MD), "w") as f:
            f.write(self.to_markdown())


def _gain(candidate: Candidate, reference: Candidate, greater_is_better: bool) -> float:
    """Improvement over `reference`, positive when better in the score's direction."""
    sign = 1.0 if greater_is_better else -1.0
    return sign * (candidate.score - reference.score) + 0.0  # + 0.0: no "-0.0000" for equal scores


def _hyper(c: Candidate) -> str:
    values = {"alpha1": c.alpha1, "alpha2": c.alpha2, "beta": c.beta}
    return ", ".join(f"{name}={value:g}" for name, value in values.items() if value is not None) or "-"


def _number(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return (f"{x:+.4f}" if signed else f"{x:.4f}") if math.isfinite(x) else str(x)


@contextlib.contextmanager
def publish_dir(final: str, write: bool = True) -> Iterator[str]:
    """Yield a temporary folder to fill; on success it replaces `final` in one rename.

    An earlier `final` stays whole until the new folder is complete, and on an error the temporary folder is
    removed and `final` is untouched. With `write=False` (processes other than the main one) nothing is touched.
    """
    final = os.path.abspath(final)
    tmp, old = final + ".incomplete", final + ".previous"
    if write:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        if write:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if write:
        shutil.rmtree(old, ignore_errors=True)
        if os.path.exists(final):
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
