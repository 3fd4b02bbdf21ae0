"""`exme_sweep.png`: the score against alpha for each checkpoint and against beta (the ExMe paper's Figures 5 and
6), with the SFT and EXPO scores as reference lines and the gains' intervals as error bars."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..candidates import Candidate
    from .report import Report

__all__ = ["plot"]

COLORS = ("tab:blue", "tab:orange")  # of SFT-1/EXPO-1 and SFT-2/EXPO-2 (the other kept checkpoints have no line)


def plot(report: Report, path: str) -> None:
    """The sweep's figure (the ExMe paper's Figures 5 and 6): score against alpha for each checkpoint, and
    score against beta, with the SFT and EXPO scores as reference lines, and error bars from the gains'
    confidence intervals where there are per-item scores."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    # A score that averages several metrics has a long name: the axes say "selection score", the title says which.
    ylabel = report.metric if len(report.metric) <= 40 else "selection score"
    if ylabel != report.metric:
        fig.suptitle(textwrap.fill(f"selection score = {report.metric}", 120), fontsize=8)
    rows = dict(report.rows())
    for i, color in zip(range(len(report.checkpoints)), COLORS, strict=False):  # EXPO-1 and EXPO-2 only
        alpha = ("alpha1", "alpha2")[i]
        expo = [c for c in report.candidates if c.kind == "expo" and c.valid and getattr(c, alpha) is not None]
        expo.sort(key=lambda c: getattr(c, alpha))
        if expo:
            x = [getattr(c, alpha) for c in expo]
            left.errorbar(x, *_with_errors(report, expo), marker="o", capsize=3, color=color, label=f"EXPO-{i + 1}")
        if f"SFT-{i + 1}" in rows:
            left.axhline(rows[f"SFT-{i + 1}"].score, color=color, linestyle="--", label=f"SFT-{i + 1}")
    left.set(xlabel="alpha", ylabel=ylabel, title="Extrapolation (EXPO)")
    left.legend()
    merges = sorted((c for c in report.candidates if c.kind == "exme" and c.valid), key=lambda c: c.beta)
    if merges:
        x = [c.beta for c in merges]
        right.errorbar(x, *_with_errors(report, merges), marker="o", capsize=3, color="tab:green", label="ExMe")
    mixups = sorted((c.hyper["lambda"], c.score) for c in report.candidates if c.kind == "mixup" and c.valid)
    if mixups:
        right.plot(*zip(*mixups, strict=True), marker="s", linestyle="none", color="tab:purple", label="M^3 draws")
    for i, color in zip(range(len(report.checkpoints)), COLORS, strict=False):  # EXPO-1 and EXPO-2 only
        if f"EXPO-{i + 1}" in rows:
            right.axhline(rows[f"EXPO-{i + 1}"].score, color=color, linestyle=":", label=f"EXPO-{i + 1}")
    if report.best_sft is not None:
        right.axhline(report.best_sft.score, color="gray", linestyle="--", label="best SFT")
    xlabel = "lambda (weight of SFT-1)" if mixups and not merges else "beta (weight of EXPO-1)"
    right.set(xlabel=xlabel, ylabel=ylabel, title="Merge (M^3)" if mixups and not merges else "Merge (ExMe)")
    right.legend()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _with_errors(report: Report, candidates: Sequence[Candidate]) -> tuple[list[float], list[list[float]] | None]:
    """The candidates' scores and, where their gains have intervals, the error bars those put around the scores
    (the best checkpoint's score plus the interval, in the score's direction)."""
    scores = [c.score for c in candidates]
    reference = report.best_sft
    if reference is None or any(c.interval is None for c in candidates):
        return scores, None
    sign = 1.0 if report.greater_is_better else -1.0
    ends = [sorted(reference.score + sign * end for end in c.interval) for c in candidates]
    below = [max(0.0, score - low) for score, (low, _) in zip(scores, ends, strict=True)]
    above = [max(0.0, high - score) for score, (_, high) in zip(scores, ends, strict=True)]
    return scores, [below, above]
