"""Grid against racing, and the paper's argmax against `min_gain="significant"`, on the quickstart's setting.

For each seed, one quickstart run (SmolLM2-135M-Instruct's GGUF, LoRA, the four generated skills; the training
seed varies, the data does not) carries two callbacks over the same checkpoints:

- the grid (`search="grid"`), with the held-out evaluator: its report gives every candidate's selection score with
  per-document scores, the paper's argmax choice, and the held-out scores of the table's rows;
- racing (`search="racing"`): its choice, its item evaluations and the time its search spent evaluating.

`min_gain="significant"` is applied to the grid's candidates (`search.choose`: no evaluation), and its choice's
held-out gain read from the grid's rows (it is the best checkpoint, or a row of the table when it clears zero; a
choice outside the rows is counted as not measured). It prints, per seed and over all seeds:

- item evaluations and evaluation time of the two searches, and their ratio;
- whether racing chose the grid's model, or one whose gain over it has an interval containing zero (tied);
- the held-out gain of each choice over the best checkpoint, and whether it is below zero.

    python benchmarks/racing.py --seeds 0 1 2     # about 11 minutes per seed on 2 CPU cores
    python benchmarks/racing.py --documents 256   # selection sets of 4 x 256 documents
    python benchmarks/racing.py --documents 256 --replay   # racing replayed on that run's recorded scores
    python benchmarks/racing.py --documents 256 --replay --margins 0 0.01 --rounds 0.0625 0.125 0.25 0.5 1
"""

import argparse
import json
import os
import platform
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from instruction_data import SKILLS, generate_skills, to_sft, write_tasks  # noqa: E402
from peft import LoraConfig  # noqa: E402
from quickstart import BATCH_SIZE, load_model, load_splits  # noqa: E402
from transformers import PrinterCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from exme_callback import ExMeCallback, LMEvalEvaluator  # noqa: E402
from exme_callback.candidates import Candidate, best, choose  # noqa: E402
from exme_callback.intervals import gain_interval  # noqa: E402
from exme_callback.lora import quiet_peft_save  # noqa: E402
from exme_callback.strategies import Racing  # noqa: E402


class TimedEvaluator(LMEvalEvaluator):
    """Accumulates the time of the evaluations made while `timing` is set (the sweep's)."""

    timing, seconds = False, 0.0

    def __call__(self, model, items=None):
        started = time.perf_counter()
        try:
            return super().__call__(model, items)
        finally:
            if self.timing:
                self.seconds += time.perf_counter() - started


class TimedSweep(ExMeCallback):
    """Times its evaluator during its sweep (not during training)."""

    def on_train_end(self, *args, **kwargs):
        self.evaluator.timing = True
        try:
            return super().on_train_end(*args, **kwargs)
        finally:
            self.evaluator.timing = False


def run_seed(seed: int, args: argparse.Namespace, reports: list) -> dict | None:
    output_dir = os.path.join(args.output_dir, f"seed-{seed}")
    quickstart = argparse.Namespace(smoke=args.smoke, model=None, dataset=None, steps=args.steps)
    splits = load_splits(quickstart)
    if args.documents is not None:  # larger selection sets: the same skills, drawn again with more documents
        per_skill = -(-args.steps * BATCH_SIZE // len(SKILLS))
        heldout = len(next(iter(splits["heldout"].values())))
        splits = generate_skills({"train": per_skill, "selection": args.documents, "heldout": heldout})
    model, tokenizer = load_model(quickstart, splits)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    tasks = os.path.join(output_dir, "tasks")
    names = {split: write_tasks(f"{tasks}/{split}", splits[split]) for split in ("selection", "heldout")}
    make = lambda split, cls: cls(names[split], tokenizer, include_path=f"{tasks}/{split}", batch_size=32)  # noqa: E731
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(
            output_dir=output_dir,
            max_steps=args.steps,
            per_device_train_batch_size=BATCH_SIZE,
            learning_rate=1e-3,
            lr_scheduler_type="constant_with_warmup",
            warmup_steps=args.steps // 10,
            eval_strategy="steps",
            eval_steps=args.steps // 4,
            save_strategy="no",
            max_length=128,
            report_to=[],
            disable_tqdm=True,
            bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
            dataloader_pin_memory=torch.cuda.is_available(),
            seed=seed,
        ),
        train_dataset=Dataset.from_list(to_sft(splits["train"], tokenizer.eos_token)),
        eval_dataset=Dataset.from_list(to_sft(splits["selection"], tokenizer.eos_token)[:32]),  # the training's loss
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
    )
    grid = TimedSweep(
        trainer,
        evaluator=make("selection", TimedEvaluator),
        report_evaluator=make("heldout", LMEvalEvaluator),
        output_dir=os.path.join(output_dir, "exme-grid"),
        seed=seed,
    )
    racing = TimedSweep(
        trainer,
        evaluator=make("selection", TimedEvaluator),
        search="racing",
        output_dir=os.path.join(output_dir, "exme-racing"),
        seed=seed,
    )
    trainer.remove_callback(PrinterCallback)  # the candidates' logs: the table below says what matters
    trainer.add_callback(grid)
    if not args.grid_only:
        trainer.add_callback(racing)
    with quiet_peft_save():
        trainer.train()
    if args.grid_only:
        return None

    g, r = grid.report, racing.report
    reports.append(g)
    weights = grid.objective.gain_weights()
    same = r.final.coefficients == g.final.coefficients
    tie = same or gain_interval(r.final.items, g.final.items, weights, g.confidence, seed=seed)[0] <= 0
    significant = choose(g.candidates, g.greater_is_better, g.choose_from, "significant")
    reference = g.best_sft
    heldout = {id(c): c.heldout_score for _, c in g.rows()}

    def heldout_gain(candidate):
        score = heldout.get(id(candidate))
        return None if score is None else (score - reference.heldout_score) * (1 if g.greater_is_better else -1)

    return {
        "seed": seed,
        "grid items": g.item_evaluations,
        "racing items": r.item_evaluations,
        "grid s": f"{grid.evaluator.seconds:.0f}",
        "racing s": f"{racing.evaluator.seconds:.0f}",
        "racing = grid": same,
        "racing tied": tie,
        "argmax": f"{g.final.kind} {_hyper(g.final)}",
        "argmax Δsel": (g.final.score - reference.score) * (1 if g.greater_is_better else -1),
        "argmax interval": g.final.interval,
        "argmax Δheld-out": heldout_gain(g.final),
        "significant": f"{significant.kind} {_hyper(significant)}",
        "significant Δheld-out": heldout_gain(significant),
    }


def scaling(reports: list, sizes=(128, 512, 2048, 8192)) -> list[dict]:
    """Racing on simulated evaluation sets of `sizes` items, each candidate's per-item accuracy its selection score
    in the grid's reports (paired: item `i` is solved by every candidate whose accuracy exceeds its difficulty): how
    the saving grows with the number of items, and whether each stage's winner is the best by that accuracy."""
    rows = []
    for n in sizes:
        used = grid = found = stages = 0
        for seed, report in enumerate(reports):
            stages_of = [("expo", "alpha1"), ("expo", "alpha2"), ("exme", "beta")]
            for kind, name in stages_of:
                accuracies = [c.score for c in report.candidates if c.kind == kind and c.hyper.get(name) is not None]
                items, winner = _simulated_race(accuracies, n, seed, line=kind == "expo")
                used, grid, stages = used + items, grid + len(accuracies) * n, stages + 1
                found += accuracies[winner] >= max(accuracies) - 1e-9
        rows.append({"items": n, "grid items": grid, "racing items": used, "ratio": grid / used, "best": found})
        rows[-1]["best"] = f"{found} of {stages} stages"
    return rows


def print_scaling(reports: list) -> None:
    print("\nRacing on simulated evaluation sets: each grid candidate's selection score as its per-item accuracy\n")
    table = scaling(reports)
    print("| " + " | ".join(table[0]) + " |")
    print("|" + "---:|" * len(table[0]))
    for row in table:
        print("| " + " | ".join(f"{v:.2f}x" if k == "ratio" else _cell(v) for k, v in row.items()) + " |")


def _candidates_of(path: str):
    """A grid report's candidates, read back from its `exme_report.json`."""
    with open(path) as f:
        return argparse.Namespace(candidates=[Candidate.from_dict(c) for c in json.load(f)["candidates"]])


def _simulated_race(accuracies: list[float], n: int, seed: int, line: bool) -> tuple[int, int]:
    """Race candidates of known accuracies on `n` simulated items: the items scored, and the winner's position."""
    difficulty = torch.rand(n, generator=torch.Generator().manual_seed(seed)).tolist()

    def evaluate(candidate, request):
        p = accuracies[int(candidate.hyper["position"])]
        return {"acc": [float(difficulty[i] < p) for i in request["acc"]]}

    group = [Candidate("exme", (float(i), 0.0), hyper={"position": i}) for i in range(len(accuracies))]
    race = Racing(evaluate, {"acc": n}, lambda m: m["acc"], {"acc": 1.0}, greater_is_better=True, seed=seed)
    race(group, line=line)
    return race.item_evaluations, int(best(group, True).hyper["position"])


def replay(grid_dir: str, seed: int, rounds: tuple[float, ...] | None = None, margin: float = 0.0) -> dict:
    """Racing replayed through the pipeline on a grid run's recorded per-item scores (`exme_report.json` and
    `exme_items.json` in `grid_dir`): the item evaluations racing makes and its choice, without the
    model (the per-item scores of a subset are the grid's, the evaluation being per document). A k-parameter
    model stands for the span: its weights are the candidate's coefficients, looked up in the grid's candidates.
    `rounds` replaces `RACING_ROUNDS`; `margin` is `racing_margin`."""
    import tempfile

    from exme_callback import Checkpoint, Objective, SearchSettings, pipeline
    from exme_callback.objective import item_group
    from exme_callback.planes import DensePlane
    from exme_callback.scoring import Scorer
    from exme_callback.strategies import racing

    with open(os.path.join(grid_dir, "exme_report.json")) as f:
        report = json.load(f)
    with open(os.path.join(grid_dir, "exme_items.json")) as f:
        items = json.load(f)
    recorded = [
        (tuple(c["coefficients"]), i["items"])
        for c, i in zip(report["candidates"], items["candidates"], strict=True)
        if c["coefficients"]
    ]
    k = len(recorded[0][0])
    checkpoints = [
        Checkpoint(c["steps"][i], c["score"], c["metrics"], scores["items"])
        for i, (c, scores) in enumerate(zip(report["candidates"][:k], items["candidates"][:k], strict=True))
    ]
    model = torch.nn.Module()
    model.c = torch.nn.Parameter(torch.zeros(k, dtype=torch.float64))
    unit = [{"c": torch.eye(k, dtype=torch.float64)[i]} for i in range(k)]
    plane = DensePlane(
        {"c": model.c.data}, {"c": torch.zeros(k, dtype=torch.float64)}, unit, {"c": model.c.data.clone()}
    )

    def evaluate(model, items=None):
        point = model.c.detach().tolist()
        found = [v for c, v in recorded if max(abs(a - b) for a, b in zip(c, point, strict=True)) < 1e-6]
        if not found:
            raise KeyError(f"no recorded candidate at {point}")
        if items is None:
            return found[0]
        return {m: [v[i] for i in items[item_group(m)]] for m, v in found[0].items()}

    objective = Objective({m: w > 0 for m, w in items["gain_weights"].items()})
    saved = racing.RACING_ROUNDS
    if rounds is not None:
        racing.RACING_ROUNDS = rounds
    try:
        with tempfile.TemporaryDirectory() as folder:
            output = pipeline.Output(os.path.join(folder, "exme"), write=False, show_progress=False)
            settings = SearchSettings(search="racing", seed=seed, racing_margin=margin)
            result = pipeline.run(model, plane, checkpoints, Scorer(evaluate, objective), output, settings=settings)
    finally:
        racing.RACING_ROUNDS = saved
    grid_final = tuple(report["final"]["coefficients"]) if report["final"]["coefficients"] else None
    return {
        "seed": seed,
        "margin": margin,
        "grid items": report["grid_item_evaluations"],
        "racing items": result.item_evaluations,
        "ratio": report["grid_item_evaluations"] / result.item_evaluations,
        "racing = grid": result.final.coefficients == grid_final,
        "racing - grid selection": result.final.score - report["final"]["score"],  # both on every item
    }


def _hyper(candidate) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in candidate.hyper.items()) or f"step {max(filter(None, candidate.steps))}"


def _cell(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:+.4f}" if abs(value) < 10 else f"{value:.0f}"
    if isinstance(value, tuple):
        return f"[{value[0]:+.4f}, {value[1]:+.4f}]"
    return f"{value:,}" if isinstance(value, int) else str(value)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--documents", type=int, help="selection documents per task (default: the quickstart's 32)")
    parser.add_argument("--output-dir", default="runs/racing")
    parser.add_argument("--smoke", action="store_true", help="the quickstart's tiny model: checks the script")
    parser.add_argument(
        "--simulate-only", action="store_true", help="only the simulated table, from the grid reports of a past run"
    )
    parser.add_argument(
        "--replay",
        action="store_true",
        help="only racing's item evaluations and choice, replayed on the per-item scores of a past run's grids",
    )
    parser.add_argument(
        "--grid-only", action="store_true", help="only the grid's run folders, for --replay (no racing, no table)"
    )
    parser.add_argument("--rounds", type=float, nargs="+", help="--replay: racing's rounds (RACING_ROUNDS)")
    parser.add_argument("--margins", type=float, nargs="+", default=[0.0], help="--replay: racing_margin values")
    args = parser.parse_args()
    if args.replay:
        rounds = None if args.rounds is None else tuple(args.rounds)
        for margin in args.margins:
            rows = [
                replay(os.path.join(args.output_dir, f"seed-{seed}", "exme-grid"), seed, rounds, margin)
                for seed in args.seeds
            ]
            for r in rows:
                print(
                    f"seed {r['seed']}, margin {r['margin']:g}: {r['grid items']:,} grid items, {r['racing items']:,} "
                    f"racing items ({r['ratio']:.2f}x), racing = grid {_cell(r['racing = grid'])}, racing - grid "
                    f"selection {r['racing - grid selection']:+.4f}"
                )
            items = sum(r["grid items"] for r in rows) / sum(r["racing items"] for r in rows)
            print(
                f"margin {margin:g}, over {len(rows)} seeds: {items:.2f}x fewer item evaluations; the grid's choice "
                f"in {sum(r['racing = grid'] for r in rows)} of {len(rows)}\n"
            )
        return
    if args.simulate_only:
        paths = [os.path.join(args.output_dir, f"seed-{seed}", "exme-grid", "exme_report.json") for seed in args.seeds]
        print_scaling([_candidates_of(path) for path in paths])
        return
    reports = []
    rows = []
    for seed in args.seeds:
        if args.grid_only:
            run_seed(seed, args, reports)
            print(f"seed {seed}: the grid's run is in {os.path.join(args.output_dir, f'seed-{seed}', 'exme-grid')}")
            continue
        rows.append(run_seed(seed, args, reports))
        print(f"seed {seed}: " + ", ".join(f"{k} {_cell(v)}" for k, v in rows[-1].items()), flush=True)
    if args.grid_only:
        return

    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; quickstart setting, "
        f"{args.steps} steps, seeds {args.seeds}\n"
    )
    print("| " + " | ".join(rows[0]) + " |")
    print("|" + "---|" * len(rows[0]))
    for row in rows:
        print("| " + " | ".join(_cell(v) for v in row.values()) + " |")
    n = len(rows)
    items = sum(r["grid items"] for r in rows) / sum(r["racing items"] for r in rows)
    seconds = sum(float(r["grid s"]) for r in rows) / sum(float(r["racing s"]) for r in rows)
    print(
        f"\nover {n} seeds: racing used {items:.2f}x fewer item evaluations and {seconds:.2f}x less evaluation time;"
    )
    print(
        f"it chose the grid's model in {sum(r['racing = grid'] for r in rows)} of {n}, "
        f"the grid's or one tied with it in {sum(r['racing tied'] for r in rows)} of {n}."
    )
    print_scaling(reports)
    for rule in ("argmax", "significant"):
        gains = [r[f"{rule} Δheld-out"] for r in rows if r[f"{rule} Δheld-out"] is not None]
        below = sum(g < 0 for g in gains)
        mean = sum(gains) / len(gains) if gains else float("nan")
        print(
            f"{rule}: mean held-out gain {mean:+.4f} over {len(gains)} measured seeds; below the best checkpoint "
            f"held-out in {below} of {len(gains)}."
        )


if __name__ == "__main__":
    main()
