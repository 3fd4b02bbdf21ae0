"""The smallest ExMe run: `ExMeCallback(trainer)` on a TRL full fine-tuning, scored by the trainer's eval loss.

Runs offline on a CPU in under a minute: the model is a small Llama built from a config and the data are three
generated skills (addition, sorting, reversal) in prompt/completion form.

    python examples/toy.py --output-dir runs/toy
"""

import argparse
import os
import random

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
from trl import SFTConfig, SFTTrainer

from exme_callback import ExMeCallback

WORDS = [str(i) for i in range(19)] + list("abcdefgh") + ["add", "sort", "reverse", ":"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_example(rng: random.Random) -> dict[str, str]:
    skill = rng.choice(["add", "sort", "reverse"])
    if skill == "add":
        a, b = rng.randrange(10), rng.randrange(10)
        return {"prompt": f"add {a} {b} :", "completion": f" {a + b}"}
    items = [rng.choice("abcdefgh") for _ in range(rng.randrange(3, 6))]
    result = sorted(items) if skill == "sort" else items[::-1]
    return {"prompt": f"{skill} {' '.join(items)} :", "completion": " " + " ".join(result)}


def make_split(n: int, seed: int) -> Dataset:
    rng = random.Random(seed)
    return Dataset.from_list([make_example(rng) for _ in range(n)])


def make_model(tokenizer: PreTrainedTokenizerFast) -> LlamaForCausalLM:
    """A small Llama (about 0.1M parameters) for `tokenizer`, initialized from a fixed seed."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return LlamaForCausalLM(config)


def sft_config(output_dir: str, steps: int, eval_steps: int, learning_rate: float) -> SFTConfig:
    """Training settings: a checkpoint evaluated (and ranked by ExMe) every `eval_steps` steps."""
    return SFTConfig(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=32,
        per_device_eval_batch_size=64,
        learning_rate=learning_rate,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=10,
        eval_strategy="steps",
        eval_steps=eval_steps,
        save_strategy="no",
        logging_steps=eval_steps,
        max_length=32,
        report_to=[],
        bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        seed=0,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/toy", help="where the run and its exme/ folder go")
    parser.add_argument("--steps", type=int, default=200, help="training steps")
    parser.add_argument("--eval-steps", type=int, default=25, help="evaluate (and rank) a checkpoint every N steps")
    args = parser.parse_args()

    tokenizer = make_tokenizer()
    trainer = SFTTrainer(
        model=make_model(tokenizer),
        args=sft_config(args.output_dir, args.steps, args.eval_steps, learning_rate=3e-3),
        train_dataset=make_split(4000, seed=0),
        eval_dataset=make_split(300, seed=1),
        processing_class=tokenizer,
    )
    exme = ExMeCallback(trainer)  # scores candidates with the trainer's eval loss (its metric_for_best_model)
    trainer.add_callback(exme)
    trainer.train()

    print()
    print(exme.report.to_markdown())


if __name__ == "__main__":
    main()
