import math

import pytest
import torch

from exme_callback.objective import Objective
from exme_callback.scoring import Evaluator, FunctionEvaluator, Scorer, as_evaluator


def test_per_item_scores_are_averaged_and_kept_for_the_objective():
    def evaluator(model):
        return {"eval_acc": [1, 0, 1, 1], "eval_loss": torch.tensor([0.5, 1.5]), "eval_other": 3.0}

    scorer = Scorer(evaluator, Objective({"acc": True, "loss": False}))
    score, metrics, items = scorer(torch.nn.Linear(1, 1))
    assert metrics == {"eval_acc": 0.75, "eval_loss": 1.0, "eval_other": 3.0}
    assert score == pytest.approx((0.75 - 1.0) / 2)  # mixed directions: the loss enters negated
    assert items == {"acc": [1.0, 0.0, 1.0, 1.0], "loss": [0.5, 1.5]}  # by the objective's names
    # An interval needs every metric of the score item by item: one aggregate metric leaves none.
    assert Scorer(evaluator, Objective({"acc": True, "other": True}))(torch.nn.Linear(1, 1))[2] == {}


@pytest.mark.parametrize("values", [[], ["yes", "no"], [True, False]])
def test_malformed_per_item_scores_name_the_evaluator_and_metric(values):
    scorer = Scorer(lambda model: {"acc": values}, Objective({"acc": True}), name="report_evaluator")
    with pytest.raises(TypeError, match="`report_evaluator` gave `acc` as a list: it must be a non-empty list"):
        scorer(torch.nn.Linear(1, 1))


def test_as_evaluator_reads_scores_subsets_once_from_the_signature():
    def plain(model):
        return {"acc": 1.0}

    def subsets(model, items=None):
        return {"acc": [1.0, 0.0] if items is None else [float(i) for i in items["acc"]]}

    model = torch.nn.Linear(1, 1)
    wrapped = as_evaluator(plain)
    assert isinstance(wrapped, FunctionEvaluator) and wrapped.scores_subsets is False
    assert wrapped.directions is None and wrapped.reuses_training_scores is False
    assert wrapped(model) == {"acc": 1.0}  # called as `fn(model)`, as before
    assert as_evaluator(subsets).scores_subsets is True
    assert as_evaluator(subsets)(model) == {"acc": [1.0, 0.0]}
    assert as_evaluator(subsets)(model, items={"acc": [1]}) == {"acc": [1.0]}
    assert as_evaluator(lambda model, **kwargs: {}).scores_subsets is True
    assert as_evaluator(max).scores_subsets is False  # a builtin without a signature
    assert as_evaluator(wrapped) is wrapped and Scorer(wrapped, Objective({"acc": True})).evaluator is wrapped
    assert isinstance(Scorer(plain, Objective({"acc": True})).evaluator, FunctionEvaluator)
    with pytest.raises(TypeError, match="`report_evaluator` must be a callable `model -> dict"):
        as_evaluator(3, "report_evaluator")


class _Declared(Evaluator):
    """Declares its metrics' directions and that the training's scores are its own."""

    directions = {"eval_acc": True, "eval_loss": False}
    reuses_training_scores = True

    def __call__(self, model):
        return {"eval_acc": 1.0, "eval_loss": 0.0}


def test_an_evaluator_subclass_declares_its_default_objective_and_reuse():
    model = torch.nn.Linear(1, 1)
    objective = Objective.for_evaluator(_Declared(), "eval_f1", True)
    assert objective.metrics == {"eval_acc": True, "eval_loss": False}
    assert Objective.for_evaluator(lambda model: {}, "eval_f1", True).metrics == {"eval_f1": True}  # the trainer's
    training = {"eval_acc": 0.5, "eval_loss": 0.25, "epoch": 1.0}
    score, metrics, items, fresh = Scorer(_Declared(), objective).evaluation(model, training)
    assert (score, metrics, items, fresh) == (
        pytest.approx((0.5 - 0.25) / 2),
        {"eval_acc": 0.5, "eval_loss": 0.25},
        {},
        False,
    )
    assert Scorer(_Declared().__call__, objective).evaluation(model, training)[::3] == (pytest.approx(0.5), True)
    base = Evaluator()
    assert base.directions is None and base.scores_subsets is False and base.reuses_training_scores is False
    assert base.use_tokenizer(object()) is None
    with pytest.raises(NotImplementedError, match="must define `__call__"):
        base(model)


def test_a_group_asked_for_no_item_is_left_out_and_scores_no_item():
    """Racing's rounds can ask a group of a few items for none: the evaluator is not asked for it, its metrics'
    per-item scores are empty, and the subset has no score."""
    asked = []

    def evaluator(model, items=None):
        asked.append(items)
        return {"a/acc": [float(i) for i in items["a"]]}

    scorer = Scorer(evaluator, Objective({"a/acc": True, "b/acc": True}))
    score, metrics, items = scorer(torch.nn.Linear(1, 1), items={"a": [1, 0], "b": []})
    assert asked == [{"a": [1, 0]}]
    assert math.isnan(score) and metrics == {"a/acc": 0.5} and items == {"a/acc": [1.0, 0.0], "b/acc": []}
    assert scorer(torch.nn.Linear(1, 1), items={"a": [], "b": []})[2] == {"a/acc": [], "b/acc": []}
    assert len(asked) == 1


@pytest.mark.slow
def test_distributed_scorer_splits_plain_evaluators_of_items(tmp_path):
    """Two gloo processes: a plain evaluator that takes `items` is asked for each rank's round-robin share (the
    short share padded with the group's first item) and every rank gets all the per-item scores, in order, as one
    process does; the number it gave for its share is dropped. A `rank_aware` evaluator is asked for every item on
    every rank, and one without `items` is called as in one process."""
    import json
    import os
    import subprocess
    import sys

    script = os.path.join(os.path.dirname(__file__), "_scoring_run.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    (tmp_path / "one").mkdir()
    for command in ([sys.executable, script, str(tmp_path / "one")], [*torchrun, script, str(tmp_path)]):
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-3000:]
    one = json.loads((tmp_path / "one" / "rank-0.json").read_text())
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]

    a, b = [2, 3, 5, 7, 11, 13, 17], [4]
    assert one["asked"]["plain"] == [{"a": a, "b": b}]
    assert ranks[0]["asked"]["plain"] == [{"a": [2, 5, 11, 17], "b": [4]}]
    assert ranks[1]["asked"]["plain"] == [{"a": [3, 7, 13, 2], "b": [4]}]  # padded with each group's first item
    expected = {"a/acc": [i / 10 for i in a], "b": [-4.0]}
    assert one["returned"]["plain"][2] == expected
    for r in ranks:
        score, metrics, items = r["returned"]["plain"]
        assert items == expected and "count" not in metrics  # 4 or 3 on a rank: not the whole's 7
        assert score == one["returned"]["plain"][0] == pytest.approx((sum(a) / 70 - 4) / 2)
        for name, calls in (("rank_aware", [{"a": a, "b": b}]), ("without_items", [None])):
            assert r["asked"][name] == calls and r["returned"][name] == one["returned"][name]
