import json
import math

import numpy
import pytest

from exme_callback.candidates import Candidate, Checkpoint, best
from exme_callback.report import Report
from exme_callback.report.figure import DODGE, figure
from exme_callback.strategies import Baselines, ExMe, edge_notices, run_strategy, scored_alphas


def make_report(heldout=True):
    def c(kind, c1, c2, score, heldout_score=None, step1=None, step2=None, hyper=None, **exme_hyper):
        return Candidate(
            kind,
            None if c1 is None else (c1, c2),
            (step1, step2),
            hyper={**exme_hyper, **(hyper or {})},
            score=score,
            metrics={"eval_loss": score, "eval_acc": 1 - score},
            heldout_score=heldout_score,
            heldout_metrics={"acc": heldout_score} if heldout_score else {},
        )

    candidates = [
        c("sft", 1.0, 0.0, 0.50, 0.70, step1=40),
        c("sft", 0.0, 1.0, 0.60, step2=30),
        c("expo", 1.2, 0.0, 0.45, 0.72, step1=40, alpha1=0.2),
        c("expo", 1.4, 0.0, 0.48, step1=40, alpha1=0.4),
        Candidate("expo", (0.0, 1.2), (None, 30), {"alpha2": 0.2}, score=math.nan, error="non-finite score nan"),
        c("expo", 0.0, 1.4, 0.55, step2=30, alpha2=0.4),
        c("exme", 0.6, 0.7, 0.40, 0.75, step1=40, step2=30, alpha1=0.2, alpha2=0.4, beta=0.5),
        c("weighted", 0.7, 0.3, 0.52, 0.69, step1=40, step2=30, hyper={"lambda": 0.7}),
        c("ties", None, None, 0.58, 0.6, step1=40, step2=30, hyper={"density": 0.5}),
    ]
    table = [("SFT-1", candidates[0]), ("SFT-2", candidates[1])]  # then each strategy's own rows
    table += Baselines().rows(candidates, False) + ExMe().rows(candidates, False)
    return Report(
        metric="eval_loss",
        greater_is_better=False,
        checkpoints=[Checkpoint(40, 0.5), Checkpoint(30, 0.6)],
        candidates=candidates,
        final=candidates[6],
        alphas=(0.2, 0.4),
        betas=(0.5,),
        choose_from="all",
        base=c("base", 0.0, 0.0, 2.0, 0.3),
        columns=["eval_loss", "acc"],
        heldout_metric="acc" if heldout else None,
        heldout_columns=["acc"] if heldout else [],
        table=table,
    )


def table(path):
    """The markdown table as {row label: {column: cell}}."""
    lines = [line for line in path.read_text().splitlines() if line.startswith("| ")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    return {row[0]: dict(zip(cells[0], row, strict=True)) for row in cells[1:]}


def test_rows_follow_the_paper_table():
    report = make_report()
    rows = dict(report.rows())
    assert list(rows) == ["Base", "SFT-1", "SFT-2", "Weighted", "TIES", "EXPO-1", "EXPO-2", "ExMe", "Chosen (exme)"]
    assert rows["EXPO-1"].alpha1 == 0.2 and rows["EXPO-2"].alpha2 == 0.4  # best valid alpha of each
    assert report.best_sft.score == 0.5 and report.best_exme is report.final


def test_markdown_numbers_equal_json(tmp_path):
    report = make_report()
    report.write(str(tmp_path))
    data = json.loads((tmp_path / "exme_report.json").read_text())
    rows = table(tmp_path / "exme_report.md")
    by_label = {"Base": data["base"], "Chosen (exme)": data["final"], "ExMe": data["best_exme"]}
    for label, entry in by_label.items():
        assert float(rows[label]["selection"]) == pytest.approx(entry["score"], abs=5e-5)
        assert float(rows[label]["eval_loss"]) == pytest.approx(entry["metrics"]["eval_loss"], abs=5e-5)
        assert float(rows[label]["acc"]) == pytest.approx(entry["metrics"]["eval_acc"], abs=5e-5)
        assert float(rows[label]["held-out"]) == pytest.approx(entry["heldout_score"], abs=5e-5)
    assert rows["Chosen (exme)"]["Δ selection"] == "+0.1000"  # 0.5 -> 0.4, lower is better
    assert rows["Chosen (exme)"]["Δ held-out"] == "+0.0500"  # 0.70 -> 0.75, higher is better
    assert rows["SFT-1"]["Δ selection"] == "+0.0000" and rows["Base"]["Δ selection"] == "-1.5000"
    assert rows["ExMe"]["hyper-parameters"] == "alpha1=0.2, alpha2=0.4, beta=0.5"
    assert rows["SFT-1"]["hyper-parameters"] == "step=40" and rows["SFT-2"]["hyper-parameters"] == "step=30"
    assert rows["TIES"]["hyper-parameters"] == "density=0.5" and rows["TIES"]["c1"] == "-"
    assert rows["SFT-2"]["held-out"] == "-"  # only scored rows have held-out values
    assert "held-out acc" not in rows["Base"]  # one held-out metric is the held-out score: no column of its own
    assert data["checkpoints"] == [{"step": 40, "score": 0.5}, {"step": 30, "score": 0.6}]
    assert "non-finite score nan" in (tmp_path / "exme_report.md").read_text()
    assert (tmp_path / "exme_sweep.png").stat().st_size > 10_000


def with_intervals(report):
    """`report` with an interval on every valid EXPO and ExMe gain, as per-item scores give."""
    for c in report.candidates:
        if c.kind in ("expo", "exme") and c.valid:
            c.interval = (-0.05, 0.02)
    return report


def drawn(report):
    """The sweep's figure, drawn (so the legends have their place)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    fig = figure(report)
    FigureCanvasAgg(fig).draw()
    return fig


def test_figure_dodges_the_error_bars_of_lines_at_one_alpha():
    left, _ = drawn(with_intervals(make_report())).axes
    bars = {container.get_label(): container for container in left.containers}
    x = {label: [segment[0][0] for segment in c.lines[2][0].get_segments()] for label, c in bars.items()}
    # EXPO-1 at alpha 0.2 and 0.4, EXPO-2 at 0.4 only (its alpha 0.2 is not finite): both lines have a bar at 0.4.
    shift = DODGE * (0.4 - 0.2)
    assert x["EXPO-1"] == pytest.approx([0.2 - shift, 0.4 - shift]) and x["EXPO-2"] == pytest.approx([0.4 + shift])
    assert bars["EXPO-1"].lines[0].get_xdata() == pytest.approx(x["EXPO-1"])  # the points move with their bars


def test_figure_without_intervals_is_not_dodged_and_says_there_are_no_bars():
    fig = drawn(make_report())
    left, _ = fig.axes
    assert [list(c.lines[0].get_xdata()) for c in left.containers] == [[0.2, 0.4], [0.4]]
    assert all(not c.has_yerr for c in left.containers)
    assert fig.get_supxlabel().startswith("No error bars")


@pytest.mark.parametrize("intervals", [False, True])
def test_figure_legends_cover_no_data(intervals):
    report = with_intervals(make_report()) if intervals else make_report()
    fig = drawn(report)
    for axes in fig.axes:
        box = axes.get_legend().get_window_extent()
        assert not box.overlaps(axes.get_window_extent())  # outside the panel
        for container in axes.containers:
            points = [container.lines[0].get_xydata()]
            points += [segment for bars in container.lines[2] for segment in bars.get_segments()]
            for x, y in axes.transData.transform(numpy.concatenate(points)):
                assert not box.contains(x, y)
    caption = fig.get_supxlabel()
    if intervals:
        assert "95% paired bootstrap interval of each candidate's gain over the best checkpoint (SFT-1)" in caption
        assert "placed around the candidate's score" in caption and "shifted by ±1.5% of the alpha range" in caption
    else:
        assert caption.startswith("No error bars: the gains have no confidence interval")


def test_markdown_without_heldout_has_no_heldout_columns(tmp_path):
    report = make_report(heldout=False)
    assert "held-out" not in report.to_markdown().split("\n| model")[1].splitlines()[0]


def test_summary_of_a_choice_off_the_span():
    report = make_report()
    report.final = Candidate("mixup", None, (40, 30), {"lambda": 0.3, "density": 0.7}, score=0.3)
    message, logs = report.summary()
    assert "chose mixup (lambda=0.3, density=0.7)" in message and logs["exme/score"] == 0.3
    assert not any(key.startswith("exme/c") for key in logs)
    assert report.mergekit_recipe() is None  # no task-arithmetic recipe for a sparsified merge


def edge_report(alphas="default", greater_is_better=True):
    """The ExMe strategy's candidates on a score whose EXPO-1 peak (alpha1 = 1.0) is beyond the default grid,
    EXPO-2's inside it (alpha2 = 0.2), and whose merges improve up to beta = 0.9, as a report."""

    def score(candidate):
        c1, c2 = candidate.coefficients
        value = -((c1 - 2.0) ** 2) - (c2 - 1.2) ** 2 if candidate.kind == "expo" else c1 - c2
        candidate.score = value if greater_is_better else -value
        return candidate

    kept = [Checkpoint(40, score(Candidate("expo", (1.0, 0.0))).score), Checkpoint(30, -2.0)]
    strategy = ExMe() if alphas == "default" else ExMe(alphas)
    candidates = run_strategy(strategy, kept, score, greater_is_better)
    return Report(
        metric="score",
        greater_is_better=greater_is_better,
        checkpoints=kept,
        candidates=candidates,
        final=best(candidates, greater_is_better),
        alphas=scored_alphas(candidates),
        betas=strategy.betas,
        choose_from="all",
        table=strategy.rows(candidates, greater_is_better),
    )


def test_a_best_at_the_edge_of_the_grid_is_said_under_the_table_and_in_the_model_card(tmp_path):
    report = edge_report()
    notices = edge_notices(report.candidates, True)
    assert notices == [
        "alpha1=0.5 is the largest alpha tried; the score was still rising",
        "beta=0.9 is the largest beta tried; the score was still rising",
    ]  # alpha2's best (0.2) is inside its grid
    report.write(str(tmp_path))
    line = f"At the edge of the search: {'; '.join(notices)} (the best may lie beyond)."
    markdown = (tmp_path / "exme_report.md").read_text().splitlines()
    table_end = max(i for i, text in enumerate(markdown) if text.startswith("| "))
    assert markdown[table_end + 1 : table_end + 3] == ["", line]  # one line under the table
    assert line in (tmp_path / "README.md").read_text().splitlines()
    # A loss says "falling"; the smallest beta is an edge too.
    loss = edge_report(greater_is_better=False)
    assert (
        edge_notices(loss.candidates, False)[0] == "alpha1=0.5 is the largest alpha tried; the score was still falling"
    )
    for c in loss.candidates:
        if c.kind == "exme":
            c.score = c.beta
    assert edge_notices(loss.candidates, False)[-1] == (
        "beta=0.1 is the smallest beta tried; the score was still falling as beta decreased"
    )


def test_auto_alphas_leave_no_alpha_at_the_edge_and_the_report_records_them(tmp_path):
    report = edge_report(alphas="auto")
    assert report.alphas == (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5)
    assert edge_notices(report.candidates, True) == ["beta=0.9 is the largest beta tried; the score was still rising"]
    report.write(str(tmp_path))
    assert json.loads((tmp_path / "exme_report.json").read_text())["alphas"] == list(report.alphas)
    assert "alpha1=" not in (tmp_path / "exme_report.md").read_text().split("At the edge of the search:")[1]
    # No notice when the best is inside, for a stage with one value, or for a tie.
    inside = [c for c in report.candidates if c.kind != "exme"]
    assert edge_notices(inside, True) == []
    assert edge_notices([c for c in report.candidates if c.kind == "exme"][-1:], True) == []
    flat = [Candidate("exme", (0.5, 0.5), hyper={"beta": b}, score=1.0) for b in (0.1, 0.5, 0.9)]
    assert edge_notices(flat, True) == []
