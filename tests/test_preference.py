"""ExMeCallback under TRL's `DPOTrainer` on a tiny Llama built from a config: full fine-tuning against an explicit
`ref_model`, and LoRA against the base (the adapter disabled). Every score is recomputed from the DPO loss's closed
form, and every saved model from the trainer's checkpoints."""

import json
import math
import random

import pytest
import torch
from conftest import make_llama
from datasets import Dataset
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from exme_callback import ExMeCallback, exme_coefficients
from exme_callback.strategies import DEFAULT_ALPHAS, DEFAULT_BETAS

BETA = 0.1  # DPOConfig's default, written out: the closed form below uses it
STEPS, EVAL_STEPS = 12, 3


def preferences(n: int, seed: int) -> Dataset:
    """Prompts with a chosen and a rejected completion, in the tokenizer's vocabulary."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        adjective, other = rng.sample(["red", "blue", "big", "small"], 2)
        noun = rng.choice(["cat", "dog"])
        # Every other pair differs only in its last word (the adjective repeated, or another): learned later.
        rejected = f" log and the {noun} ran" if i % 2 else f" mat and the {noun} was {other}"
        chosen = f" mat and the {noun} was {adjective}"
        rows.append({"prompt": f"the {adjective} {noun} sat on the", "chosen": chosen, "rejected": rejected})
    return Dataset.from_list(rows)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


class Recorder(ExMeCallback):
    """Keeps a copy of the trained weights as training left them, before the sweep."""

    def on_train_end(self, args, state, control, model=None, **kwargs):
        self.trained = trainable(model)
        return super().on_train_end(args, state, control, model=model, **kwargs)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: threads only add overhead
    yield
    torch.set_num_threads(threads)


def train_dpo(tmp_path, tokenizer, ref_model=None, peft_config=None, config=None, **callback_kwargs):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        per_device_eval_batch_size=16,  # the evaluation set in one batch: the loss is the mean over its pairs
        learning_rate=2e-2 if peft_config else 5e-3,
        max_steps=STEPS,
        eval_strategy="steps",
        eval_steps=EVAL_STEPS,
        save_strategy="steps",
        save_steps=EVAL_STEPS,  # every evaluated checkpoint on disk, to recompute the saved model from
        logging_steps=EVAL_STEPS,
        max_length=24,
        beta=BETA,
        bf16=False,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
        **(config or {}),
    )
    trainer = DPOTrainer(
        model=make_llama(),
        ref_model=ref_model,
        args=args,
        train_dataset=preferences(48, seed=0),
        eval_dataset=preferences(16, seed=1),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    callback = Recorder(trainer, **callback_kwargs)
    trainer.add_callback(callback)
    trainer.train()
    return trainer, callback


def completion_logps(model, dataset) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log p(completion token | everything before it) for the chosen and the rejected completion of every
    pair, each sequence on its own (no padding, no batching)."""
    totals = {"chosen_ids": [], "rejected_ids": []}
    model.eval()
    with torch.no_grad():
        for row in dataset:
            for key, total in totals.items():
                ids = torch.tensor([row["prompt_ids"] + row[key]])
                logprobs = model(input_ids=ids).logits[0].double().log_softmax(-1)
                start = len(row["prompt_ids"])
                total.append(sum(logprobs[i - 1, ids[0, i]] for i in range(start, ids.shape[1])))
    return torch.stack(totals["chosen_ids"]), torch.stack(totals["rejected_ids"])


def dpo_metrics(policy, reference, dataset) -> dict[str, float]:
    """The sigmoid DPO loss and the reward accuracy in closed form: with `r = beta * (log pi - log pi_ref)`,
    `loss = mean(-log sigmoid(r_chosen - r_rejected))`, `accuracy = mean(r_chosen > r_rejected)`."""
    chosen, rejected = completion_logps(policy, dataset)
    ref_chosen, ref_rejected = completion_logps(reference, dataset)
    margin = BETA * (chosen - ref_chosen) - BETA * (rejected - ref_rejected)
    loss = -torch.nn.functional.logsigmoid(margin).mean()
    return {"eval_loss": loss.item(), "eval_rewards/accuracies": (margin > 0).double().mean().item()}


def check_report(tmp_path, trainer, callback, metric="eval_loss"):
    """The report's rows and coefficients, the base's closed form, the choice, and the trained weights restored."""
    report = callback.report
    data = json.loads((tmp_path / "exme" / "exme_report.json").read_text())
    assert data["metric"] == metric and data["final"] == report.final.to_dict()
    assert [c["kind"] for c in data["candidates"]] == ["sft"] * 2 + ["expo"] * 10 + ["exme"] * 9
    # The checkpoints are the two best training evaluations, with their scores as the trainer logged them.
    logged = {e["step"]: e[metric] for e in trainer.state.log_history if metric in e}
    assert sorted(logged) == list(range(EVAL_STEPS, STEPS + 1, EVAL_STEPS))
    greater = metric != "eval_loss"
    best = sorted(logged, key=lambda step: -logged[step] if greater else logged[step])[:2]  # ties: the earlier
    assert [(c.step, c.score) for c in report.checkpoints] == [(step, logged[step]) for step in best]
    # EXPO-i is (1 + alpha) d_i; each ExMe merge uses each line's best alpha.
    expo = [c for c in report.candidates if c.kind == "expo"]
    lines = [expo[: len(DEFAULT_ALPHAS)], expo[len(DEFAULT_ALPHAS) :]]
    for i, line in enumerate(lines):
        assert [c.coefficients[i] for c in line] == pytest.approx([1 + a for a in DEFAULT_ALPHAS])
        assert all(c.coefficients[1 - i] == 0 for c in line)
    alphas = [
        (max if greater else min)(line, key=lambda c: c.score).coefficients[i] - 1 for i, line in enumerate(lines)
    ]
    for c, beta in zip([c for c in report.candidates if c.kind == "exme"], DEFAULT_BETAS, strict=True):
        assert c.coefficients == pytest.approx(exme_coefficients(*alphas, beta))
    # At the start the policy is its reference: every reward is 0, so the loss is log 2 and no reward is above.
    assert_close(report.base.metrics["eval_loss"], math.log(2), rtol=1e-6, atol=0)
    assert report.base.metrics["eval_rewards/accuracies"] == 0.0
    # The final model is the best candidate; the model holds the trained weights again, bit for bit.
    valid = [c for c in report.candidates if c.valid]
    assert report.final.score == (max if greater else min)(c.score for c in valid)
    assert report.final is next(c for c in valid if c.score == report.final.score)
    assert_close(trainable(trainer.model), callback.trained, rtol=0, atol=0)
    return report


def test_dpo_full_fine_tuning_with_a_ref_model(tmp_path, tokenizer, one_thread):
    trainer, callback = train_dpo(tmp_path, tokenizer, ref_model=make_llama())
    report = check_report(tmp_path, trainer, callback)

    # The saved model is base + c1 * d1 + c2 * d2 of the trainer's own checkpoints (rounded once, in float32).
    base = make_llama().state_dict()
    sft1, sft2 = (load_file(tmp_path / f"checkpoint-{c.step}" / "model.safetensors") for c in report.checkpoints)
    saved = load_file(tmp_path / "exme" / "model.safetensors")
    assert saved.keys() == sft1.keys() == sft2.keys()
    c1, c2 = report.final.c1, report.final.c2
    for name, tensor in saved.items():
        expected = base[name] + c1 * (sft1[name] - base[name]) + c2 * (sft2[name] - base[name])
        assert_close(tensor, expected, rtol=1e-6, atol=1e-6, msg=name)

    # Its DPO loss and reward accuracy against the reference, in closed form, are what the report says.
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exme")
    expected = dpo_metrics(model, make_llama(), trainer.eval_dataset)
    assert_close(report.final.metrics["eval_loss"], expected["eval_loss"], rtol=1e-5, atol=1e-6)
    assert report.final.metrics["eval_rewards/accuracies"] == expected["eval_rewards/accuracies"]
    assert report.final.score < report.checkpoints[0].score < math.log(2)  # DPO learned; ExMe went further


@pytest.mark.parametrize("metric", ["eval_loss", "eval_rewards/accuracies"])
def test_dpo_lora_against_the_base_with_the_adapter_disabled(tmp_path, tokenizer, one_thread, metric):
    from peft import LoraConfig, PeftModel

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer, callback = train_dpo(tmp_path, tokenizer, peft_config=lora, metrics=metric)
    assert trainer.ref_model is None  # the reference is the model with its adapter disabled
    report = check_report(tmp_path, trainer, callback, metric)
    assert report.greater_is_better is (metric != "eval_loss")
    assert list(trainer.model.peft_config) == ["default"]  # the trained adapter, alone and active again

    # The saved adapter (rank 2r) is base + c1 * d1 + c2 * d2 with d_i = (alpha / r) B_i A_i of the checkpoints.
    assert report.saved == {"adapter": str(tmp_path / "exme")}
    fused = PeftModel.from_pretrained(make_llama(), tmp_path / "exme").merge_and_unload().state_dict()
    base = make_llama().state_dict()
    adapters = [load_file(tmp_path / f"checkpoint-{c.step}" / "adapter_model.safetensors") for c in report.checkpoints]
    coefficients = (report.final.c1, report.final.c2)
    for name, tensor in fused.items():
        expected = base[name].clone()
        a_name = "base_model.model." + name.replace(".weight", ".lora_A.weight")
        if a_name in adapters[0]:
            for c, adapter in zip(coefficients, adapters, strict=True):
                b = adapter[a_name.replace("lora_A", "lora_B")]
                expected += c * (lora.lora_alpha / lora.r) * b @ adapter[a_name]
        assert_close(tensor, expected, rtol=1e-5, atol=1e-6, msg=name)

    # Its DPO loss and reward accuracy against the base, in closed form, are what the report says.
    reloaded = PeftModel.from_pretrained(make_llama(), tmp_path / "exme")
    expected = dpo_metrics(reloaded, make_llama(), trainer.eval_dataset)
    assert_close(report.final.metrics["eval_loss"], expected["eval_loss"], rtol=1e-5, atol=1e-6)
    assert report.final.metrics["eval_rewards/accuracies"] == expected["eval_rewards/accuracies"]


def test_lora_without_a_ref_model_refuses_candidates_in_the_base_layers(tmp_path, tokenizer, one_thread, monkeypatch):
    """The reference is the model with its adapters disabled: TIES and DARE candidates, written into the base
    layers, move it with the policy. Refused before training; unchecked, each would score exactly log 2; with the
    reference log-probs computed before training, they are allowed and scored against the base."""
    from peft import LoraConfig

    from exme_callback import preflight

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    with pytest.raises(NotImplementedError, match="`baselines=True` under DPOTrainer without a `ref_model`"):
        train_dpo(tmp_path / "refused", tokenizer, peft_config=lora, baselines=True)
    assert not (tmp_path / "refused" / f"checkpoint-{EVAL_STEPS}").exists()  # before the first step

    monkeypatch.setattr(preflight, "check_reference", lambda *args: None)
    _, callback = train_dpo(tmp_path / "unchecked", tokenizer, peft_config=lora, baselines=True)
    off_span = [c for c in callback.report.candidates if c.kind in ("ties", "dare")]
    assert len(off_span) == 6 and all(c.metrics["eval_rewards/margins"] == 0.0 for c in off_span)
    assert_close([c.score for c in off_span], [math.log(2)] * 6, rtol=1e-6, atol=0)

    # With the reference log-probs computed before training, the same candidates are scored against the base.
    monkeypatch.undo()
    precomputed = {"precompute_ref_log_probs": True}
    _, callback = train_dpo(tmp_path / "precomputed", tokenizer, peft_config=lora, config=precomputed, baselines=True)
    off_span = [c for c in callback.report.candidates if c.kind in ("ties", "dare")]
    assert len(off_span) == 6 and all(c.metrics["eval_rewards/margins"] != 0.0 for c in off_span)
    assert all(c.score < math.log(2) for c in off_span)
