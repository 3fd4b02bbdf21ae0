"""The whole pipeline on a tiny Llama built from a config, under `Trainer` and under TRL's `SFTTrainer`."""

import json

import pytest
import torch
from conftest import make_llama, make_texts
from datasets import Dataset
from torch.testing import assert_close
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from exme_callback import ExMeCallback

pytestmark = pytest.mark.slow

COMMON = dict(
    per_device_train_batch_size=8,
    per_device_eval_batch_size=16,
    learning_rate=5e-3,
    max_steps=24,
    eval_strategy="steps",
    eval_steps=6,
    save_strategy="no",
    logging_steps=6,
    report_to=[],
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def check_run(trainer, callback, output_dir, before_sweep):
    """Restored weights, the saved model's reload and its score, and the report's consistency."""
    report = callback.report
    for name, tensor in trainable(trainer.model).items():
        assert torch.equal(tensor, before_sweep[name]), name
    with open(output_dir / "exme" / "exme_report.json") as f:
        data = json.load(f)
    assert data["final"]["score"] == report.final.score
    assert data["metric"] == "eval_loss" and len(data["checkpoints"]) == 2

    reloaded = AutoModelForCausalLM.from_pretrained(output_dir / "exme")
    AutoTokenizer.from_pretrained(output_dir / "exme")
    trainer.model.load_state_dict(reloaded.state_dict())  # the trainer's own evaluation, of the saved weights
    assert_close(trainer.evaluate()["eval_loss"], report.final.score, rtol=1e-5, atol=1e-6)


class Recorder(ExMeCallback):
    """Keeps the trained weights as they are just before the sweep starts."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.before_sweep = trainable(model)
        return super().on_train_end(args, state, control, model=model, **kwargs)


def test_trainer_full_fine_tuning(tmp_path, tokenizer):
    model = make_llama()
    tokenize = lambda texts: Dataset.from_dict(dict(tokenizer(texts)))  # noqa: E731
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), **COMMON),
        train_dataset=tokenize(make_texts(96, seed=0)),
        eval_dataset=tokenize(make_texts(32, seed=1)),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    callback = Recorder(trainer)
    trainer.add_callback(callback)
    trainer.train()
    check_run(trainer, callback, tmp_path, callback.before_sweep)
    assert callback.report.final.score <= min(c.score for c in callback.report.checkpoints)


def test_sft_trainer_full_fine_tuning(tmp_path, tokenizer):
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(
        model=make_llama(),
        args=SFTConfig(output_dir=str(tmp_path), max_length=32, **COMMON),
        train_dataset=Dataset.from_dict({"text": make_texts(96, seed=0)}),
        eval_dataset=Dataset.from_dict({"text": make_texts(32, seed=1)}),
        processing_class=tokenizer,
    )
    callback = Recorder(trainer)
    trainer.add_callback(callback)
    trainer.train()
    check_run(trainer, callback, tmp_path, callback.before_sweep)
    kinds = [c.kind for c in callback.report.candidates]
    assert kinds == ["sft"] * 2 + ["expo"] * 10 + ["exme"] * 9
    assert any("exme/score" in entry for entry in trainer.state.log_history)


def test_sft_trainer_lora(tmp_path, tokenizer):
    from peft import LoraConfig, PeftModel
    from trl import SFTConfig, SFTTrainer

    class Recorder(ExMeCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            self.kept_bytes = self._store.nbytes()
            self.before_sweep = trainable(model)
            return super().on_train_end(args, state, control, model=model, **kwargs)

    base_model = make_llama()
    trainer = SFTTrainer(
        model=base_model,
        args=SFTConfig(output_dir=str(tmp_path), max_length=32, **{**COMMON, "learning_rate": 2e-2}),
        train_dataset=Dataset.from_dict({"text": make_texts(96, seed=0)}),
        eval_dataset=Dataset.from_dict({"text": make_texts(32, seed=1)}),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
    )
    callback = Recorder(trainer, save_merged=True)
    trainer.add_callback(callback)
    trainer.train()
    report = callback.report

    # Kept: base, two checkpoints and the trained state, each the size of the adapter, no base weights.
    adapter_bytes = sum(t.numel() * t.element_size() for t in callback.before_sweep.values())
    assert callback.kept_bytes == 3 * adapter_bytes
    assert all(".lora_A." in name or ".lora_B." in name for name in callback.before_sweep)

    # The trained adapter is back, active, alone, exact.
    assert list(trainer.model.peft_config) == ["default"]
    for name, tensor in trainable(trainer.model).items():
        assert torch.equal(tensor, callback.before_sweep[name]), name

    # The saved adapter (two blocks: rank 2r) and the fused model give the same outputs and score what the
    # report says under the same evaluation.
    assert report.saved == {"adapter": str(tmp_path / "exme"), "merged": str(tmp_path / "exme" / "merged")}
    reloaded = PeftModel.from_pretrained(make_llama(), str(tmp_path / "exme")).eval()
    assert reloaded.peft_config["default"].r == 8
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "exme" / "merged").eval()
    batch = tokenizer(make_texts(4, seed=5), return_tensors="pt")
    with torch.no_grad():
        assert_close(reloaded(**batch).logits, merged(**batch).logits, rtol=1e-5, atol=1e-5)
    evaluation = SFTTrainer(
        model=merged,
        args=SFTConfig(output_dir=str(tmp_path / "check"), max_length=32, **COMMON),
        train_dataset=Dataset.from_dict({"text": make_texts(8, seed=0)}),
        eval_dataset=Dataset.from_dict({"text": make_texts(32, seed=1)}),
        processing_class=AutoTokenizer.from_pretrained(tmp_path / "exme" / "merged"),
    )
    assert_close(evaluation.evaluate()["eval_loss"], report.final.score, rtol=1e-4, atol=1e-6)  # fused: rounding


def test_trainer_dora_saves_a_fused_model(tmp_path, tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"], use_dora=True))
    tokenize = lambda texts: Dataset.from_dict(dict(tokenizer(texts)))  # noqa: E731
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), **{**COMMON, "learning_rate": 2e-2}),
        train_dataset=tokenize(make_texts(96, seed=0)),
        eval_dataset=tokenize(make_texts(32, seed=1)),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    callback = Recorder(trainer)
    trainer.add_callback(callback)
    trainer.train()
    assert callback.report.saved == {"model": str(tmp_path / "exme")}
    for name, tensor in trainable(trainer.model).items():
        assert torch.equal(tensor, callback.before_sweep[name]), name
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "exme")
    evaluation = Trainer(
        model=fused,
        args=TrainingArguments(output_dir=str(tmp_path / "check"), **COMMON),
        eval_dataset=trainer.eval_dataset,
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
    )
    assert_close(evaluation.evaluate()["eval_loss"], callback.report.final.score, rtol=1e-4, atol=1e-6)


def test_trainer_with_lm_eval_selection_and_heldout_report(tmp_path, tokenizer):
    pytest.importorskip("lm_eval")
    from conftest import write_lm_eval_tasks

    from exme_callback import LMEvalEvaluator

    selection = write_lm_eval_tasks(tmp_path / "tasks", prefix="sel")
    heldout = write_lm_eval_tasks(tmp_path / "tasks", prefix="held")
    include = str(tmp_path / "tasks")
    tokenize = lambda texts: Dataset.from_dict(dict(tokenizer(texts)))  # noqa: E731
    trainer = Trainer(
        model=make_llama(),
        args=TrainingArguments(output_dir=str(tmp_path / "run"), **{**COMMON, "max_steps": 12}),
        train_dataset=tokenize(make_texts(96, seed=0)),
        eval_dataset=tokenize(make_texts(32, seed=1)),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    callback = ExMeCallback(
        trainer,
        evaluator=LMEvalEvaluator(selection, include_path=include, batch_size=8),
        report_evaluator=LMEvalEvaluator(heldout, include_path=include, batch_size=8),
        alphas=(0.2, 0.5),
        betas=(0.3, 0.7),
    )
    trainer.add_callback(callback)
    trainer.train()
    report = callback.report
    assert report.metric == "mean(sel_choice/acc, sel_generate/exact_match)" and report.greater_is_better
    assert report.heldout_metric == "mean(held_choice/acc, held_generate/exact_match)"
    for label, candidate in report.rows():
        assert set(candidate.metrics) == {"sel_choice/acc", "sel_generate/exact_match"}, label
        assert set(candidate.heldout_metrics) == {"held_choice/acc", "held_generate/exact_match"}, label
        assert candidate.heldout_score == pytest.approx(sum(candidate.heldout_metrics.values()) / 2)
    table = (tmp_path / "run" / "exme" / "exme_report.md").read_text()
    assert "held-out held_choice/acc" in table and (tmp_path / "run" / "exme" / "exme_sweep.png").exists()
