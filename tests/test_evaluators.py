import math

import pytest
import torch
from conftest import regression_args
from transformers import Trainer, TrainerCallback

from exme_callback.evaluators import Objective, TrainerEvaluator, numeric_metrics


def test_objective_defaults_follow_the_trainer():
    assert Objective.from_spec().metrics == {"eval_loss": False}
    assert Objective.from_spec(None, "accuracy", True).metrics == {"accuracy": True}
    assert Objective.from_spec(None, "loss", False).greater_is_better is False
    assert Objective.from_spec(["eval_loss", "eval_acc"]).metrics == {"eval_loss": False, "eval_acc": True}


def test_objective_same_direction_is_plain_mean():
    objective = Objective.from_spec({"a": "max", "b": "max"})
    assert objective.greater_is_better and objective.name == "mean(a, b)"
    assert objective({"eval_a": 0.5, "b": 0.8, "c": 9}) == pytest.approx(0.65)
    lower = Objective.from_spec({"x_loss": "min", "y_loss": "min"})
    assert lower.greater_is_better is False and lower({"x_loss": 1.0, "y_loss": 3.0}) == 2.0


def test_objective_mixed_directions_negate_lower_is_better():
    objective = Objective.from_spec({"acc": "max", "loss": "min"})
    assert objective.greater_is_better and objective.name == "mean(acc, -loss)"
    assert objective({"acc": 0.8, "loss": 0.4}) == pytest.approx(0.2)


def test_objective_values_and_errors():
    objective = Objective.from_spec("loss")
    assert objective.values({"eval_loss": torch.tensor(0.25)}) == {"eval_loss": 0.25}
    assert math.isnan(objective({"eval_loss": math.nan}))
    with pytest.raises(KeyError, match=r"'loss' is not in the evaluation's output, which has \['eval_acc'\]"):
        objective({"eval_acc": 1.0})
    with pytest.raises(TypeError, match="'eval_loss' must be a real number"):
        objective({"eval_loss": [1.0]})
    with pytest.raises(ValueError, match="`metrics` must not repeat"):
        Objective.from_spec(["a", "a"])
    with pytest.raises(ValueError, match="at least one metric"):
        Objective({})


def test_numeric_metrics_drops_timings():
    metrics = {"eval_loss": 1, "eval_runtime": 0.1, "eval_samples_per_second": 9.0, "epoch": 2.0, "note": "x"}
    assert numeric_metrics(metrics) == {"eval_loss": 1.0}


def test_trainer_evaluator_is_silent(tmp_path, regression):
    model, train_data, eval_data = regression
    seen = []

    class Spy(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            seen.append("evaluate")

        def on_log(self, args, state, control, **kwargs):
            seen.append("log")

    trainer = Trainer(model=model, args=regression_args(tmp_path), eval_dataset=eval_data, callbacks=[Spy()])
    evaluator = TrainerEvaluator(trainer)
    history = list(trainer.state.log_history)
    metrics = evaluator(model)
    expected = torch.nn.functional.mse_loss(model.a.detach() * eval_data.x + model.b.detach(), eval_data.y)
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert seen == [] and trainer.state.log_history == history
    assert evaluator.reuses_training_scores and not TrainerEvaluator(trainer, eval_data).reuses_training_scores
    with pytest.raises(ValueError, match="its trainer's own model"):
        evaluator(torch.nn.Linear(1, 1))
    trainer.evaluate()
    assert seen == ["log", "evaluate"]  # the callbacks are back


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    """Two lm-eval tasks over local files, and an evaluator of them (built once: indexing tasks takes seconds)."""
    pytest.importorskip("lm_eval")
    from conftest import make_tokenizer, write_lm_eval_tasks

    from exme_callback import LMEvalEvaluator

    folder = tmp_path_factory.mktemp("tasks")
    tasks = write_lm_eval_tasks(folder)
    return folder, LMEvalEvaluator(tasks, make_tokenizer(), include_path=str(folder), batch_size=4)


def test_lm_eval_multiple_choice_accuracy_matches_a_direct_computation(lm_eval_tasks, tokenizer):
    import json

    from conftest import make_llama

    folder, evaluator = lm_eval_tasks
    model = make_llama(seed=3)
    metrics = evaluator(model)
    assert evaluator.directions == {"toy_choice/acc": True, "toy_generate/exact_match": True}
    assert set(metrics) == set(evaluator.directions)

    # acc = the share of questions whose label has the highest log-likelihood of continuation " {choice}".
    correct = 0
    rows = [json.loads(line) for line in (folder / "toy_choice.jsonl").read_text().splitlines()]
    for row in rows:
        scores = []
        for choice in row["choices"]:
            context = tokenizer(row["q"])["input_ids"]
            full = tokenizer(row["q"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([full])).logits.log_softmax(-1)[0]
            scores.append(sum(logprobs[i - 1, full[i]].item() for i in range(len(context), len(full))))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    assert metrics["toy_choice/acc"] == pytest.approx(correct / len(rows))
    assert 0.0 <= metrics["toy_generate/exact_match"] <= 1.0


def test_lm_eval_evaluator_is_repeatable_and_leaves_rng_mode_and_lm_eval_alone(lm_eval_tasks):
    import random

    import lm_eval.api.task
    import numpy as np
    import tqdm
    from conftest import make_llama

    _, evaluator = lm_eval_tasks
    model = make_llama(seed=4).train()
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first, second = evaluator(model), evaluator(model)
    assert first == second
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert model.training
    assert lm_eval.api.task.tqdm is tqdm.tqdm  # its progress bar is hidden only during an evaluation


def test_lm_eval_evaluator_errors(lm_eval_tasks):
    from exme_callback import LMEvalEvaluator

    folder, _ = lm_eval_tasks
    with pytest.raises(ValueError, match="`tasks` must be a non-empty list"):
        LMEvalEvaluator("toy_choice")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        LMEvalEvaluator(["toy_choice"], batch_size=0)
    with pytest.raises(ValueError, match="`include_path` must be a folder"):
        LMEvalEvaluator(["toy_choice"], include_path=str(folder / "missing"))
