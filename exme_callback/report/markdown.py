"""`exme_report.md`: the ExMe paper's Table 1 for one sweep, with the gains over the best checkpoint and their
intervals, a line when a stage's best sits at the edge of what it tried, the kinship of the merged pairs and the
strategy's own notes."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from ..kinship import METRICS as KINSHIP
from ..objective import metric_key
from ..strategies import edge_notices

if TYPE_CHECKING:
    from ..candidates import Candidate
    from .report import Report

__all__ = ["hyper_text", "number", "to_markdown"]


def to_markdown(report: Report) -> str:
    """The paper-style table: per-metric values, the selection score and, with a report evaluator, the held-out
    score, each with its gain over the best SFT checkpoint."""
    reference = report.best_sft
    heldout = report.heldout_metric is not None
    lines = [
        "# ExMe report",
        "",
        f"Selection score: `{report.metric}` ({_better(report.greater_is_better)} is better).",
        *(
            [
                f"Held-out score: `{report.heldout_metric}` ({_better(report.heldout_greater_is_better)} is better), "
                "from the report evaluator, on data that chose nothing."
            ]
            if heldout
            else []
        ),
        "Gains (Δ) are against the best SFT checkpoint, positive when better.",
        *_interval_lines(report),
        "",
        *(
            [f"**The sweep failed** after {len(report.candidates)} candidates: {report.error}", ""]
            if report.error
            else []
        ),
    ]
    # One metric is the score itself: no column of its own.
    columns = report.columns if len(report.columns) > 1 else []
    heldout_columns = report.heldout_columns if len(report.heldout_columns) > 1 else []
    k = max(2, len(report.checkpoints))
    header = ["model", "hyper-parameters", *(f"c{i + 1}" for i in range(k)), *columns, "selection", "Δ selection"]
    if heldout:
        header += [f"held-out {c}" for c in heldout_columns] + ["held-out", "Δ held-out"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * 2 + "---:|" * (len(header) - 2)]
    for label, c in report.rows():
        cells = [label, hyper_text(c), *(number(c.coefficient(i)) for i in range(k))]
        cells += [number(_metric(c.metrics, name)) for name in columns]
        gain = _gain(c.score, reference and reference.score, report.greater_is_better)
        cells += [number(c.score), gain + _interval(c.interval)]
        if heldout:
            cells += [number(_metric(c.heldout_metrics, name)) for name in heldout_columns]
            ref = reference and reference.heldout_score
            gain = _gain(c.heldout_score, ref, report.heldout_greater_is_better)
            cells += [number(c.heldout_score), gain + _interval(c.heldout_interval)]
        lines.append("| " + " | ".join(cells) + " |")
    lines += _edge_lines(report)
    skipped = [c for c in report.candidates if not c.valid]
    if skipped:
        lines += ["", "Skipped candidates (never chosen):", ""]
        lines += [f"- {c.kind} {hyper_text(c)} ({_coefficients(c)}): {c.error}" for c in skipped]
    lines += _kinship_lines(report) + report.notes
    if report.saved:
        lines += ["", "Saved: " + ", ".join(f"{k} in `{v}`" for k, v in report.saved.items()) + "."]
    return "\n".join(lines) + "\n"


def _interval_lines(report: Report) -> list[str]:
    """How to read the intervals in brackets, or why there are none."""
    scores = [("selection", "interval")] + ([("held-out", "heldout_interval")] if report.heldout_metric else [])
    lines = []
    for name, attribute in scores:
        if any(getattr(c, attribute) is not None for _, c in report.rows()):
            lines.append(
                f"[low, high] after a {name} gain: its {report.confidence:.0%} confidence interval (paired "
                "bootstrap over the evaluation's items, seeded); a gain whose interval contains 0 is within the "
                "noise."
            )
        else:
            lines.append(
                f"No confidence interval for the {name} gains: the evaluator gave aggregate scores only (return "
                "per-item scores, as `LMEvalEvaluator` does, to get them)."
            )
    if report.search == "racing" and report.item_evaluations:
        stopped = sum(1 for c in report.candidates if (c.error or "").startswith("stopped by racing"))
        margin = report.racing_margin
        why = f"not above the leader by more than {margin:g} (`racing_margin`)" if margin else "below the leader"
        lines.append(
            f"Racing: {report.item_evaluations:,} item evaluations, against {report.grid_item_evaluations:,} for the "
            f"grid ({report.grid_item_evaluations / report.item_evaluations:.1f}x fewer); {stopped} candidates "
            f"stopped early, {why}."
        )
    if report.min_gain is not None:
        rule = "above zero" if report.min_gain == "significant" else f"above {report.min_gain:g}"
        lines.append(f"Chosen with `min_gain={report.min_gain!r}`: a candidate only if its gain is {rule}.")
    return lines


def _edge_lines(report: Report) -> list[str]:
    """One line saying which stage's best sits at the edge of what it tried (`strategies.edge_notices`), if any."""
    notices = edge_notices(report.candidates, report.greater_is_better)
    return ["", f"At the edge of the search: {'; '.join(notices)} (the best may lie beyond)."] if notices else []


def _kinship_lines(report: Report) -> list[str]:
    """Model kinship of the kept checkpoints and of each merged pair (Pearson, cosine, Euclidean distance of
    their task vectors)."""
    pairs = report.kinship.get("pairs", [])
    if not pairs:
        return []
    lines = ["", "Model kinship of the merged models' task vectors (Hu et al. 2024):", ""]
    lines += ["| models | pearson | cosine | euclidean |", "|---|---:|---:|---:|"]
    for pair in pairs:
        lines.append(f"| {pair['models']} | " + " | ".join(number(pair[m]) for m in KINSHIP) + " |")
    return lines


def _better(greater_is_better: bool) -> str:
    return "higher" if greater_is_better else "lower"


def _metric(metrics: dict[str, float], name: str) -> float | None:
    key = metric_key(name, metrics)
    return None if key is None else metrics[key]


def _gain(value: float | None, reference: float | None, greater_is_better: bool) -> str:
    if value is None or reference is None or not math.isfinite(value):
        return "-"
    sign = 1.0 if greater_is_better else -1.0
    return number(sign * (value - reference) + 0.0, signed=True)  # + 0.0: no "-0.0000" for equal scores


def _interval(interval: tuple[float, float] | None) -> str:
    return "" if interval is None else f" [{interval[0]:+.4f}, {interval[1]:+.4f}]"


def hyper_text(c: Candidate) -> str:
    if c.kind == "sft":
        return f"step={next(s for s in c.steps if s is not None)}"
    return ", ".join(f"{name}={value:g}" for name, value in c.hyper.items() if value is not None) or "-"


def _coefficients(c: Candidate) -> str:
    if c.coefficients is None:
        return "off the span"
    return ", ".join(f"c{i + 1}={number(x)}" for i, x in enumerate(c.coefficients))


def number(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "-"
    return (f"{x:+.4f}" if signed else f"{x:.4f}") if math.isfinite(x) else str(x)
