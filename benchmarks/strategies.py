"""ExMe's grid, M^3 and Top-k greedy merging side by side on one finished run: evaluations, selection and held-out
scores of each strategy's choice, against the best checkpoint.

The run is the quickstart's (a real SmolLM2-135M-Instruct LoRA run on four generated skills, scored by lm-eval on a
selection split and a held-out split), with its checkpoints kept on disk:

    python examples/quickstart.py --save-checkpoints --output-dir runs/quickstart
    python benchmarks/strategies.py runs/quickstart

Each strategy runs through `exme run` (the same pipeline as the callback) on the same checkpoints, ranked by the
callback's own scores, in its own output folder; the table is printed as markdown.
"""

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from exme_callback.cli import main as exme

SKILLS = ["arithmetic", "comparison", "alphabetical", "sequence"]
STRATEGIES = {  # label -> (output folder, `exme run` options)
    "ExMe (grid)": ("exme", ["--strategy", "exme"]),
    "M^3 (9 draws, a=2)": ("mixup", ["--strategy", "mixup", "--mixup-draws", "9", "--mixup-a", "2"]),
    "M^3 + DARE (0.7)": (
        "mixup-dare",
        ["--strategy", "mixup", "--mixup-draws", "9", "--mixup-a", "2", "--dare", "0.7"],
    ),
    "Top-k greedy (k=4)": ("topk", ["--strategy", "topk_greedy", "--top-k", "4"]),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished quickstart run with its checkpoints (--save-checkpoints)")
    parser.add_argument("--output-dir", help="where each strategy's exme/ folder goes (default: RUN_DIR/strategies)")
    args = parser.parse_args()
    output = args.output_dir or os.path.join(args.run_dir, "strategies")
    tasks = os.path.join(args.run_dir, "tasks")
    common = ["run", args.run_dir, "--metric", "exme/checkpoint/score", "--batch-size", "32"]
    common += ["--tasks", *SKILLS, "--include-path", os.path.join(tasks, "selection")]
    common += ["--heldout-tasks", *SKILLS, "--heldout-include-path", os.path.join(tasks, "heldout")]

    rows = []
    for label, (name, options) in STRATEGIES.items():
        folder = os.path.join(output, name)
        started = time.perf_counter()
        if exme([*common, *options, "--output-dir", folder]) != 0:
            raise SystemExit(f"`exme run` failed for {label}")
        seconds = time.perf_counter() - started
        with open(os.path.join(folder, "exme_report.json")) as f:
            report = json.load(f)
        best = next(c for c in report["candidates"] if c["kind"] == "sft")  # SFT-1, the best checkpoint
        final = report["final"]
        searched = sum(c["kind"] not in ("sft", "base") for c in report["candidates"])
        rows.append((label, searched, final, best, seconds))

    print("\n| strategy | evaluations | chosen | selection | Δ selection | held-out | Δ held-out | time |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    label, _, _, best, _ = rows[0]
    print(
        f"| best checkpoint | 0 | SFT-1 | {best['score']:.4f} | +0.0000 | {best['heldout_score']:.4f} | +0.0000 | - |"
    )
    for label, searched, final, best, seconds in rows:
        hyper = ", ".join(f"{k}={v:.3g}" for k, v in final["hyper"].items() if k != "kinship") or "-"
        cells = [
            label,
            str(searched),
            f"{final['kind']} ({hyper})",
            f"{final['score']:.4f}",
            f"{final['score'] - best['score']:+.4f}",
            f"{final['heldout_score']:.4f}",
            f"{final['heldout_score'] - best['heldout_score']:+.4f}",
            f"{seconds:.0f} s",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
