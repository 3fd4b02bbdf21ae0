"""The pipeline: a whole ExMe run on the regression model, failures, LoRA baselines."""

import json
import math

import pytest
import torch
import yaml
from conftest import RegressionConfig, RegressionModel, load
from torch.testing import assert_close

from exme_callback import pipeline
from exme_callback.candidates import Checkpoint
from exme_callback.intervals import gain_interval
from exme_callback.objective import Objective
from exme_callback.pipeline import Output
from exme_callback.planes import DensePlane
from exme_callback.scoring import Scorer
from exme_callback.settings import SearchSettings
from exme_callback.snapshots import trainable_tensors
from exme_callback.strategies import Strategy, exme_coefficients, mixup_draws, racing_rounds

TARGET = (2.5, 2.0)  # the (a, b) the closeness evaluator rewards


# ---- a whole run on the regression model -------------------------------------------------------------------------

BASE = {"a": torch.tensor(0.5), "b": torch.tensor(-0.2)}
SFT1 = {"a": torch.tensor(2.1), "b": torch.tensor(1.2)}
SFT2 = {"a": torch.tensor(1.5), "b": torch.tensor(1.8)}
TRAINED = {"a": torch.tensor(1.9), "b": torch.tensor(1.7)}
ALPHAS, BETAS = (0.1, 0.5), (0.25, 0.75)


def closeness_weights(model) -> tuple[float, float]:
    return float(model.a.detach()), float(model.b.detach())


def closeness(a: float, b: float) -> float:
    return -((a - TARGET[0]) ** 2 + (b - TARGET[1]) ** 2)


def point(c1: float, c2: float) -> tuple[float, float]:
    """The closed form of `base + c1 * (sft1 - base) + c2 * (sft2 - base)`, in float64."""
    return tuple(
        float(BASE[k]) + c1 * (float(SFT1[k]) - float(BASE[k])) + c2 * (float(SFT2[k]) - float(BASE[k]))
        for k in ("a", "b")
    )


class CountingEvaluator:
    """The closeness of `(a, b)` to `TARGET`; raises at its `fail_at`-th call when given."""

    def __init__(self, fail_at=None):
        self.calls, self.fail_at = 0, fail_at

    def __call__(self, model):
        self.calls += 1
        if self.calls == self.fail_at:
            raise RuntimeError("evaluator broke")
        return {"closeness": closeness(*closeness_weights(model))}


def trained_model():
    model = RegressionModel(RegressionConfig())
    load(model, TRAINED)
    return model


def regression_run(model, tmp_path, evaluator, keep_chosen=False, sources=None):
    live = trainable_tensors(model)
    assert set(live) == {"a", "b"}
    plane = DensePlane(live, BASE, [SFT1, SFT2], TRAINED, model.save_pretrained)
    checkpoints = [Checkpoint(10, closeness(*point(1, 0))), Checkpoint(20, closeness(*point(0, 1)))]
    assert checkpoints[0].score > checkpoints[1].score  # best first
    scorer = Scorer(evaluator, Objective({"closeness": True}))
    output = Output(str(tmp_path / "exme"), sources=sources or {}, keep_chosen=keep_chosen, show_progress=False)
    report = pipeline.run(
        model, plane, checkpoints, scorer, output, settings=SearchSettings(alphas=ALPHAS, betas=BETAS)
    )
    return report


def test_run_on_the_regression_model_matches_the_closed_forms(tmp_path):
    evaluator = CountingEvaluator()
    sources = {"base_model": "org/base", "checkpoints": ["run/checkpoint-10", "run/checkpoint-20"], "adapter": False}
    model = trained_model()
    report = regression_run(model, tmp_path, evaluator, sources=sources)

    # The ExMe paper's grid: SFT-1, SFT-2, EXPO of each over the alphas, then the merges with each best alpha.
    best_alpha1 = max(ALPHAS, key=lambda a: closeness(*point(1 + a, 0)))
    best_alpha2 = max(ALPHAS, key=lambda a: closeness(*point(0, 1 + a)))
    expected = [("sft", (1.0, 0.0)), ("sft", (0.0, 1.0))]
    expected += [("expo", (1.0 + a, 0.0)) for a in ALPHAS] + [("expo", (0.0, 1.0 + a)) for a in ALPHAS]
    expected += [("exme", exme_coefficients(best_alpha1, best_alpha2, beta)) for beta in BETAS]
    assert [(c.kind, c.coefficients) for c in report.candidates] == expected
    assert [(c.alpha1, c.alpha2, c.beta) for c in report.candidates[-2:]] == [
        (best_alpha1, best_alpha2, beta) for beta in BETAS
    ]
    assert evaluator.calls == 2 * len(ALPHAS) + len(BETAS)  # the checkpoints keep their training scores

    # Every score is the closed form at its coefficients; the chosen one is the argmax.
    for candidate in report.candidates:
        assert candidate.score == pytest.approx(closeness(*point(*candidate.coefficients)), rel=1e-5, abs=1e-6)
    argmax = max(report.candidates, key=lambda c: closeness(*point(*c.coefficients)))
    assert report.final is argmax and report.final.kind == "exme"  # this set-up gains from the merge
    chosen = point(*report.final.coefficients)

    saved = RegressionModel.from_pretrained(tmp_path / "exme")
    assert_close(torch.tensor(closeness_weights(saved)), torch.tensor(chosen, dtype=torch.float32))
    assert torch.equal(model.a.detach(), TRAINED["a"]) and torch.equal(model.b.detach(), TRAINED["b"])

    written = json.loads((tmp_path / "exme" / "exme_report.json").read_text())
    assert written["final"]["coefficients"] == list(report.final.coefficients)
    assert [c["score"] for c in written["candidates"]] == [c.score for c in report.candidates]
    assert written["error"] is None and written["saved"] == {"model": str(tmp_path / "exme")}
    card = (tmp_path / "exme" / "README.md").read_text()
    lines = card.splitlines()
    assert lines[0] == "---"
    metadata = yaml.safe_load("\n".join(lines[1 : lines.index("---", 1)]))
    assert {"exme", "merge"} <= set(metadata["tags"]) and metadata["base_model"] == "org/base"
    recipe = yaml.safe_load((tmp_path / "exme" / "mergekit.yml").read_text())
    assert recipe["merge_method"] == "task_arithmetic" and recipe["parameters"]["normalize"] is False
    assert recipe["base_model"] == "org/base"
    assert [m["model"] for m in recipe["models"]] == sources["checkpoints"]
    assert [m["parameters"]["weight"] for m in recipe["models"]] == list(report.final.coefficients)


def test_run_with_keep_chosen_leaves_the_chosen_model_loaded(tmp_path):
    model = trained_model()
    report = regression_run(model, tmp_path, CountingEvaluator(), keep_chosen=True)
    chosen = torch.tensor(point(*report.final.coefficients), dtype=torch.float32)
    assert_close(torch.tensor(closeness_weights(model)), chosen)
    saved = RegressionModel.from_pretrained(tmp_path / "exme")
    assert torch.equal(saved.a.detach(), model.a.detach()) and torch.equal(saved.b.detach(), model.b.detach())
    assert not torch.equal(model.a.detach(), TRAINED["a"])


def test_failing_evaluator_reports_what_was_scored_and_restores_the_weights(tmp_path):
    earlier = tmp_path / "exme"
    earlier.mkdir()
    (earlier / "marker.txt").write_text("earlier result")
    model = trained_model()
    evaluator = CountingEvaluator(fail_at=4)  # the 4th EXPO candidate: EXPO-2 with the second alpha
    with pytest.raises(RuntimeError, match="evaluator broke"):
        regression_run(model, tmp_path, evaluator, keep_chosen=True)  # a failed run never keeps a candidate

    assert torch.equal(model.a.detach(), TRAINED["a"]) and torch.equal(model.b.detach(), TRAINED["b"])
    assert sorted(p.name for p in earlier.iterdir()) == ["marker.txt"]
    assert (earlier / "marker.txt").read_text() == "earlier result"
    failed = json.loads((tmp_path / "exme-failed" / "exme_report.json").read_text())
    assert failed["error"] == "RuntimeError: evaluator broke" and failed["final"] is None
    scored = [(c["kind"], tuple(c["coefficients"])) for c in failed["candidates"]]
    sft = [("sft", (1.0, 0.0)), ("sft", (0.0, 1.0))]
    assert scored == [*sft, ("expo", (1.1, 0.0)), ("expo", (1.5, 0.0)), ("expo", (0.0, 1.1))]
    for c in failed["candidates"]:
        assert c["score"] == pytest.approx(closeness(*point(*c["coefficients"])), rel=1e-5, abs=1e-6)
    assert not (tmp_path / "exme-failed" / "README.md").exists()  # no model card for a failed sweep
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exme", "exme-failed", "exme-journal.jsonl"]


def test_a_sweep_started_again_evaluates_only_what_its_journal_lacks(tmp_path):
    with pytest.raises(RuntimeError, match="evaluator broke"):
        regression_run(trained_model(), tmp_path, CountingEvaluator(fail_at=4))
    lines = (tmp_path / "exme-journal.jsonl").read_text().splitlines()
    assert len(lines) == 1 + 3  # the header, the three evaluations that finished
    assert [json.loads(line)["key"]["point"] for line in lines[1:]] == [[1.1, 0.0], [1.5, 0.0], [0.0, 1.1]]

    model, evaluator = trained_model(), CountingEvaluator()
    resumed = regression_run(model, tmp_path, evaluator)
    assert evaluator.calls == 6 - 3  # four EXPO candidates and two merges, less the three journaled
    uninterrupted = regression_run(trained_model(), tmp_path / "again", CountingEvaluator())
    assert {**resumed.to_dict(), "saved": None} == {**uninterrupted.to_dict(), "saved": None}
    assert not (tmp_path / "exme-journal.jsonl").exists()  # removed once the result is published
    saved, reference = (RegressionModel.from_pretrained(p / "exme") for p in (tmp_path, tmp_path / "again"))
    assert torch.equal(saved.a, reference.a) and torch.equal(saved.b, reference.b)


def test_a_journal_of_another_sweep_is_ignored_never_mixed_in(tmp_path, caplog):
    with pytest.raises(RuntimeError, match="evaluator broke"):
        regression_run(trained_model(), tmp_path, CountingEvaluator(fail_at=4))
    (tmp_path / "exme-journal.jsonl").write_text(  # cut short by a kill in the middle of its last line
        (tmp_path / "exme-journal.jsonl").read_text()[:-20]
    )
    evaluator = CountingEvaluator()
    regression_run(trained_model(), tmp_path, evaluator)
    assert evaluator.calls == 6 - 2  # the torn line is evaluated again

    with pytest.raises(RuntimeError, match="evaluator broke"):
        regression_run(trained_model(), tmp_path, CountingEvaluator(fail_at=4))
    model = trained_model()
    live = trainable_tensors(model)
    plane = DensePlane(live, BASE, [SFT1, SFT2], TRAINED, model.save_pretrained)
    checkpoints = [Checkpoint(10, closeness(*point(1, 0))), Checkpoint(20, closeness(*point(0, 1)))]
    evaluator, settings = CountingEvaluator(), SearchSettings(alphas=(0.1, 0.4), betas=BETAS)  # other alphas
    scorer = Scorer(evaluator, Objective({"closeness": True}))
    with caplog.at_level("WARNING", logger="exme_callback.journal"):
        pipeline.run(
            model, plane, checkpoints, scorer, Output(str(tmp_path / "exme"), show_progress=False), settings=settings
        )
    assert evaluator.calls == 6
    assert [r.getMessage() for r in caplog.records if "journal of another sweep" in r.getMessage()] != []


# ---- the strategies through the pipeline -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {"strategy": "mixup", "mixup_draws": 4, "seed": 1},
        {"strategy": "mixup", "mixup_draws": 3, "dare": 0.5},
        {"strategy": "topk_greedy"},
        {"beta_search": "mixup", "mixup_draws": 3},
    ],
    ids=["mixup", "mixup-dare", "topk", "exme-mixup-betas"],
)
def test_every_strategy_restores_the_weights_and_saves_what_it_reports(tmp_path, options):
    model = trained_model()
    live = trainable_tensors(model)
    plane = DensePlane(live, BASE, [SFT1, SFT2], TRAINED, model.save_pretrained)
    checkpoints = [Checkpoint(10, closeness(*point(1, 0))), Checkpoint(20, closeness(*point(0, 1)))]
    seen = []

    def evaluator(model):
        seen.append(closeness_weights(model))
        return {"closeness": closeness(*seen[-1])}

    settings = SearchSettings(alphas=ALPHAS, **options)
    scorer = Scorer(evaluator, Objective({"closeness": True}))
    output = Output(str(tmp_path / "exme"), show_progress=False)
    report = pipeline.run(model, plane, checkpoints, scorer, output, settings=settings)
    assert closeness_weights(model) == (float(TRAINED["a"]), float(TRAINED["b"]))  # restored
    for candidate, weights in zip([c for c in report.candidates if c.kind != "sft"], seen, strict=True):
        assert candidate.score == pytest.approx(closeness(*weights))
        if candidate.on_span:  # the closed form of its coefficients
            assert weights == pytest.approx(point(*candidate.coefficients), abs=1e-6)
    kinds = {c.kind for c in report.candidates} - {"sft"}
    expected = {"mixup": {"mixup"}, "topk_greedy": {"topk"}}.get(settings.strategy, {"expo", "exme"})
    assert kinds == expected
    if settings.strategy == "mixup":
        lambdas = [c.hyper["lambda"] for c in report.candidates if c.kind == "mixup"]
        assert lambdas == list(mixup_draws(settings.mixup_a, settings.mixup_draws, settings.seed))
    if settings.beta_search == "mixup":
        betas = [c.beta for c in report.candidates if c.kind == "exme"]
        assert betas == list(mixup_draws(settings.mixup_a, settings.mixup_draws, settings.seed))
    final = report.final
    assert final.score == max(c.score for c in report.candidates if c.valid)
    saved = closeness_weights(RegressionModel.from_pretrained(tmp_path / "exme"))
    assert closeness(*saved) == pytest.approx(final.score, abs=1e-6)


def test_kinship_partner_skips_a_near_copy_of_the_best():
    from exme_callback.kinship import dense_gram

    base = {"w": torch.zeros(4)}
    best = {"w": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    copy_of_best = {"w": torch.tensor([1.1, 2.0, 3.1, 4.0])}  # Pearson 0.99915 with the best
    other = {"w": torch.tensor([4.0, 1.0, 3.0, 2.0])}  # Pearson 0.0 with the best
    gram = dense_gram(base, [best, copy_of_best, other])
    kept = [Checkpoint(30, 0.9), Checkpoint(20, 0.8), Checkpoint(10, 0.7)]
    assert pipeline.search_order(kept, gram, SearchSettings(partner="next")) == [0, 1, 2]
    assert pipeline.search_order(kept, gram, SearchSettings(partner="kinship", top_k=3)) == [0, 2, 1]
    loose = SearchSettings(partner="kinship", top_k=3, kinship_threshold=0.9995)
    assert pipeline.search_order(kept, gram, loose) == [0, 1, 2]  # the near-copy is below a 0.9995 threshold
    strict = SearchSettings(partner="kinship", top_k=3, kinship_threshold=-0.5)
    assert pipeline.search_order(kept, gram, strict) == [0, 1, 2]  # none below: the second best, with a warning
    far = SearchSettings(partner="kinship", top_k=3, kinship_metric="euclidean", kinship_threshold=1.0)
    assert pipeline.search_order(kept, gram, far) == [0, 2, 1]  # distance 0.14 to the near-copy, 4.5 to the other


# ---- per-item scores: intervals and min_gain ---------------------------------------------------------------------

NOISE = (0.3, -0.3, 0.1, -0.1, 0.2, -0.2)  # per-item noise of mean zero: the items' mean is the closed form


def closeness_items(a: float, b: float) -> list[float]:
    return [closeness(a, b) + e for e in NOISE]


def per_item_run(tmp_path, evaluator, items=True, **settings):
    model = trained_model()
    plane = DensePlane(trainable_tensors(model), BASE, [SFT1, SFT2], TRAINED, model.save_pretrained)
    checkpoints = [
        Checkpoint(step, closeness(*point(*c)), items={"closeness": closeness_items(*point(*c))} if items else {})
        for step, c in ((10, (1, 0)), (20, (0, 1)))
    ]
    scorer = Scorer(evaluator, Objective({"closeness": True}))
    settings = SearchSettings(alphas=ALPHAS, betas=BETAS, **settings)
    output = Output(str(tmp_path / "exme"), show_progress=False)
    return pipeline.run(model, plane, checkpoints, scorer, output, settings=settings)


def test_per_item_scores_give_every_gain_its_paired_interval(tmp_path):
    """Each item moves with the model by the same amount (the noise is the item's own): every paired difference is
    the gain, so every interval is the gain itself, at any level. An unpaired comparison would be 0.2 wide."""
    report = per_item_run(tmp_path, lambda model: {"closeness": closeness_items(*closeness_weights(model))})
    reference = report.best_sft
    for candidate in report.candidates:
        assert candidate.score == pytest.approx(closeness(*point(*candidate.coefficients)), rel=1e-5, abs=1e-6)
        if candidate is reference:
            assert candidate.interval is None
            continue
        gain = candidate.score - reference.score
        assert candidate.interval == pytest.approx((gain, gain), abs=1e-6)
    written = json.loads((tmp_path / "exme" / "exme_report.json").read_text())
    assert written["confidence"] == 0.95 and written["min_gain"] is None
    assert written["final"]["interval"] == pytest.approx(list(report.final.interval))
    assert "items" not in written["final"]  # in exme_items.json
    markdown = (tmp_path / "exme" / "exme_report.md").read_text()
    low, high = report.final.interval
    assert f"[{low:+.4f}, {high:+.4f}]" in markdown and "95% confidence interval (paired bootstrap" in markdown


def test_the_intervals_recompute_from_the_output_folder_alone(tmp_path):
    def evaluator(model):  # the noise grows with `a`: the intervals have a width
        a, b = closeness_weights(model)
        return {"closeness": [closeness(a, b) + e * a * a for e in NOISE]}

    report = per_item_run(tmp_path, evaluator, confidence=0.8, seed=3)
    folder = tmp_path / "exme"
    written = json.loads((folder / "exme_report.json").read_text())
    items = json.loads((folder / written["items_file"]).read_text())
    assert items["gain_weights"] == {"closeness": 1.0} and (items["confidence"], items["seed"]) == (0.8, 3)
    reference = next(i for i, c in enumerate(written["candidates"]) if c["step1"] == 10 and c["kind"] == "sft")
    widths = []
    for i, candidate in enumerate(written["candidates"]):
        assert items["candidates"][i]["items"] == report.candidates[i].items
        if i == reference:
            continue
        recomputed = gain_interval(
            items["candidates"][i]["items"],
            items["candidates"][reference]["items"],
            items["gain_weights"],
            items["confidence"],
            seed=items["seed"],
        )
        assert recomputed == pytest.approx(candidate["interval"], abs=0, rel=0)
        widths.append(recomputed[1] - recomputed[0])
    assert max(widths) > 0.1  # not only degenerate intervals (SFT-2 over SFT-1 is one: their noise is the same)


def test_min_gain_keeps_the_checkpoint_when_no_candidate_clears_it(tmp_path):
    evaluator = lambda model: {"closeness": closeness_items(*closeness_weights(model))}  # noqa: E731
    report = per_item_run(tmp_path, evaluator, min_gain=10.0)
    assert report.final is report.best_sft and report.final.kind == "sft"
    assert "Chosen with `min_gain=10.0`: a candidate only if its gain is above 10." in report.to_markdown()
    significant = per_item_run(tmp_path, evaluator, min_gain="significant")
    assert significant.final.kind == "exme"  # every gain here is exact: the argmax clears zero


def test_aggregate_scores_say_no_interval_and_refuse_a_significant_choice(tmp_path):
    report = regression_run(trained_model(), tmp_path, CountingEvaluator())
    assert all(c.interval is None for c in report.candidates)
    assert "No confidence interval for the selection gains" in report.to_markdown()
    with pytest.raises(ValueError, match="`min_gain='significant'`.*aggregate scores only"):
        per_item_run(tmp_path, CountingEvaluator(), items=False, min_gain="significant")


class ItemEvaluator:
    """The per-item closeness, on the items asked for (racing) or on all of them."""

    def __init__(self):
        self.items_scored = 0

    def __call__(self, model, items=None):
        scores = closeness_items(*closeness_weights(model))
        chosen = range(len(scores)) if items is None else items["closeness"]
        self.items_scored += len(chosen)
        return {"closeness": [scores[i] for i in chosen]}


def test_racing_chooses_the_grids_model_with_fewer_item_evaluations(tmp_path, monkeypatch):
    grid = per_item_run(tmp_path / "grid", ItemEvaluator())
    evaluator = ItemEvaluator()
    one_round = per_item_run(tmp_path / "one-round", evaluator, search="racing")
    assert evaluator.items_scored == grid.item_evaluations  # six items are too few for a second round: the grid
    assert one_round.final.coefficients == grid.final.coefficients
    monkeypatch.setattr("exme_callback.strategies.racing.RACING_MIN_ITEMS", 1)  # rounds of any size
    evaluator = ItemEvaluator()
    racing = per_item_run(tmp_path / "racing", evaluator, search="racing")
    assert racing.final.coefficients == grid.final.coefficients and racing.final.kind == "exme"
    assert racing.final.score == pytest.approx(grid.final.score)
    n = len(NOISE)
    assert grid.item_evaluations == grid.grid_item_evaluations == (2 * len(ALPHAS) + len(BETAS)) * n
    assert racing.grid_item_evaluations == grid.grid_item_evaluations
    assert racing.item_evaluations == evaluator.items_scored < grid.item_evaluations
    written = json.loads((tmp_path / "racing" / "exme" / "exme_report.json").read_text())
    assert (written["search"], written["item_evaluations"]) == ("racing", evaluator.items_scored)
    assert "Racing: " in (tmp_path / "racing" / "exme" / "exme_report.md").read_text()


def test_racing_races_m3s_draws_to_the_grids_choice(tmp_path, monkeypatch):
    monkeypatch.setattr("exme_callback.strategies.racing.RACING_MIN_ITEMS", 1)  # rounds of any size
    grid = per_item_run(tmp_path / "grid", ItemEvaluator(), strategy="mixup", mixup_draws=6)
    evaluator = ItemEvaluator()
    racing = per_item_run(tmp_path / "racing", evaluator, strategy="mixup", mixup_draws=6, search="racing")
    assert racing.final.kind == grid.final.kind == "mixup" and racing.final.hyper == grid.final.hyper
    assert racing.final.score == pytest.approx(grid.final.score)
    assert grid.item_evaluations == 6 * len(NOISE)
    assert racing.item_evaluations == evaluator.items_scored < grid.item_evaluations
    stopped = [c for c in racing.candidates if c.error and "stopped by racing" in c.error]
    assert stopped and all(c.kind == "mixup" for c in stopped)

    # A margin no gain can clear: every draw but the first round's leader stops there (the noise is the items' own,
    # so that leader is the grid's choice).
    evaluator = ItemEvaluator()
    margin = per_item_run(
        tmp_path / "margin", evaluator, strategy="mixup", mixup_draws=6, search="racing", racing_margin=100.0
    )
    assert margin.final.hyper == grid.final.hyper
    first = racing_rounds({"closeness": len(NOISE)}, min_items=1)[0]
    assert margin.item_evaluations == 5 * math.ceil(first * len(NOISE)) + len(NOISE)
    written = json.loads((tmp_path / "margin" / "exme" / "exme_report.json").read_text())
    assert written["racing_margin"] == 100.0
    assert (
        "5 candidates stopped early, not above the leader by more than 100 (`racing_margin`)."
        in (tmp_path / "margin" / "exme" / "exme_report.md").read_text()
    )


# ---- the pipeline's own entry: unscored checkpoints, the base, a strategy of the user's -------------------------


class Corners(Strategy):
    """A strategy of a user's own: the corners of a box around the best checkpoint."""

    name = "corners"

    def evaluations(self, k):
        return 4

    def search(self, search):
        for c1 in (0.8, 1.3):
            for c2 in (-0.2, 0.4):
                search.score(search.point(self.name, (c1, c2), {"c1": c1, "c2": c2}))


def test_run_scores_the_checkpoints_and_the_base_then_runs_a_custom_strategy(tmp_path):
    model = trained_model()
    plane = DensePlane(trainable_tensors(model), BASE, [SFT1, SFT2], TRAINED, model.save_pretrained)
    evaluator = CountingEvaluator()
    scorer = Scorer(evaluator, Objective({"closeness": True}))
    output = Output(str(tmp_path / "exme"), show_progress=False)
    settings = SearchSettings(strategy=Corners())
    report = pipeline.run(
        model, plane, [Checkpoint(10), Checkpoint(20)], scorer, output, settings=settings, score_base=True
    )

    assert evaluator.calls == 2 + 1 + 4  # the checkpoints and the base, scored here, then the strategy's four
    assert [c.score for c in report.checkpoints] == pytest.approx([closeness(*point(1, 0)), closeness(*point(0, 1))])
    assert report.base.score == pytest.approx(closeness(*point(0, 0)), rel=1e-6)
    assert [c.coefficients for c in report.candidates[2:]] == [(0.8, -0.2), (0.8, 0.4), (1.3, -0.2), (1.3, 0.4)]
    for candidate in report.candidates:
        assert candidate.score == pytest.approx(closeness(*point(*candidate.coefficients)), rel=1e-5, abs=1e-6)
    assert report.final is max(report.candidates, key=lambda c: c.score) and report.strategy == "corners"
    assert dict(report.rows())["corners"] is report.final
    saved = RegressionModel.from_pretrained(tmp_path / "exme")
    assert closeness(*closeness_weights(saved)) == pytest.approx(report.final.score, abs=1e-6)
    assert closeness_weights(model) == (float(TRAINED["a"]), float(TRAINED["b"]))  # the trained weights, back


# ---- alphas="auto" -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("items", [True, False], ids=["per-item", "aggregate"])
def test_auto_alphas_extend_each_line_to_its_optimum_and_the_report_records_them(tmp_path, items):
    """The evaluator rewards closeness to EXPO-1 at alpha1 = 1.0 (c = (2, 0)); on EXPO-2's line the closest point
    is c2 = 1.76 (alpha2 = 0.76). Each line goes on past the grid and stops at its first fall."""
    target = point(2.0, 0.0)

    def near(weights):
        return -((weights[0] - target[0]) ** 2 + (weights[1] - target[1]) ** 2)

    calls = []

    def evaluator(model):
        calls.append(closeness_weights(model))
        value = near(calls[-1])
        return {"closeness": [value + e for e in NOISE] if items else value}

    model = trained_model()
    plane = DensePlane(trainable_tensors(model), BASE, [SFT1, SFT2], TRAINED, model.save_pretrained)
    checkpoints = [
        Checkpoint(step, near(point(*c)), items={"closeness": [near(point(*c)) + e for e in NOISE]} if items else {})
        for step, c in ((10, (1, 0)), (20, (0, 1)))
    ]
    scorer = Scorer(evaluator, Objective({"closeness": True}))
    output = Output(str(tmp_path / "exme"), show_progress=False)
    settings = SearchSettings(alphas="auto", betas=BETAS)
    report = pipeline.run(model, plane, checkpoints, scorer, output, settings=settings)

    expo = [c for c in report.candidates if c.kind == "expo"]
    assert [c.alpha1 for c in expo if "alpha1" in c.hyper] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5]
    assert [c.alpha2 for c in expo if "alpha2" in c.hyper] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0]
    assert len(calls) == 9 + 8 + len(BETAS)
    assert {(c.alpha1, c.alpha2) for c in report.candidates if c.kind == "exme"} == {(1.0, 0.8)}
    written = json.loads((tmp_path / "exme" / "exme_report.json").read_text())
    assert written["alphas"] == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.8, 1.0, 1.5]  # the alphas scored
    if items:  # the evaluations the search spent, with no grid to compare with
        assert written["item_evaluations"] == written["grid_item_evaluations"] == len(calls) * len(NOISE)


def test_a_failed_auto_sweep_records_the_alphas_it_scored(tmp_path):
    model = trained_model()
    plane = DensePlane(trainable_tensors(model), BASE, [SFT1, SFT2], TRAINED, model.save_pretrained)
    checkpoints = [Checkpoint(10, closeness(*point(1, 0))), Checkpoint(20, closeness(*point(0, 1)))]
    scorer = Scorer(CountingEvaluator(fail_at=3), Objective({"closeness": True}))  # breaks at alpha1 = 0.3
    output = Output(str(tmp_path / "exme"), show_progress=False)
    with pytest.raises(RuntimeError, match="evaluator broke"):
        pipeline.run(model, plane, checkpoints, scorer, output, settings=SearchSettings(alphas="auto"))
    failed = json.loads((tmp_path / "exme-failed" / "exme_report.json").read_text())
    assert failed["alphas"] == [0.1, 0.2]
