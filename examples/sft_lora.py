"""ExMe on a LoRA run: TRL's SFTTrainer with `peft_config`, and ExMeCallback searching adapter merges.

Every candidate is one LoRA adapter of rank 2r (the two checkpoints' factors side by side), so the sweep never
touches the base weights. The chosen model is saved as a PEFT adapter in `<output-dir>/exme/`, and fused into a
full model in `<output-dir>/exme/merged/`.

By default a small Llama is built from a config and first given a short full fine-tuning, so that LoRA starts from
a model that has seen the data format (runs offline on a CPU in about a minute). `--model` takes any causal LM
folder or Hub id instead.

    python examples/sft_lora.py --output-dir runs/sft_lora
"""

import argparse
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from peft import LoraConfig
from toy import make_model, make_split, make_tokenizer, sft_config
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTTrainer

from exme_callback import ExMeCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/sft_lora")
    parser.add_argument("--model", help="a causal LM folder or Hub id (default: a small Llama, warmed up here)")
    parser.add_argument("--steps", type=int, default=200, help="LoRA training steps")
    parser.add_argument("--eval-steps", type=int, default=25, help="evaluate (and rank) a checkpoint every N steps")
    args = parser.parse_args()

    train, val = make_split(4000, seed=0), make_split(300, seed=1)
    if args.model:
        model, tokenizer = AutoModelForCausalLM.from_pretrained(args.model), AutoTokenizer.from_pretrained(args.model)
    else:
        tokenizer = make_tokenizer()
        warm_up = SFTTrainer(
            model=make_model(tokenizer),
            args=sft_config(os.path.join(args.output_dir, "warm-up"), 60, 60, learning_rate=3e-3),
            train_dataset=train,
            eval_dataset=val,
            processing_class=tokenizer,
        )
        warm_up.train()
        model = warm_up.model

    trainer = SFTTrainer(
        model=model,
        args=sft_config(args.output_dir, args.steps, args.eval_steps, learning_rate=1e-2),
        train_dataset=train,
        eval_dataset=val,
        processing_class=tokenizer,
        peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"),
    )
    exme = ExMeCallback(trainer, save_merged=True)
    trainer.add_callback(exme)
    trainer.train()

    print()
    print(exme.report.to_markdown())


if __name__ == "__main__":
    main()
