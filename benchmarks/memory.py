"""Peak resident memory of a whole ExMe sweep, per `storage` and for LoRA, each in a fresh process.

A SmolLM2-135M-sized Llama built from its config (float32, random weights, no download) goes through the
callback's hooks around a simulated training run: three evaluated steps along a descent direction (so the last
step is the best, as in a run that ends on its best checkpoint), then `on_train_end`, which runs the whole sweep (19
candidates, each scored by a forward pass on a fixed batch), saves the chosen model and restores the trained one.
Training's own memory (optimizer state, gradients) is not the callback's and is left out: the peak is reset
(`/proc/self/clear_refs`) just before `on_train_end`.

Each row gives the process's memory after imports (the runtime, subtracted), the sweep's peak above it, what one
evaluation's forward pass adds by itself (any evaluation needs it, with or without ExMe), and the goal:
`storage="cpu"` at most 1.1 x (model + 3 x trainable tensors), `storage="disk"` at most 1.1 x the model plus its
largest tensor, LoRA at most the model plus a few adapter sizes. The kernel's peak (`VmHWM`) counts every resident
page, also the libraries' code read in during the sweep; anonymous memory (`RssAnon`, sampled every 5 ms) is the
data alone.

    python benchmarks/memory.py     # about 3 minutes on 2 CPU cores (Linux only)
"""

import argparse
import ctypes
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MB = 1 << 20
MODES = ("cpu", "disk", "lora")


def status(field: str) -> int:
    """A `/proc/self/status` field, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class Sampler(threading.Thread):
    """The largest anonymous resident memory seen while it runs."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = 0, True

    def run(self):
        while self.running:
            self.peak = max(self.peak, status("RssAnon"))
            time.sleep(0.005)


def sweep(mode: str) -> dict:
    import gc

    import matplotlib.figure  # noqa: F401  (the report's figure; imported here to count as runtime)
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerControl, TrainerState, TrainingArguments

    from exme_callback import ExMeCallback
    from exme_callback.snapshots import trainable_tensors

    runtime, runtime_anon = status("VmRSS"), status("RssAnon")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
        num_key_value_heads=3, tie_word_embeddings=True,
    )  # fmt: skip
    model = LlamaForCausalLM(config)
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]))
        for name, param in model.named_parameters():  # a trained adapter: B is not zero
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.02)
    batch = torch.randint(0, config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))

    def loss() -> float:
        with torch.no_grad():
            return float(model(input_ids=batch, labels=batch).loss)

    loss()
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    loss()
    evaluation = status("VmHWM") - before  # what one evaluation's forward pass adds, with or without ExMe
    live = trainable_tensors(model)
    model(input_ids=batch, labels=batch).loss.backward()  # a descent direction, so later steps score better
    direction = {name: -1e-3 * p.grad / p.grad.norm() for name, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)

    with tempfile.TemporaryDirectory() as folder:
        args = TrainingArguments(output_dir=folder, eval_strategy="steps", eval_steps=1, report_to=[])
        state, control = TrainerState(), TrainerControl()
        callback = ExMeCallback(
            evaluator=lambda m: {"loss": loss()}, metrics={"loss": "min"}, storage="cpu" if mode == "lora" else mode
        )
        callback.on_train_begin(args, state, control, model=model)
        saved, save = [], callback._store.save  # records whether the sweep copies the trained weights
        callback._store.save = lambda key, tensors: (saved.append(key), save(key, tensors))
        for step in (1, 2, 3):
            with torch.no_grad():
                for name, tensor in live.items():
                    tensor.add_(direction[name])
            state.global_step = step
            callback.on_evaluate(args, state, control, metrics={}, model=model)
        del direction
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # give back what the simulated training freed
        held = status("VmRSS")
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident memory
        sampler = Sampler()
        sampler.start()
        callback.on_train_end(args, state, control, model=model)
        sampler.running = False
        sampler.join()
        peak = status("VmHWM")
    tensors = dict(model.named_parameters())
    return {
        "runtime": runtime,
        "runtime_anon": runtime_anon,
        "evaluation": evaluation,
        "held": held,
        "peak": peak,
        "peak_anon": sampler.peak,
        "model": sum(p.numel() * p.element_size() for p in model.parameters()),
        "trainable": sum(t.numel() * t.element_size() for t in live.values()),
        "largest": max(t.numel() * t.element_size() for t in tensors.values()),
        "candidates": len(callback.report.candidates),
        "trained_copied": "trained" in saved,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(sweep(args.child)))
        return

    import torch

    print(f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; each row in a fresh process")
    print("memory above the runtime (the process after imports; anonymous: above its anonymous memory); MB = 2^20\n")
    columns = ["run", "model", "trainable", "held before the sweep", "peak in the sweep", "anonymous peak"]
    columns += ["one evaluation", "goal", "(peak - evaluation) / goal: all, anonymous", "trained copied"]
    print(f"| {' | '.join(columns)} |")
    print("|---|" + "---:|" * (len(columns) - 2) + "---|")
    for mode in MODES:
        command = [sys.executable, __file__, "--child", mode]
        r = json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
        model, trainable = r["model"], r["trainable"]
        if mode == "cpu":
            label, goal, rule = 'full, storage="cpu"', 1.1 * (model + 3 * trainable), "1.1 x (model + 3 x trainable)"
        elif mode == "disk":
            label, goal, rule = 'full, storage="disk"', 1.1 * model + r["largest"], "1.1 x model + largest tensor"
        else:
            label, goal, rule = "LoRA r=8 (q, v)", model + 4 * trainable, "model + 4 adapters"
        peak, anon = r["peak"] - r["runtime"], r["peak_anon"] - r["runtime_anon"]
        print(
            f"| {label} | {model / MB:.0f} MB | {trainable / MB:.1f} MB | {(r['held'] - r['runtime']) / MB:.0f} MB "
            f"| {peak / MB:.0f} MB | {anon / MB:.0f} MB | {r['evaluation'] / MB:.0f} MB | {goal / MB:.0f} MB ({rule}) "
            f"| {(peak - r['evaluation']) / goal:.2f}, {(anon - r['evaluation']) / goal:.2f} "
            f"| {'yes' if r['trained_copied'] else 'no'} |"
        )


if __name__ == "__main__":
    main()
