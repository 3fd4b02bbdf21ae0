"""`exme_sweep.png`: the score against alpha for each checkpoint and against beta (the ExMe paper's Figures 5 and
6), with the SFT and EXPO scores as reference lines and the gains' intervals as error bars."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from ..candidates import Candidate
    from .report import Report

__all__ = ["DODGE", "figure", "plot"]

COLORS = ("tab:blue", "tab:orange")  # of SFT-1/EXPO-1 and SFT-2/EXPO-2 (the other kept checkpoints have no line)
DODGE = 0.015  # lines with error bars in one panel are shifted by this fraction of the x range, one side each
DPI = 120


def plot(report: Report, path: str) -> None:
    """Write the sweep's figure (`figure`) to `path` as a PNG."""
    figure(report).savefig(path)


def figure(report: Report) -> Figure:
    """The sweep's figure (the ExMe paper's Figures 5 and 6): score against alpha for each checkpoint, and
    score against beta, with the SFT and EXPO scores as reference lines, and error bars from the gains'
    confidence intervals where there are per-item scores. The legends sit below the panels, a caption under them
    says what the error bars are. A `matplotlib.figure.Figure` of its own (no pyplot state)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 5), dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    # A score that averages several metrics has a long name: the axes say "selection score", the title says which.
    ylabel = report.metric if len(report.metric) <= 40 else "selection score"
    if ylabel != report.metric:
        fig.suptitle(textwrap.fill(f"selection score = {report.metric}", 120), fontsize=8)
    rows = dict(report.rows())
    expos = []  # EXPO-1 and EXPO-2 only: the other kept checkpoints have no line
    for i, color in zip(range(len(report.checkpoints)), COLORS, strict=False):
        alpha = ("alpha1", "alpha2")[i]
        expo = [c for c in report.candidates if c.kind == "expo" and c.valid and getattr(c, alpha) is not None]
        expo.sort(key=lambda c: getattr(c, alpha))
        if expo:
            expos.append(_line(report, expo, [getattr(c, alpha) for c in expo], color=color, label=f"EXPO-{i + 1}"))
        if f"SFT-{i + 1}" in rows:
            left.axhline(rows[f"SFT-{i + 1}"].score, color=color, linestyle="--", label=f"SFT-{i + 1}")
    dodged = _errorbars(left, expos)
    left.set(xlabel="alpha", ylabel=ylabel, title="Extrapolation (EXPO)")
    merges = sorted((c for c in report.candidates if c.kind == "exme" and c.valid), key=lambda c: c.beta)
    mixups = sorted((c for c in report.candidates if c.kind == "mixup" and c.valid), key=lambda c: c.hyper["lambda"])
    others = [_line(report, merges, [c.beta for c in merges], color="tab:green", label="ExMe")] if merges else []
    if mixups:
        draws = [c.hyper["lambda"] for c in mixups]
        others.append(_line(report, mixups, draws, color="tab:purple", label="M^3 draws", marker="s", linestyle=""))
    _errorbars(right, others)
    for i, color in zip(range(len(report.checkpoints)), COLORS, strict=False):  # EXPO-1 and EXPO-2 only
        if f"EXPO-{i + 1}" in rows:
            right.axhline(rows[f"EXPO-{i + 1}"].score, color=color, linestyle=":", label=f"EXPO-{i + 1}")
    if report.best_sft is not None:
        right.axhline(report.best_sft.score, color="gray", linestyle="--", label="best SFT")
    xlabel = "lambda (weight of SFT-1)" if mixups and not merges else "beta (weight of EXPO-1)"
    right.set(xlabel=xlabel, ylabel=ylabel, title="Merge (M^3)" if mixups and not merges else "Merge (ExMe)")
    bars = any(errors is not None for _, _, errors, _ in [*expos, *others])
    for axes in (left, right):  # below the panel, never over the data
        handles, _ = axes.get_legend_handles_labels()
        if handles:
            axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=min(len(handles), 4), fontsize=9)
    fig.supxlabel(textwrap.fill(_caption(report, bars, dodged), 180), fontsize=8, x=0.01, ha="left")
    return fig


def _line(report: Report, candidates: Sequence[Candidate], x: list[float], **style) -> tuple:
    """`(x, scores, errors, style)`: one line of a panel, its error bars from the gains' intervals (`_with_errors`)."""
    return (x, *_with_errors(report, candidates), {"marker": "o", "capsize": 3, **style})


def _errorbars(axes: Axes, lines: list[tuple]) -> float | None:
    """Plot each `(x, scores, errors, style)` line; lines with error bars are dodged when there are several, so no
    bar hides another: the shift (a fraction of the x range) of the outermost, or `None` when none moved."""
    barred = [i for i, (_, _, errors, _) in enumerate(lines) if errors is not None]
    xs = [x for line in lines for x in line[0]]
    width = ((max(xs) - min(xs)) or 1.0) if xs else 1.0
    shifts = {i: (j - (len(barred) - 1) / 2) * 2 * DODGE for j, i in enumerate(barred)} if len(barred) > 1 else {}
    for i, (x, scores, errors, style) in enumerate(lines):
        axes.errorbar([value + shifts.get(i, 0.0) * width for value in x], scores, errors, **style)
    return max(shifts.values()) if shifts else None


def _caption(report: Report, bars: bool, dodged: float | None) -> str:
    """What the error bars are, or that there are none."""
    if not bars:
        return (
            "No error bars: the gains have no confidence interval (intervals need per-item scores from the "
            "evaluator, as LMEvalEvaluator gives)."
        )
    reference = next((label for label, c in report.rows() if c is report.best_sft), "the best checkpoint")
    text = (
        f"Error bars: the {report.confidence:.0%} paired bootstrap interval of each candidate's gain over the best "
        f"checkpoint ({reference}), placed around the candidate's score (the best checkpoint's score plus the "
        "interval); a bar that reaches that checkpoint's line is a gain within the noise."
    )
    if dodged is not None:
        text += f" The EXPO lines are shifted by ±{dodged:.1%} of the alpha range so that their bars do not overlap."
    return text


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
