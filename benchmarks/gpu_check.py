"""GPU checks: the quickstart's real model trained on a GPU with the callback, each run ending with the report and a
reloaded model that scores what the report says.

Runs, each a fresh `SFTTrainer` on the quickstart's data and selection tasks (bf16 autocast where supported):

- `lora`: LoRA (the quickstart's default), the chosen adapter saved and fused;
- `full`: full fine-tuning;
- `fsdp2`: full fine-tuning with FSDP2 (`fsdp_config={"version": 2}`);
- `zero3`: full fine-tuning with DeepSpeed ZeRO-3 (`pip install deepspeed`).

The sharded runs launch under `torchrun` (one process is enough).

For each run it checks that the kept snapshots are in pinned CPU memory (copied without blocking training), that
candidates are computed on the GPU, and times the switches; then it reloads the saved model from `exme/` and scores
it with the same evaluator. It prints one table. On a CPU it runs the same code path (`--smoke` for a tiny model), so
the script itself is tested where no GPU is.

    python benchmarks/gpu_check.py --runs lora full --output-dir /tmp/gpu-check
    torchrun --nproc_per_node 1 benchmarks/gpu_check.py --runs fsdp2 zero3 --output-dir /tmp/gpu-check
    python benchmarks/gpu_check.py --smoke --runs lora full                        # the script itself, on a CPU
"""

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from instruction_data import to_sft, write_tasks  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from quickstart import BATCH_SIZE, load_model, load_splits  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from exme_callback import ExMeCallback, LMEvalEvaluator, planes, snapshots  # noqa: E402

RUNS = ("lora", "full", "fsdp2", "zero3")


class Probe:
    """Records what the callback does on the device: whether snapshots are pinned, where candidates are written,
    and how long each switch takes (synchronized)."""

    def __init__(self):
        self.pinned, self.devices, self.switches = [], set(), []
        save, make_plane = snapshots.SnapshotStore.save, planes.make_plane
        probe = self

        def recording_save(store, key, tensors):
            save(store, key, tensors)
            if store.storage == "cpu":
                probe.pinned.append(all(t.is_pinned() for t in store._memory[key].values()))

        def timed_plane(model, *args, **kwargs):
            plane = make_plane(model, *args, **kwargs)
            apply = plane.apply
            probe.devices |= {p.device.type for p in model.parameters() if p.requires_grad}

            def timed_apply(point):
                synchronize()
                start = time.perf_counter()
                apply(point)
                synchronize()
                probe.switches.append(time.perf_counter() - start)

            plane.apply = timed_apply
            return plane

        snapshots.SnapshotStore.save = recording_save
        planes.make_plane = timed_plane


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run(name: str, args: argparse.Namespace, splits, probe: Probe) -> dict:
    output_dir = os.path.join(args.output_dir, name)
    model, tokenizer = load_model(args, splits)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    folder = os.path.join(output_dir, "tasks")
    selection = LMEvalEvaluator(
        write_tasks(folder, splits["selection"]), tokenizer, include_path=folder, batch_size=32
    )
    bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    sharded = {}
    if name == "fsdp2":
        sharded = {"fsdp": "full_shard auto_wrap", "fsdp_config": {"version": 2}}
    elif name == "zero3":
        auto = [
            "train_batch_size",
            "train_micro_batch_size_per_gpu",
            "gradient_accumulation_steps",
            "gradient_clipping",
        ]
        zero3 = {"zero_optimization": {"stage": 3}, "bf16": {"enabled": "auto"}, "zero_allow_untested_optimizer": True}
        sharded = {"deepspeed": {**dict.fromkeys(auto, "auto"), **zero3}}
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=BATCH_SIZE,
            learning_rate=1e-3 if name == "lora" else 2e-5,
            eval_strategy="steps",
            eval_steps=max(1, args.steps // 4),
            save_strategy="no",
            max_length=128,
            report_to=[],
            bf16=bf16,
            seed=0,
            **sharded,
        ),
        train_dataset=Dataset.from_list(to_sft(splits["train"], tokenizer.eos_token)),
        eval_dataset=Dataset.from_list(to_sft(splits["selection"], tokenizer.eos_token)[:32]),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear") if name == "lora" else None,
    )
    exme = ExMeCallback(trainer, evaluator=selection, save_merged=name == "lora")
    trainer.add_callback(exme)
    probe.pinned.clear(), probe.devices.clear(), probe.switches.clear()
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    if not trainer.args.should_save:
        return {}

    report, saved = exme.report, os.path.join(output_dir, "exme")
    if name == "zero3":  # else `from_pretrained` would partition the reloaded model too
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config

        unset_hf_deepspeed_config()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "lora":  # the chosen adapter over the trained run's base weights
        base, _ = load_model(args, splits)
        reloaded = PeftModel.from_pretrained(base, saved)
    else:
        reloaded = AutoModelForCausalLM.from_pretrained(saved, dtype="auto")  # ZeRO-3 with bf16 trains bf16 weights
    reloaded_score, *_ = exme._scorer(reloaded.to(device))
    return {
        "run": name,
        "chosen": " ".join([report.final.kind, *(f"{k}={v:g}" for k, v in report.final.hyper.items())]),
        "report score": report.final.score,
        "reloaded score": reloaded_score,
        "snapshots pinned": all(probe.pinned) if probe.pinned and device == "cuda" else "n/a (CPU)",
        "candidates on": ",".join(sorted(probe.devices)),
        "switch (median)": f"{statistics.median(probe.switches) * 1e3:.1f} ms",
        "run time": f"{seconds:.0f} s",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=["lora", "full"])
    parser.add_argument("--output-dir", default="runs/gpu-check")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks the script on a CPU")
    args = parser.parse_args()
    args.model, args.dataset = None, None  # what quickstart's loaders read
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (no GPU)"
    splits = load_splits(args)
    probe = Probe()
    rows = [row for name in args.runs if (row := run(name, args, splits, probe))]
    if not rows:
        return
    print(f"\n{device}, torch {torch.__version__}, {args.steps} steps\n")
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(f"{v:.4f}" if isinstance(v, float) else str(v) for v in row.values()) + " |")
    for row in rows:
        if abs(row["reloaded score"] - row["report score"]) > 1e-6:
            raise SystemExit(
                f"{row['run']}: the reloaded model scores {row['reloaded score']}, the report says "
                f"{row['report score']}"
            )


if __name__ == "__main__":
    main()
