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
