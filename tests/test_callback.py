"""ExMeCallback on a two-scalar regression model: every candidate's weights are known in closed form."""

import json
import logging
import math
import os
import pathlib
import random
from types import SimpleNamespace

import pytest
import torch
from conftest import RegressionDataset, RegressionModel, regression_args
from torch.testing import assert_close
from transformers import EarlyStoppingCallback, Trainer, TrainerCallback

from exme_callback import ExMeCallback, exme_coefficients
from exme_callback.snapshots import SnapshotStore, trainable_tensors
from exme_callback.strategies import DEFAULT_ALPHAS, DEFAULT_BETAS

TARGET = torch.tensor([2.5, 2.0], dtype=torch.float64)  # the (a, b) the recording evaluator rewards


def weights(model) -> torch.Tensor:
    return torch.stack([model.a.detach(), model.b.detach()]).double()


HELDOUT_TARGET = torch.tensor([1.0, 4.0], dtype=torch.float64)  # the (a, b) the held-out evaluator rewards


class RecordingEvaluator:
    """Scores `-|(a, b) - target|^2` (a closed form of the weights) as `metric` and records the weights it saw."""

    def __init__(self, target: torch.Tensor = TARGET, metric: str = "closeness"):
        self.target, self.metric = target, metric
        self.seen: list[torch.Tensor] = []

    def __call__(self, model):
        w = weights(model)
        self.seen.append(w)
        return {self.metric: -float(((w - self.target) ** 2).sum())}


def heldout_recorder() -> RecordingEvaluator:
    """The held-out evaluator: `-|(a, b) - HELDOUT_TARGET|^2` as `heldout_closeness`."""
    return RecordingEvaluator(HELDOUT_TARGET, "heldout_closeness")


def train(tmp_path, regression, callback_kwargs=None, evaluator=None, callbacks=None, **args):
    model, train_data, eval_data = regression
    trainer = Trainer(
        model=model,
        args=regression_args(tmp_path, **args),
        train_dataset=train_data,
        eval_dataset=eval_data,
        callbacks=callbacks,
    )
    callback = ExMeCallback(trainer, evaluator=evaluator, **(callback_kwargs or {}))
    trainer.add_callback(callback)
    trainer.train()
    return trainer, callback


def test_every_candidate_is_base_plus_plane_combination(tmp_path, regression):
    evaluator = RecordingEvaluator()
    base = weights(regression[0])
    trainer, callback = train(tmp_path, regression, {"metrics": {"closeness": "max"}}, evaluator)
    trained = weights(trainer.model)

    # Evaluations: the base, 8 checkpoints during training (32 steps, every 8), then the sweep.
    assert len(evaluator.seen) == 1 + 4 + 2 * len(DEFAULT_ALPHAS) + len(DEFAULT_BETAS)
    assert_close(evaluator.seen[0], base)
    checkpoints = {8 * (i + 1): w for i, w in enumerate(evaluator.seen[1:5])}
    report = callback.report
    (step1, s1), (step2, s2) = [(c.step, c.score) for c in report.checkpoints]
    scores = {step: -float(((w - TARGET) ** 2).sum()) for step, w in checkpoints.items()}
    ranked = sorted(scores, key=scores.get, reverse=True)
    assert [step1, step2] == ranked[:2] and s1 == pytest.approx(scores[step1])
    logged = {e["step"]: e["exme/checkpoint/score"] for e in trainer.state.log_history if "exme/checkpoint/score" in e}
    assert logged == pytest.approx(scores)  # every checkpoint's score is logged

    d1, d2 = checkpoints[step1] - base, checkpoints[step2] - base
    candidates = report.candidates
    assert [c.kind for c in candidates] == ["sft"] * 2 + ["expo"] * 10 + ["exme"] * 9
    assert [(c.score, c.step1 or c.step2) for c in candidates[:2]] == [(s1, step1), (s2, step2)]  # from training
    for candidate, seen in zip(candidates[2:], evaluator.seen[5:], strict=True):
        expected = base + candidate.c1 * d1 + candidate.c2 * d2
        assert_close(seen, expected, rtol=1e-5, atol=1e-6)
        assert candidate.score == pytest.approx(-float(((expected - TARGET) ** 2).sum()), rel=1e-4, abs=1e-6)

    # The alpha of each EXPO is the best of the grid; ExMe uses those two alphas.
    expo = [c for c in candidates if c.kind == "expo"]
    alpha1 = max(expo[:5], key=lambda c: c.score).alpha1
    alpha2 = max(expo[5:], key=lambda c: c.score).alpha2
    for c, beta in zip(candidates[12:], DEFAULT_BETAS, strict=True):
        assert (c.alpha1, c.alpha2, c.beta) == (alpha1, alpha2, beta)
        assert (c.c1, c.c2) == pytest.approx(exme_coefficients(alpha1, alpha2, beta))

    # The final model is the best candidate, saved; the live model holds the trained weights again.
    best = max(candidates, key=lambda c: c.score)
    assert (report.final.c1, report.final.c2) == (best.c1, best.c2)
    assert report.final.score >= max(s1, s2)
    assert torch.equal(weights(trainer.model), trained)
    saved = RegressionModel.from_pretrained(tmp_path / "exme")
    assert_close(weights(saved), base + best.c1 * d1 + best.c2 * d2, rtol=1e-6, atol=1e-6)
    assert evaluator(saved)["closeness"] == pytest.approx(report.final.score, rel=1e-5)


def test_report_files(tmp_path, regression):
    trainer, callback = train(tmp_path, regression)
    with open(tmp_path / "exme" / "exme_report.json") as f:
        data = json.load(f)
    assert data["metric"] == "eval_loss" and data["greater_is_better"] is False
    assert [c["step"] for c in data["checkpoints"]] == [c.step for c in callback.report.checkpoints]
    assert data["final"] == callback.report.final.to_dict()
    for entry in data["candidates"]:
        assert set(entry) >= {"kind", "step1", "step2", "alpha1", "alpha2", "beta", "c1", "c2", "score"}
    table = (tmp_path / "exme" / "exme_report.md").read_text()
    for row in ("| Base |", "| SFT-1 |", "| SFT-2 |", "| EXPO-1 |", "| EXPO-2 |", "| ExMe |", "| Chosen ("):
        assert row in table
    assert f"{callback.report.final.score:.4f}" in table


def test_trainer_evaluation_reuses_training_scores_and_leaves_trainer_state(tmp_path, regression):
    model, train_data, eval_data = regression
    args = regression_args(
        tmp_path, metric_for_best_model="loss", save_strategy="steps", save_steps=8, load_best_model_at_end=True
    )
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=train_data,
        eval_dataset=eval_data,
        callbacks=[EarlyStoppingCallback(early_stopping_patience=100)],
    )
    early_stopping = next(c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback))

    class Snapshot(TrainerCallback):
        """Captures the trainer's state as training left it, just before the sweep."""

        def on_train_end(self, args, state, control, **kwargs):
            self.state = (
                state.best_metric,
                state.best_model_checkpoint,
                early_stopping.early_stopping_patience_counter,
                [dict(e) for e in state.log_history],
            )

    snapshot = Snapshot()
    trainer.add_callback(snapshot)  # runs before ExMeCallback's on_train_end
    callback = ExMeCallback(trainer)
    trainer.add_callback(callback)
    trainer.train()

    best_metric, best_checkpoint, patience, history = snapshot.state
    assert trainer.state.best_metric == best_metric and trainer.state.best_model_checkpoint == best_checkpoint
    assert early_stopping.early_stopping_patience_counter == patience
    eval_entries = [e for e in trainer.state.log_history if "eval_loss" in e]
    assert eval_entries == [e for e in history if "eval_loss" in e]
    assert not any(k.startswith("eval_") for e in trainer.state.log_history[len(history) :] for k in e)
    assert any("exme/score" in e for e in trainer.state.log_history[len(history) :])
    # SFT rows reuse the training evaluations: no re-evaluation, same numbers.
    training_scores = {e["step"]: e["eval_loss"] for e in eval_entries}
    for candidate in callback.report.candidates[:2]:
        assert candidate.score == training_scores[candidate.step1 or candidate.step2]


def test_restores_trained_weights_exactly_and_load_exme_at_end(tmp_path, regression):
    trainer, callback = train(tmp_path / "restore", regression)
    final = callback.report.final
    assert (final.c1, final.c2) != (1.0, 0.0)  # the test needs a final model other than the trained one
    trained = weights(trainer.model)

    fresh = (RegressionModel(regression[0].config), RegressionDataset(64, 0), RegressionDataset(32, 1))
    trainer2, callback2 = train(tmp_path / "load", fresh, {"load_exme_at_end": True})
    assert torch.equal(
        weights(trainer2.model).float(), weights(RegressionModel.from_pretrained(tmp_path / "load" / "exme")).float()
    )
    assert not torch.equal(weights(trainer2.model), trained)


def test_disk_storage_equals_cpu_storage(tmp_path, regression):
    _, cpu = train(tmp_path / "cpu", regression)
    fresh = (RegressionModel(regression[0].config), RegressionDataset(64, 0), RegressionDataset(32, 1))
    _, disk = train(tmp_path / "disk", fresh, {"storage": "disk"})
    assert [c.to_dict() for c in disk.report.candidates] == [c.to_dict() for c in cpu.report.candidates]
    assert not os.path.exists(tmp_path / "disk" / "exme-snapshots")
    a = RegressionModel.from_pretrained(tmp_path / "cpu" / "exme")
    b = RegressionModel.from_pretrained(tmp_path / "disk" / "exme")
    assert torch.equal(weights(a), weights(b))


def test_choose_from_exme_picks_the_best_merge(tmp_path, regression):
    _, callback = train(tmp_path, regression, {"choose_from": "exme"})
    merges = [c for c in callback.report.candidates if c.kind == "exme"]
    assert callback.report.final == min(merges, key=lambda c: c.score)


def test_one_checkpoint_extrapolates_with_a_warning(tmp_path, regression, caplog):
    with caplog.at_level(logging.WARNING):
        _, callback = train(tmp_path, regression, eval_steps=32)
    assert "only one checkpoint" in caplog.text
    assert [c.kind for c in callback.report.candidates] == ["sft"] + ["expo"] * 5
    assert all(c.c2 == 0.0 for c in callback.report.candidates)


def test_no_evaluation_warns_and_writes_nothing(tmp_path, regression, caplog):
    with caplog.at_level(logging.WARNING):
        _, callback = train(tmp_path, regression, eval_delay=1000)
    assert "no checkpoint was evaluated" in caplog.text
    assert callback.report is None and not os.path.exists(tmp_path / "exme")


def test_non_finite_scores_are_skipped_and_reported(tmp_path, regression):
    def evaluator(model):
        a = model.a.item()
        return {"score": math.nan if a > 2.05 else -abs(a - 2.0)}

    _, callback = train(tmp_path, regression, {"metrics": {"score": "max"}, "alphas": (0.1, 5.0)}, evaluator)
    skipped = [c for c in callback.report.candidates if not c.valid]
    assert skipped and all("non-finite" in c.error for c in skipped)
    assert callback.report.final.valid
    assert "Skipped candidates" in (tmp_path / "exme" / "exme_report.md").read_text()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"alphas": ()}, ValueError, "`alphas` must be a non-empty"),
        ({"alphas": (0.1, float("nan"))}, ValueError, "`alphas` must be .* finite"),
        ({"alphas": (-0.1,)}, ValueError, r"`alphas` must be .* >= 0"),
        ({"alphas": (0.1, 0.1)}, ValueError, "`alphas` must not repeat"),
        ({"betas": (0.5, 1.5)}, ValueError, r"`betas` must be .* in \[0.0, 1.0\]"),
        ({"betas": "0.5"}, TypeError, "`betas` must be a sequence"),
        ({"choose_from": "best"}, ValueError, "`choose_from` must be one of"),
        ({"storage": "gpu"}, ValueError, "`storage` must be one of"),
        ({"metrics": []}, ValueError, "`metrics` must be a non-empty list"),
        ({"metrics": {"eval_loss": "lower"}}, ValueError, "`metrics` must map metric names to 'max' or 'min'"),
        ({"load_exme_at_end": "yes"}, TypeError, "`load_exme_at_end` must be a bool"),
        ({"evaluator": 3}, TypeError, "`evaluator` must be a callable"),
        ({"base_model": 3}, TypeError, r"`base_model` must be a path \(str or os.PathLike\), got 3"),
    ],
)
def test_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ExMeCallback(evaluator=lambda model: {}, **kwargs) if "evaluator" not in kwargs else ExMeCallback(**kwargs)


def test_needs_trainer_or_evaluator():
    with pytest.raises(ValueError, match="pass the trainer"):
        ExMeCallback()
    with pytest.raises(TypeError, match="`trainer` must be a `transformers.Trainer`"):
        ExMeCallback("trainer")


def test_no_eval_strategy_is_refused_before_training(tmp_path, regression):
    model, train_data, _ = regression
    trainer = Trainer(model=model, args=regression_args(tmp_path, eval_strategy="no"), train_dataset=train_data)
    trainer.add_callback(ExMeCallback(trainer))
    before = weights(model)
    with pytest.raises(ValueError, match="`eval_strategy` is 'no'"):
        trainer.train()
    assert torch.equal(weights(model), before)  # refused before any step


def test_no_eval_dataset_is_refused(tmp_path, regression):
    model, train_data, _ = regression
    trainer = Trainer(model=model, args=regression_args(tmp_path, eval_strategy="no"), train_dataset=train_data)
    trainer.args.eval_strategy = "steps"  # as if the dataset were removed after construction
    trainer.add_callback(ExMeCallback(trainer))
    with pytest.raises(ValueError, match="has no `eval_dataset`"):
        trainer.train()


def test_missing_metric_is_refused_before_training(tmp_path, regression):
    model = regression[0]
    before = weights(model)
    with pytest.raises(KeyError, match="'eval_accuracy' is not in the evaluation's output, which has .*eval_loss"):
        train(tmp_path, regression, {"metrics": "eval_accuracy"})
    assert torch.equal(weights(model), before)


def test_evaluator_returning_non_numbers_is_refused(tmp_path, regression):
    with pytest.raises(TypeError, match="'score' must be a real number, got 'high'"):
        train(tmp_path, regression, {"metrics": "score"}, evaluator=lambda model: {"score": "high"})
    with pytest.raises(TypeError, match="`evaluator` must return a dict"):
        train(tmp_path, regression, {"metrics": "score"}, evaluator=lambda model: 0.5)


def test_plain_callback_list_with_evaluator(tmp_path, regression):
    model, train_data, eval_data = regression
    evaluator = RecordingEvaluator()
    callback = ExMeCallback(evaluator=evaluator, metrics={"closeness": "max"})
    trainer = Trainer(
        model=model,
        args=regression_args(tmp_path),
        train_dataset=train_data,
        eval_dataset=eval_data,
        callbacks=[callback],
    )
    trainer.train()
    assert callback.report.final.score == max(c.score for c in callback.report.candidates)
    assert os.path.exists(tmp_path / "exme" / "exme_report.json")
    assert os.path.exists(tmp_path / "exme" / "model.safetensors")


class TrainedWeights(TrainerCallback):
    """Records the weights as training left them (it runs before ExMeCallback's `on_train_end`)."""

    weights = None

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.weights = weights(model)


class FailingEvaluator(RecordingEvaluator):
    """Raises `error` at its `fail_at`-th call (the base and checkpoints count too)."""

    def __init__(self, fail_at, error):
        super().__init__()
        self.fail_at, self.error = fail_at, error

    def __call__(self, model):
        if len(self.seen) + 1 == self.fail_at:
            raise self.error
        return super().__call__(model)


@pytest.mark.parametrize("error", [RuntimeError("evaluator broke"), KeyboardInterrupt()], ids=["error", "interrupt"])
def test_failure_during_the_sweep_restores_weights_and_reports(tmp_path, regression, error):
    earlier = tmp_path / "exme"
    earlier.mkdir()
    (earlier / "exme_report.json").write_text('{"earlier": true}')
    evaluator = FailingEvaluator(fail_at=1 + 4 + 3, error=error)  # base, checkpoints, 3rd EXPO
    trained = TrainedWeights()
    with pytest.raises(type(error)):
        train(tmp_path, regression, {"metrics": {"closeness": "max"}}, evaluator, callbacks=[trained])

    assert torch.equal(weights(regression[0]), trained.weights)
    assert json.loads((earlier / "exme_report.json").read_text()) == {"earlier": True}  # untouched
    failed = json.loads((tmp_path / "exme-failed" / "exme_report.json").read_text())
    assert failed["error"].startswith(type(error).__name__) and failed["final"] is None
    assert [c["kind"] for c in failed["candidates"]] == ["sft", "sft", "expo", "expo"]
    assert "The sweep failed" in (tmp_path / "exme-failed" / "exme_report.md").read_text()
    assert sorted(os.listdir(tmp_path)) == ["exme", "exme-failed", "exme-journal.jsonl"]


def test_full_disk_while_saving_keeps_earlier_result(tmp_path, regression, monkeypatch):
    earlier = tmp_path / "exme"
    earlier.mkdir()
    (earlier / "model.safetensors").write_text("earlier")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Trainer, "save_model", full_disk)
    trained = TrainedWeights()
    with pytest.raises(OSError, match="No space left"):
        train(tmp_path, regression, callbacks=[trained])
    assert torch.equal(weights(regression[0]), trained.weights)
    assert (earlier / "model.safetensors").read_text() == "earlier"
    assert not os.path.exists(tmp_path / "exme.incomplete")
    failed = json.loads((tmp_path / "exme-failed" / "exme_report.json").read_text())
    assert len(failed["candidates"]) == 21 and failed["final"] is not None


class Crash(TrainerCallback):
    """Stops the process the hard way (no `on_train_end`) once training passes `step`."""

    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise SystemExit("crashed")


@pytest.mark.parametrize("storage", ["cpu", "disk"])
def test_resumed_run_ends_like_an_uninterrupted_one(tmp_path, storage):
    def run(output_dir, crash_at=None, resume=False):
        model = RegressionModel(RegressionModel.config_class())
        args = regression_args(output_dir, save_strategy="steps", save_steps=8)
        trainer = Trainer(
            model=model,
            args=args,
            train_dataset=RegressionDataset(64, 0),
            eval_dataset=RegressionDataset(32, 1),
            callbacks=[Crash(crash_at)] if crash_at else [],
        )
        callback = ExMeCallback(trainer, storage=storage)
        trainer.add_callback(callback)
        trainer.train(resume_from_checkpoint=resume)
        return callback

    uninterrupted = run(tmp_path / "a")
    with pytest.raises(SystemExit):
        run(tmp_path / "b", crash_at=20)  # after checkpoint-16, before checkpoint-24
    assert os.path.exists(tmp_path / "b" / "checkpoint-16" / "exme" / "exme_state.json")
    resumed = run(tmp_path / "b", resume=True)

    assert [c.to_dict() for c in resumed.report.candidates] == [c.to_dict() for c in uninterrupted.report.candidates]
    assert resumed.report.base.score == uninterrupted.report.base.score
    a = RegressionModel.from_pretrained(tmp_path / "a" / "exme")
    b = RegressionModel.from_pretrained(tmp_path / "b" / "exme")
    assert torch.equal(weights(a), weights(b))


def test_resuming_without_exme_state_is_refused(tmp_path, regression):
    model, train_data, eval_data = regression
    args = regression_args(tmp_path, save_strategy="steps", save_steps=8, max_steps=8)
    Trainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data).train()
    trainer = Trainer(
        model=model,
        args=regression_args(tmp_path, save_strategy="steps", save_steps=8),
        train_dataset=train_data,
        eval_dataset=eval_data,
    )
    trainer.add_callback(ExMeCallback(trainer))
    with pytest.raises(FileNotFoundError, match="checkpoint-8 has no ExMe state"):
        trainer.train(resume_from_checkpoint=True)


def test_bad_output_dir_type_and_unwritable_output_are_refused_before_training(tmp_path, regression):
    with pytest.raises(TypeError, match="`output_dir` must be a path"):
        ExMeCallback(evaluator=lambda m: {}, output_dir=3)
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    model = regression[0]
    before = weights(model)
    with pytest.raises(OSError, match="is not writable .* Set `output_dir`"):
        train(tmp_path / "run", regression, {"output_dir": blocker / "exme"})
    assert torch.equal(weights(model), before)


def test_no_trainable_parameters_is_refused(tmp_path, regression):
    regression[0].requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        train(tmp_path, regression)


def test_quantized_models_are_refused(tmp_path, regression):
    model, train_data, eval_data = regression
    trainer = Trainer(model=model, args=regression_args(tmp_path), train_dataset=train_data, eval_dataset=eval_data)
    callback = ExMeCallback(trainer)
    model.is_quantized = True  # as transformers marks a bitsandbytes/GPTQ model
    with pytest.raises(NotImplementedError, match="cannot blend quantized weights"):
        callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=model)


def test_a_significant_choice_without_per_item_scores_is_refused_before_training(tmp_path, regression):
    model, train_data, eval_data = regression
    trainer = Trainer(model=model, args=regression_args(tmp_path), train_dataset=train_data, eval_dataset=eval_data)
    callback = ExMeCallback(trainer, min_gain="significant")  # the trainer's evaluation: aggregate metrics
    with pytest.raises(ValueError, match="`min_gain='significant'`.*aggregate scores only"):
        callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=model)
    assert trainer.state.global_step == 0


def test_fsdp1_is_refused(tmp_path, regression, monkeypatch):
    model, train_data, eval_data = regression
    trainer = Trainer(model=model, args=regression_args(tmp_path), train_dataset=train_data, eval_dataset=eval_data)
    callback = ExMeCallback(trainer)
    fsdp1 = SimpleNamespace(state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=1)))
    monkeypatch.setattr(trainer, "accelerator", fsdp1)  # as `accelerate launch` with `fsdp_version: 1` sets it
    with pytest.raises(NotImplementedError, match="does not support FSDP1.*`fsdp_version: 2`"):
        callback.on_train_begin(trainer.args, trainer.state, trainer.control, model=model)


def test_frozen_tied_parameters_and_buffers_are_left_as_trained(tmp_path, regression):
    """Only trainable tensors are on the plane: a frozen parameter and a buffer keep their trained values."""
    model = regression[0]
    model.b.requires_grad_(False)
    model.register_buffer("statistic", torch.tensor(7.0))
    buffers_seen = []

    class BufferRecorder(RecordingEvaluator):
        def __call__(self, model):
            buffers_seen.append(model.statistic.item())
            model.statistic += 1  # as a BatchNorm update would; candidates start from what the last one left
            return super().__call__(model)

    evaluator = BufferRecorder()
    trainer, callback = train(tmp_path, regression, {"metrics": {"closeness": "max"}}, evaluator)
    assert {c.c1 for c in callback.report.candidates} > {0.0, 1.0}
    assert all(w[1] == 0.0 for w in evaluator.seen)  # b never moved: frozen in training and in the sweep
    assert buffers_seen == [7.0 + i for i in range(len(evaluator.seen))]  # never blended, never reset
    assert [n for n in trainable_tensors(model)] == ["a"]


def test_baselines_and_heldout_rows_have_closed_forms(tmp_path, regression):
    from peft.utils import merge_utils

    heldout, heldout_target = heldout_recorder(), HELDOUT_TARGET
    heldout_seen = heldout.seen

    evaluator = RecordingEvaluator()
    base = weights(regression[0])
    trainer, callback = train(
        tmp_path,
        regression,
        {
            "metrics": {"closeness": "max"},
            "baselines": True,
            "report_evaluator": heldout,
            "report_metrics": {"heldout_closeness": "max"},
        },
        evaluator,
    )
    report = callback.report
    checkpoints = {8 * (i + 1): w for i, w in enumerate(evaluator.seen[1:5])}
    s1, s2 = (checkpoints[c.step] for c in report.checkpoints)
    d1, d2 = s1 - base, s2 - base

    kinds = [c.kind for c in report.candidates]
    assert kinds[21:] == ["weighted"] * 9 + ["ties"] * 3 + ["dare"] * 3
    for candidate, seen in zip(report.candidates[21:], evaluator.seen[5 + 19 :], strict=True):
        if candidate.kind == "weighted":
            lam = candidate.hyper["lambda"]
            expected = lam * s1 + (1 - lam) * s2
        elif candidate.kind == "ties":
            merged = [
                merge_utils.ties(
                    [d1[i : i + 1].float(), d2[i : i + 1].float()], torch.ones(2), candidate.hyper["density"]
                )
                for i in range(2)
            ]
            expected = base + torch.cat(merged).double()
        else:
            continue  # DARE's random mask: checked below for determinism
        assert_close(seen, expected, rtol=1e-5, atol=1e-6)
    assert report.final.kind in ("sft", "expo", "exme")  # baselines are never chosen

    # Held-out: every table row scored once by the report evaluator, with its own closed form.
    rows = {label: c for label, c in report.rows()}
    assert {"Weighted", "TIES", "DARE", "Base"} <= set(rows)
    assert len(heldout_seen) == len({id(c) for c in rows.values()})
    for candidate in rows.values():
        assert candidate.heldout_score is not None
        assert candidate.heldout_metrics == {"heldout_closeness": candidate.heldout_score}
    assert rows["Base"].heldout_score == pytest.approx(-float(((base - heldout_target) ** 2).sum()))
    c = rows["ExMe"]
    expected = base + c.c1 * d1 + c.c2 * d2
    assert c.heldout_score == pytest.approx(-float(((expected - heldout_target) ** 2).sum()), rel=1e-5)
    dare = rows["DARE"]
    dare_seen = [w for cand, w in zip(report.candidates[21:], evaluator.seen[24:], strict=True) if cand is dare][0]
    assert dare.heldout_score == pytest.approx(-float(((dare_seen - heldout_target) ** 2).sum()), rel=1e-6)
    assert "held-out" in (tmp_path / "exme" / "exme_report.md").read_text()


def test_base_is_scored_once_with_eval_on_start(tmp_path, regression):
    evaluator = RecordingEvaluator()
    base = weights(regression[0])
    _, callback = train(tmp_path, regression, {"metrics": {"closeness": "max"}}, evaluator, eval_on_start=True)
    # The base (the step-0 evaluation), 4 checkpoints, then the sweep: the base is not evaluated twice.
    assert len(evaluator.seen) == 1 + 4 + 2 * len(DEFAULT_ALPHAS) + len(DEFAULT_BETAS)
    assert torch.equal(evaluator.seen[0], base)
    assert sum(torch.equal(w, base) for w in evaluator.seen) == 1
    assert not any(torch.equal(w, base) for w in evaluator.seen[1:5])  # the checkpoints moved
    report = callback.report
    assert report.base is not None and report.base.kind == "base"
    assert report.base.score == pytest.approx(-float(((base - TARGET) ** 2).sum()))
    assert report.base.metrics == {"closeness": report.base.score}


def test_base_heldout_score_is_computed_once_with_eval_on_start(tmp_path, regression):
    heldout, heldout_target = heldout_recorder(), HELDOUT_TARGET
    heldout_seen = heldout.seen

    base = weights(regression[0])
    _, callback = train(
        tmp_path,
        regression,
        {"metrics": {"closeness": "max"}, "report_evaluator": heldout, "report_metrics": {"heldout_closeness": "max"}},
        RecordingEvaluator(),
        eval_on_start=True,
    )
    assert torch.equal(heldout_seen[0], base)  # scored when the step-0 evaluation scored the base
    assert sum(torch.equal(w, base) for w in heldout_seen) == 1
    report = callback.report
    assert report.base.heldout_score is not None
    assert report.base.heldout_score == pytest.approx(-float(((base - heldout_target) ** 2).sum()))
    assert report.base.heldout_metrics == {"heldout_closeness": report.base.heldout_score}
    rows = dict(report.rows())
    assert rows["Base"] is report.base
    assert len(heldout_seen) == len({id(c) for c in rows.values()})  # every row once, the base included


def test_baselines_without_peft_fail_at_construction_with_the_install_command(monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "peft" else find_spec(name, *args)
    )
    with pytest.raises(ImportError, match=r"pip install 'exme-callback\[peft\]'"):
        ExMeCallback(evaluator=lambda model: {}, baselines=True)
    ExMeCallback(evaluator=lambda model: {}, baselines=False)  # nothing else needs PEFT


def test_top_k_keeps_k_checkpoints_and_topk_greedy_merges_them(tmp_path, regression):
    evaluator = RecordingEvaluator()
    options = {"metrics": {"closeness": "max"}, "strategy": "topk_greedy", "top_k": 3}
    trainer, callback = train(tmp_path, regression, options, evaluator)
    report = callback.report
    scores = [-float(((w - TARGET) ** 2).sum()) for w in evaluator.seen[1:5]]  # the four checkpoints
    assert [c.score for c in report.checkpoints] == pytest.approx(sorted(scores, reverse=True)[:3])
    assert [c.kind for c in report.candidates[:3]] == ["sft"] * 3
    merges = [c for c in report.candidates if c.kind == "topk"]
    assert merges and all(len(c.coefficients) == 3 and len(c.parents) == 2 for c in merges)
    for merge in merges:  # each merge is the midpoint of its parents
        a, b = (report.candidates[i].coefficients for i in merge.parents)
        assert merge.coefficients == pytest.approx(tuple((x + y) / 2 for x, y in zip(a, b, strict=True)))
    assert report.final.score == max(c.score for c in report.candidates if c.valid)
    assert "Top-k greedy merging, by generation" in (tmp_path / "exme" / "exme_report.md").read_text()


class LastStepScoresWorst(RecordingEvaluator):
    """`RecordingEvaluator`, except that the evaluation at the last step (the fifth call) scores worst."""

    def __call__(self, model):
        metrics = super().__call__(model)
        return {"closeness": -1e9} if len(self.seen) == 5 else metrics


@pytest.mark.parametrize("evaluator, copied", [(RecordingEvaluator, False), (LastStepScoresWorst, True)])
def test_trained_weights_are_copied_only_when_no_kept_checkpoint_holds_them(
    tmp_path, regression, monkeypatch, evaluator, copied
):
    saved, save = [], SnapshotStore.save

    def recording_save(self, key, tensors):
        saved.append(key)
        save(self, key, tensors)

    monkeypatch.setattr(SnapshotStore, "save", recording_save)
    recorder = TrainedWeights()
    trainer, callback = train(tmp_path, regression, {"metrics": {"closeness": "max"}}, evaluator(), [recorder])
    assert trainer.state.global_step == 32
    assert any(c.step == 32 for c in callback._kept) is not copied
    assert ("trained" in saved) is copied
    assert (callback.report.final.c1, callback.report.final.c2) != (1.0, 0.0)
    assert torch.equal(weights(trainer.model), recorder.weights)


# ---- a strategy of the user's own, as README shows it ------------------------------------------------------------


def readme_strategy_example() -> str:
    """The code of README's "Your own strategy" section, as written."""
    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### Your own strategy") :]
    start = section.index("```python\n") + len("```python\n")
    return section[start : section.index("\n```", start)]


def test_readme_strategy_runs_as_written(tmp_path, regression):
    """README's example, executed as written on a `Trainer`: its candidates are the points it proposed, scored by
    the trainer's evaluation like the built-in ones, and the chosen one is saved."""
    model, train_data, eval_data = regression
    trainer = Trainer(model=model, args=regression_args(tmp_path), train_dataset=train_data, eval_dataset=eval_data)
    exec(compile(readme_strategy_example(), "README.md", "exec"), {"trainer": trainer})  # adds the callback, trains
    report = next(c for c in trainer.callback_handler.callbacks if isinstance(c, ExMeCallback)).report

    rng = random.Random(0)  # the example's defaults: n=8, width=0.5, seed=0
    proposed = [tuple(float(i == 0) + rng.uniform(-0.5, 0.5) for i in range(2)) for _ in range(8)]
    assert [c.kind for c in report.candidates] == ["sft", "sft"] + ["random_box"] * 8
    assert [c.coefficients for c in report.candidates[2:]] == proposed
    assert report.strategy == "random_box" and dict(report.rows())["random_box"].kind == "random_box"
    final = report.final
    assert final is min((c for c in report.candidates if c.valid), key=lambda c: c.score)  # eval_loss: lower
    saved = RegressionModel.from_pretrained(tmp_path / "exme")
    check = Trainer(model=saved, args=regression_args(tmp_path / "check"), eval_dataset=eval_data)
    assert check.evaluate()["eval_loss"] == pytest.approx(final.score, rel=1e-5)


def test_a_custom_strategy_is_scored_like_the_built_in_ones_and_its_choice_recomputes(tmp_path, regression):
    namespace = {"trainer": None}
    example = readme_strategy_example()
    exec(compile(example[: example.index("trainer.add_callback")], "README.md", "exec"), namespace)
    evaluator = RecordingEvaluator()
    base = weights(regression[0])
    strategy = namespace["RandomBox"](n=4, seed=3)
    trainer, callback = train(tmp_path, regression, {"strategy": strategy, "metrics": {"closeness": "max"}}, evaluator)
    report = callback.report
    assert [c.kind for c in report.candidates] == ["sft", "sft"] + ["random_box"] * 4
    assert len(evaluator.seen) == 1 + 4 + 4  # the base, the checkpoints, the strategy's candidates

    checkpoints = {8 * (i + 1): w for i, w in enumerate(evaluator.seen[1:5])}
    d1, d2 = (checkpoints[c.step] - base for c in report.checkpoints)
    for candidate, seen in zip(report.candidates[2:], evaluator.seen[5:], strict=True):
        assert_close(seen, base + candidate.c1 * d1 + candidate.c2 * d2, rtol=1e-5, atol=1e-6)
        assert candidate.score == pytest.approx(-float(((seen - TARGET) ** 2).sum()), rel=1e-5, abs=1e-6)
    assert report.final is max((c for c in report.candidates if c.valid), key=lambda c: c.score)
    saved = RegressionModel.from_pretrained(tmp_path / "exme")
    assert_close(weights(saved), base + report.final.c1 * d1 + report.final.c2 * d2, rtol=1e-6, atol=1e-6)
    assert torch.equal(weights(trainer.model), evaluator.seen[4])  # trained weights back: the last checkpoint's
