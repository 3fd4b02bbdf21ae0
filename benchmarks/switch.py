"""What switching the live model to one candidate costs, against what it cannot cost less than.

On a SmolLM2-135M-sized Llama built from its config (random weights, no download), in float32 and bfloat16 (each in
a fresh process, so one dtype's allocations do not warm the other's), the plane's switch (`apply`, through the
public `make_plane`) is timed side by side with:

- a plain copy of every parameter (the floor: the bytes a switch must write);
- the three-op blend in the tensor's own dtype (`mul`, `add_`, `add_`: what a switch costs when it rounds at
  every step, and the goal's yardstick: at most 1.5x);
- `save_pretrained` + `from_pretrained` of the whole model (what a pipeline that writes each candidate pays, at
  best, before it evaluates anything).

The plane's result is also checked against the float64 closed form rounded once: the share of elements equal to it,
and, among the others, how many are not explained by float32's coefficients at a rounding boundary (ties of two
neighbours, where the float64 value lies within float32's error on the terms of their midpoint; expected: none).

LoRA candidates (r=8 on q_proj and v_proj, through PEFT) are timed on two model sizes: a LoRA switch writes
adapter-sized tensors only, so its time does not grow with the base model.

    python benchmarks/switch.py              # both dtypes and LoRA, about 2 minutes on 2 CPU cores
    python benchmarks/switch.py --repeats 9  # more repeats per median
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from exme_callback.planes import make_plane
from exme_callback.snapshots import trainable_tensors

SIZES = {  # name -> Llama config (SmolLM2's shapes)
    "135M": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9),
    "360M": dict(hidden_size=960, intermediate_size=2560, num_hidden_layers=32, num_attention_heads=15),
}
POINT = (0.6, 0.55)  # ExMe with alpha1 = 0.2, alpha2 = 0.1, beta = 0.5


def config(size: str) -> LlamaConfig:
    kv_heads = SIZES[size]["num_attention_heads"] // 3
    return LlamaConfig(vocab_size=49152, num_key_value_heads=kv_heads, tie_word_embeddings=True, **SIZES[size])


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: allocations, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def perturbed(tensors: dict, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {name: t + (0.01 * torch.randn(t.shape, generator=g)).to(t.dtype) for name, t in tensors.items()}


def dense(dtype: torch.dtype, repeats: int) -> dict:
    """One dtype's row: seconds of each way to switch, and the plane's exactness."""
    torch.manual_seed(0)
    model = LlamaForCausalLM(config("135M")).to(dtype)
    live = trainable_tensors(model)
    base = {name: t.clone() for name, t in live.items()}
    sft1, sft2 = perturbed(base, 1), perturbed(base, 2)
    plane = make_plane(model, base, [sft1, sft2], trained=base)
    c1, c2 = POINT

    def copy():
        for name, t in live.items():
            t.copy_(sft1[name])

    def blend():
        for name, t in live.items():
            torch.mul(base[name], 1.0 - c1 - c2, out=t).add_(sft1[name], alpha=c1).add_(sft2[name], alpha=c2)

    with tempfile.TemporaryDirectory() as folder:

        def save_load():
            model.save_pretrained(folder)
            AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)

        seconds = {
            "copy": median_seconds(copy, repeats),
            "blend": median_seconds(blend, repeats),
            "apply": median_seconds(lambda: plane.apply(POINT), repeats),
            "save_load": median_seconds(save_load, max(1, repeats // 2)),
        }

    plane.apply(POINT)
    differing = off_boundary = 0
    for name, t in live.items():  # against the float64 value rounded once, as tests/test_span.py checks
        b, t1, t2 = base[name].double(), sft1[name].double(), sft2[name].double()
        exact = b + c1 * (t1 - b) + c2 * (t2 - b)
        expected = exact.to(dtype)
        differ = t != expected
        magnitude = (b.abs() + c1 * (t1 - b).abs() + c2 * (t2 - b).abs())[differ]
        boundary = (t[differ].double() + expected[differ].double()) / 2
        differing += int(differ.sum())
        off_boundary += int(((exact[differ] - boundary).abs() > 4 * torch.finfo(torch.float32).eps * magnitude).sum())
    parameters = sum(t.numel() for t in live.values())
    return {"seconds": seconds, "differing": differing, "off_boundary": off_boundary, "parameters": parameters}


def lora(size: str, repeats: int) -> dict:
    """Seconds of a LoRA switch (and of a plain copy of the adapter) on a model of `size`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(
        LlamaForCausalLM(config(size)), LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    )
    live = trainable_tensors(model)
    base = {name: t.clone() for name, t in live.items()}
    sft1, sft2 = perturbed(base, 1), perturbed(base, 2)
    plane = make_plane(model, base, [sft1, sft2], trained=base)

    def copy():
        for name, t in live.items():
            t.copy_(sft1[name])

    seconds = {"copy": median_seconds(copy, repeats), "apply": median_seconds(lambda: plane.apply(POINT), repeats)}
    plane.close()
    return {
        "seconds": seconds,
        "parameters": sum(p.numel() for p in model.parameters()),
        "adapter": sum(t.numel() for t in live.values()),
    }


def in_fresh_process(kind: str, argument: str, repeats: int) -> dict:
    command = [sys.executable, __file__, "--child", kind, argument, "--repeats", str(repeats)]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per median (default 5)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, argument = args.child
        result = dense(getattr(torch, argument), args.repeats) if kind == "dense" else lora(argument, args.repeats)
        print(json.dumps(result))
        return

    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"median of {args.repeats} (save + load: of {max(1, args.repeats // 2)}), each dtype in a fresh process\n")
    print("| SmolLM2-135M-sized Llama | float32 | bfloat16 |")
    print("|---|---:|---:|")
    rows = {dtype: in_fresh_process("dense", dtype, args.repeats) for dtype in ("float32", "bfloat16")}
    labels = {
        "copy": "plain copy of the parameters (floor)",
        "blend": "three-op blend in the tensor's own dtype",
        "apply": "the plane's `apply` (float32 sum, rounded once)",
        "save_load": "`save_pretrained` + `from_pretrained`",
    }
    for key, label in labels.items():
        cells = [
            f"{r['seconds'][key]:.3f} s ({r['seconds'][key] / r['seconds']['blend']:.2f}x blend)"
            for r in rows.values()
        ]
        print(f"| {label} | {' | '.join(cells)} |")
    cells = [f"{r['seconds']['save_load'] / r['seconds']['apply']:.1f}x" for r in rows.values()]
    print(f"| save + load / `apply` | {' | '.join(cells)} |")
    cells = [f"{100 * (1 - r['differing'] / r['parameters']):.2f}% of {r['parameters']:,}" for r in rows.values()]
    print(f"| `apply`'s elements equal to the float64 value rounded once | {' | '.join(cells)} |")
    cells = [f"{r['off_boundary']} of {r['differing']:,}" for r in rows.values()]
    print(f"| the others: not a rounding boundary to float32's error | {' | '.join(cells)} |")

    print(
        "\n| LoRA r=8 on q_proj, v_proj (float32) | model parameters | adapter parameters | copy of the adapter "
        "| the plane's `apply` |"
    )
    print("|---|---:|---:|---:|---:|")
    for size in SIZES:
        r = in_fresh_process("lora", size, args.repeats)
        print(
            f"| SmolLM2-{size}-sized | {r['parameters'] / 1e6:.1f}M | {r['adapter'] / 1e6:.2f}M "
            f"| {r['seconds']['copy'] * 1e3:.2f} ms | {r['seconds']['apply'] * 1e3:.2f} ms |"
        )


if __name__ == "__main__":
    main()
