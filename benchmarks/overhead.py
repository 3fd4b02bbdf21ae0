"""What the callback costs a training run, its sweep excluded: the same `Trainer` run with and without it.

A SmolLM2-135M-sized Llama built from its config (float32, random weights, no download) learns text drawn from 16
tokens, so every evaluation improves and every checkpoint enters the kept set: the most snapshot copies a run can
make. The time from `on_train_begin` to `on_train_end` is taken by a callback that runs before `ExMeCallback` in
both hooks, so it counts the base snapshot and the checkpoints' copies and stops before the sweep. Runs alternate
with and without the callback; the table gives the medians. Run-to-run noise on a shared machine is a few percent,
so the time spent inside the callback's own training hooks (`on_train_begin`, `on_evaluate`, `on_save`) is also
measured directly.

    python benchmarks/overhead.py               # 3 runs of each, about 8 minutes on 2 CPU cores
    python benchmarks/overhead.py --runs 5 --steps 40
"""

import argparse
import os
import platform
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from datasets import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback

from exme_callback import ExMeCallback
from exme_callback.snapshots import SnapshotStore

SEQUENCE = 64
SAVED: list[str] = []  # the keys of the snapshots the callback took
IN_HOOKS: list[float] = []  # seconds spent inside the callback's training hooks, per run


def timed(hook):
    def timed_hook(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return hook(self, *args, **kwargs)
        finally:
            IN_HOOKS[-1] += time.perf_counter() - start

    return timed_hook


def counted(save):
    def counted_save(self, key, tensors):
        SAVED.append(key)
        save(self, key, tensors)

    return counted_save


class Clock(TrainerCallback):
    """Seconds from the start of training to its end, before the callbacks after it see `on_train_end`."""

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_train_end(self, args, state, control, **kwargs):
        self.seconds = time.perf_counter() - self.start


def texts(n: int, seed: int) -> Dataset:
    ids = torch.randint(0, 16, (n, SEQUENCE), generator=torch.Generator().manual_seed(seed)).tolist()
    return Dataset.from_dict({"input_ids": ids, "labels": ids})


def run(with_exme: bool, steps: int, eval_steps: int) -> float:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True,
    )  # fmt: skip
    clock = Clock()
    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(
            output_dir=folder, max_steps=steps, per_device_train_batch_size=4, per_device_eval_batch_size=8,
            learning_rate=1e-3, eval_strategy="steps", eval_steps=eval_steps, save_strategy="no", report_to=[],
            logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=0,
        )  # fmt: skip
        trainer = Trainer(
            model=LlamaForCausalLM(config),
            args=args,
            train_dataset=texts(4 * steps, 0),
            eval_dataset=texts(8, 1),
            callbacks=[clock],
        )
        trainer.remove_callback(PrinterCallback)  # the evaluations' logs
        if with_exme:
            trainer.add_callback(ExMeCallback(trainer, alphas=[0.1], betas=[0.5]))  # a small sweep, not timed
        trainer.train()
    return clock.seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3, help="runs with and without the callback (default 3)")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (default 30)")
    parser.add_argument("--eval-steps", type=int, default=5, help="steps between evaluations (default 5)")
    args = parser.parse_args()

    SnapshotStore.save = counted(SnapshotStore.save)
    for hook in ("on_train_begin", "on_evaluate", "on_save"):
        setattr(ExMeCallback, hook, timed(getattr(ExMeCallback, hook)))
    seconds, snapshots = {True: [], False: []}, []
    for _ in range(args.runs):
        seconds[False].append(run(False, args.steps, args.eval_steps))
        IN_HOOKS.append(0.0)
        seconds[True].append(run(True, args.steps, args.eval_steps))
        snapshots.append(sum(key != "trained" for key in SAVED))  # "trained": in the sweep, after the clock
        SAVED.clear()

    without, with_, hooks = (statistics.median(v) for v in (seconds[False], seconds[True], IN_HOOKS))
    fastest = {key: min(values) for key, values in seconds.items()}
    evaluations = args.steps // args.eval_steps
    print(f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(
        f"SmolLM2-135M-sized Llama, float32, {args.steps} steps of 4 x {SEQUENCE} tokens, an evaluation every", end=" "
    )
    print(f"{args.eval_steps} steps; median of {args.runs} runs each, alternating\n")
    print("| training (sweep excluded) | median s | overhead | fastest s | overhead |")
    print("|---|---:|---:|---:|---:|")
    print(f"| without the callback | {without:.1f} | - | {fastest[False]:.1f} | - |")
    print(
        f"| with `ExMeCallback` | {with_:.1f} | {100 * (with_ / without - 1):+.1f}% | {fastest[True]:.1f} "
        f"| {100 * (fastest[True] / fastest[False] - 1):+.1f}% |"
    )
    print(f"| inside the callback's training hooks | {hooks:.2f} | {100 * hooks / without:.1f}% | | |")
    print(
        f"\n{evaluations} evaluations per run; {statistics.median(snapshots):.0f} snapshot copies (the base, and each"
    )
    print("checkpoint when it entered the kept set); the trainer's own evaluation scored the checkpoints.")
    rounded = {key: [round(s, 1) for s in values] for key, values in seconds.items()}
    print(f"All runs, seconds: without {rounded[False]}, with {rounded[True]}", end="; ")
    print(f"in the hooks {[round(s, 2) for s in IN_HOOKS]}")


if __name__ == "__main__":
    main()
