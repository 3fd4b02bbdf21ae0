"""ExMe's sweep end to end, in-process against the paper's pipeline (mergekit, then lm-eval in a fresh process for
every candidate), and where an in-process sweep's time goes.

The run is the quickstart's (a real SmolLM2-135M-Instruct LoRA run on four generated skills, scored by lm-eval),
with its checkpoints kept on disk. The paper's pipeline needs mergekit, in a virtual environment of its own:

    python examples/quickstart.py --save-checkpoints --output-dir runs/quickstart
    python -m venv /tmp/mergekit-venv && /tmp/mergekit-venv/bin/pip install torch==2.13.0 \
        && /tmp/mergekit-venv/bin/pip install mergekit
    python benchmarks/end_to_end.py runs/quickstart --mergekit-bin /tmp/mergekit-venv/bin
    python benchmarks/end_to_end.py runs/quickstart --candidates 2      # a quick look; no mergekit: (a) only

The candidates are the default ExMe grid's (5 alphas for each EXPO, then 9 betas: 19 points
`base + c1 * d1 + c2 * d2` of the two best checkpoints, ranked by the callback's `exme/checkpoint/score` as
`exme run RUN --metric exme/checkpoint/score` ranks them), all scored on the selection tasks (batch size 32):

(a) in-process, through the library: the run is loaded once (`runs.load_plane`, as `exme run` does) and
    `pipeline.run` sweeps it, writing each candidate into the live model (`plane.apply`) and scoring it with
    `LMEvalEvaluator` (nothing is written to disk);
(b) the paper's pipeline, per candidate: a mergekit `task_arithmetic` recipe (the library's own `mergekit.yml`
    format), `mergekit-yaml` into a folder, then `python -m lm_eval --model hf` on that folder in a fresh process.
    mergekit cannot read GGUF, so the base is first written once as a safetensors folder; that, and the first fill
    of mergekit's `--lora-merge-cache` (each adapter fused into the base once), are timed as setup.

Table 1 compares scores and times per candidate; table 2 splits the in-process sweep's time into the model's
forward passes, the harness around them (lm-eval's requests, tokenizing, metrics; Hugging Face's generation loop),
the switches between candidates and the rest of the sweep. Markdown on stdout, progress on stderr.

Give it the machine: on a small CPU shared with another multi-threaded job, PyTorch's threads wait on each other
(on 2 cores, an evaluation of 9 s took 190 s beside another 2-thread process). The "cores used" column shows it;
`OMP_NUM_THREADS=1` (inherited by mergekit and lm-eval) makes every process single-threaded and far less sensitive.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import torch

from exme_callback import pipeline
from exme_callback.candidates import Candidate
from exme_callback.evaluators import LMEvalEvaluator
from exme_callback.objective import Objective
from exme_callback.report import Report
from exme_callback.runs import load_plane, rank_run
from exme_callback.scoring import Scorer
from exme_callback.settings import SearchSettings
from exme_callback.strategies import ExMe

SKILLS = ["arithmetic", "comparison", "alphabetical", "sequence"]
METRIC = "exme/checkpoint/score"
BATCH_SIZE = 32
TIMESTAMP = re.compile(r"^\d{4}-\d{2}-\d{2}:\d{2}:\d{2}:\d{2} ")  # lm-eval's log lines start with one
WARNING = re.compile(r"warn|error", re.IGNORECASE)
MERGEKIT_SETUP = (
    "python -m venv /tmp/mergekit-venv && /tmp/mergekit-venv/bin/pip install torch==2.13.0 "
    "&& /tmp/mergekit-venv/bin/pip install mergekit"
)


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def label(candidate: Candidate) -> str:
    names = {"alpha1": "a1", "alpha2": "a2", "beta": "b"}
    hyper = ", ".join(f"{names[k]}={v:g}" for k, v in candidate.hyper.items())
    kind = {"expo": "EXPO-1" if candidate.c2 == 0 else "EXPO-2", "exme": "ExMe"}.get(candidate.kind, candidate.kind)
    return f"{kind} ({hyper})"


# --- (a) in-process, instrumented from the outside --------------------------------------------------------------


class Stop(Exception):
    """The sweep has scored the candidates asked for (`--candidates`)."""


@dataclass
class Evaluation:
    """One candidate of the in-process sweep: its timings (seconds) and the candidate as scored."""

    candidate: Candidate
    started: float  # when its switch began
    switch: float  # plane.apply
    evaluation: float  # the scorer's call
    forward: float  # inside the model's forward
    generate: float  # inside `generate` (its forward passes included)
    generate_forward: float  # the forward passes inside `generate`
    ended: float  # when its evaluation ended
    cpu: float  # CPU seconds of this process (all threads) during the evaluation


@dataclass
class Sweep:
    """The in-process sweep's clock: when it started and ended, and the seconds of its kinship pass."""

    started: float
    ended: float
    gram: float

    @property
    def seconds(self) -> float:
        return self.ended - self.started


class Instruments:
    """Clocks around the live model and the plane, without touching the library: forward hooks on the transformer
    (every forward pass, also the ones `generate` makes), a wrapper on the model's `generate` and on `plane.apply`."""

    def __init__(self, model: torch.nn.Module, plane, limit: int | None):
        self.forward = self.generate = self.generate_forward = self.switch = self.gram = 0.0
        self.switch_started: list[float] = []
        self.limit, self.scored = limit, 0
        self._in_generate, self._forward_started = False, 0.0
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._hooks = [
            inner.register_forward_pre_hook(self._before_forward),
            inner.register_forward_hook(self._after_forward),
        ]
        self._model, self._plane = model, plane
        model.generate = self._timed_generate(model.generate)  # lm-eval calls `model.generate`
        plane.apply = self._timed_apply(plane.apply)  # the sweep writes every candidate with `plane.apply`
        plane.gram = self._timed_gram(plane.gram)  # the kinship pass before the search

    def _before_forward(self, module, args) -> None:
        self._forward_started = time.perf_counter()

    def _after_forward(self, module, args, output) -> None:
        seconds = time.perf_counter() - self._forward_started
        self.forward += seconds
        if self._in_generate:
            self.generate_forward += seconds

    def _timed_generate(self, generate):
        def timed(*args, **kwargs):
            started, self._in_generate = time.perf_counter(), True
            try:
                return generate(*args, **kwargs)
            finally:
                self._in_generate = False
                self.generate += time.perf_counter() - started

        return timed

    def _timed_apply(self, apply):
        def timed(point):
            if self.limit is not None and self.scored >= self.limit:
                raise Stop  # before switching to the first candidate not asked for
            started = time.perf_counter()
            self.switch_started.append(started)
            try:
                return apply(point)
            finally:
                self.switch += time.perf_counter() - started

        return timed

    def _timed_gram(self, gram):
        def timed():
            started = time.perf_counter()
            try:
                return gram()
            finally:
                self.gram += time.perf_counter() - started

        return timed

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        del self._model.generate, self._plane.apply, self._plane.gram


class TimedScorer(Scorer):
    """The pipeline's scorer, recording each evaluation with the instruments' readings."""

    def __init__(self, evaluator, objective: Objective, instruments: Instruments):
        super().__init__(evaluator, objective)
        self.instruments, self.evaluations = instruments, []
        self._switch = 0.0

    def score_into(self, model, candidate, heldout: bool = False):
        clock = self.instruments
        switch, self._switch = clock.switch - self._switch, clock.switch
        before = (clock.forward, clock.generate, clock.generate_forward)
        started, cpu = time.perf_counter(), time.process_time()
        candidate = super().score_into(model, candidate, heldout)
        ended, cpu = time.perf_counter(), time.process_time() - cpu
        self._switch = clock.switch
        clock.scored += 1
        after = (clock.forward, clock.generate, clock.generate_forward)
        deltas = [b - a for a, b in zip(before, after, strict=True)]
        self.evaluations.append(
            Evaluation(candidate, clock.switch_started[-1], switch, ended - started, *deltas, ended=ended, cpu=cpu)
        )
        say(f"(a) {len(self.evaluations):2d} {label(candidate)}: score {candidate.score:.4f}, {ended - started:.1f} s")
        return candidate


def in_process(run_dir: str, folders: list[str], checkpoints, limit: int | None):
    """Load the run once, sweep it with `pipeline.run` (writing nothing), and return the setup's seconds, the
    sweep's wall seconds, the recorded evaluations and the objective (metrics -> score)."""
    started = time.perf_counter()
    loaded = load_plane(None, folders)
    loaded_at = time.perf_counter()
    evaluator = LMEvalEvaluator(
        SKILLS, loaded.tokenizer, include_path=os.path.join(run_dir, "tasks", "selection"), batch_size=BATCH_SIZE
    )
    instruments = Instruments(loaded.model, loaded.plane, limit)
    scorer = TimedScorer(evaluator, Objective.for_evaluator(evaluator), instruments)
    setup = {"load the base and the plane": loaded_at - started}
    setup["build the lm-eval tasks"] = time.perf_counter() - loaded_at
    say(f"(a) setup: {sum(setup.values()):.1f} s; sweeping")
    sources = {"base_model": loaded.base, "checkpoints": [os.path.abspath(f) for f in folders], "adapter": True}
    started = time.perf_counter()
    try:
        pipeline.run(
            loaded.model,
            loaded.plane,
            checkpoints,
            scorer,
            pipeline.Output(  # never written
                os.path.join(run_dir, "exme-end-to-end-unused"), sources=sources, write=False, show_progress=False
            ),
            settings=SearchSettings(),
        )
    except Stop:
        pass
    sweep = Sweep(started, time.perf_counter(), instruments.gram)
    instruments.remove()
    return loaded.base, setup, sweep, scorer.evaluations, scorer.objective


# --- (b) the paper's pipeline: mergekit, then lm-eval in a fresh process ---------------------------------------


def base_folder(base: str, tokenizer_folder: str, destination: str) -> str:
    """The base model as a safetensors folder mergekit can read: a folder holding one GGUF file is dequantized to
    float32 and saved (with the run's tokenizer, which mergekit copies into every merge), others are used as they
    are."""
    ggufs = sorted(glob.glob(os.path.join(base, "*.gguf"))) if os.path.isdir(base) else []
    if os.path.isfile(os.path.join(base, "config.json")) or len(ggufs) != 1:
        return base
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, gguf_file=os.path.basename(ggufs[0]), dtype=torch.float32)
    model.hf_quantizer, model.is_quantized = None, False  # as `exme run` loads it: plain float32 tensors
    model.config.__dict__.pop("quantization_config", None)
    model.save_pretrained(destination)
    AutoTokenizer.from_pretrained(tokenizer_folder).save_pretrained(destination)
    return destination


def recipe(candidate: Candidate, base: str, folders: list[str]) -> str:
    """The candidate as the library writes a chosen model into `mergekit.yml` (`Report.mergekit_recipe`)."""
    sources = {"base_model": base, "checkpoints": folders, "adapter": True}
    report = Report("score", True, [], [candidate], candidate, (), (), "all", sources=sources)
    return report.mergekit_recipe()


def children_cpu() -> float:
    """CPU seconds of the finished child processes so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed_command(command: list[str], log: str) -> tuple[float, float]:
    """Run a command with its output in `log`; its wall and CPU seconds. A failure stops the benchmark, naming the
    log."""
    started, cpu = time.perf_counter(), children_cpu()
    with open(log, "w") as f:
        result = subprocess.run(command, stdout=f, stderr=subprocess.STDOUT)
    seconds, cpu = time.perf_counter() - started, children_cpu() - cpu
    if result.returncode != 0:
        raise SystemExit(f"`{shlex.join(command)}` failed (exit {result.returncode}); see {log}")
    return seconds, cpu


def lm_eval_command(folder: str, run_dir: str, output: str) -> list[str]:
    return [
        sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={folder},dtype=float32",
        "--tasks", ",".join(SKILLS), "--include_path", os.path.join(run_dir, "tasks", "selection"),
        "--batch_size", str(BATCH_SIZE), "--output_path", output,
    ]  # fmt: skip


def lm_eval_score(output: str, objective: Objective) -> float:
    """The selection score of an `lm_eval --output_path` folder, by the objective the in-process path used."""
    (path,) = glob.glob(os.path.join(output, "**", "results_*.json"), recursive=True)
    with open(path) as f:
        results = json.load(f)["results"]
    metrics = {}
    for task, values in results.items():
        for key, value in values.items():
            metric, _, filter_name = key.partition(",")
            name = f"{task}/{metric}" if filter_name in ("none", "") else f"{task}/{metric},{filter_name}"
            if name in objective.metrics:
                metrics[name] = float(value)
    return objective(metrics)


@dataclass
class Merge:
    score: float
    merge: float
    evaluation: float
    cpu: float  # CPU seconds of both processes


def paper_pipeline(mergekit_bin, base, folders, evaluations, run_dir, scratch, objective):
    """Every candidate through mergekit and a fresh lm-eval process; the setup's seconds, one `Merge` each, and the
    messages (warnings) the tools printed."""
    logs = os.path.join(scratch, "logs")
    os.makedirs(logs, exist_ok=True)
    setup = {}
    started = time.perf_counter()
    hf_base = base_folder(base, folders[0], os.path.join(scratch, "base-safetensors"))
    setup["write the base as safetensors"] = time.perf_counter() - started
    say(f"(b) base as safetensors: {setup['write the base as safetensors']:.1f} s ({hf_base})")
    cache = os.path.join(scratch, "lora-merge-cache")
    shutil.rmtree(cache, ignore_errors=True)
    mergekit = [os.path.join(mergekit_bin, "mergekit-yaml")]

    def merge(candidate: Candidate, name: str) -> tuple[str, float, float]:
        path, out = os.path.join(scratch, f"{name}.yml"), os.path.join(scratch, name)
        with open(path, "w") as f:
            f.write(recipe(candidate, hf_base, folders))
        shutil.rmtree(out, ignore_errors=True)
        command = [*mergekit, path, out, "--lora-merge-cache", cache]
        return out, *timed_command(command, os.path.join(logs, f"{name}-mergekit.log"))

    # The first merge fuses each adapter into the base once, into the cache, keyed by the base's and the adapter's
    # paths: a one-off for the whole sweep. Timed as setup (a whole first merge with a cold cache).
    out, cold, _ = merge(evaluations[0].candidate, "cold-cache")
    shutil.rmtree(out)
    setup["first mergekit run (cold --lora-merge-cache)"] = cold
    say(f"(b) first merge, cold cache: {cold:.1f} s")

    merges = []
    for i, evaluation in enumerate(evaluations):
        name = f"candidate-{i + 1:02d}"
        out, merge_seconds, merge_cpu = merge(evaluation.candidate, name)
        results = os.path.join(scratch, f"{name}-lm-eval")
        shutil.rmtree(results, ignore_errors=True)
        command = lm_eval_command(out, run_dir, results)
        eval_seconds, eval_cpu = timed_command(command, os.path.join(logs, f"{name}-lm-eval.log"))
        merges.append(Merge(lm_eval_score(results, objective), merge_seconds, eval_seconds, merge_cpu + eval_cpu))
        shutil.rmtree(out)  # a full model each: keep the disk free
        say(
            f"(b) {i + 1:2d} {label(evaluation.candidate)}: score {merges[-1].score:.4f}, mergekit {merge_seconds:.1f}"
            f" s, lm-eval {eval_seconds:.1f} s"
        )
    return setup, merges, messages(logs)


def messages(logs: str) -> dict[str, int]:
    """The warnings and errors in the tools' logs, each line once with how many logs have it."""
    counts: dict[str, int] = {}
    for path in sorted(glob.glob(os.path.join(logs, "*.log"))):
        with open(path, errors="replace") as f:
            lines = {TIMESTAMP.sub("", line.strip()) for line in f if WARNING.search(line)}
        for line in lines - {"warnings.warn("}:
            tool = "mergekit" if path.endswith("mergekit.log") else "lm-eval"
            key = f"{tool}: {line[:240]}"
            counts[key] = counts.get(key, 0) + 1
    return counts


# --- the tables ----------------------------------------------------------------------------------------------


def row(*cells) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def percent(part: float, whole: float) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "-"


def table_1(evaluations, merges, setup_a, setup_b) -> None:
    print("\n## 1. End to end against the paper's pipeline\n")
    print(
        "(a) in-process: switch (`plane.apply`) + `LMEvalEvaluator`; (b) `mergekit-yaml` + `python -m lm_eval` in a "
        "fresh process, per candidate. Seconds. 'cores used' is CPU seconds over wall seconds, of the evaluation "
        f"(a) and of both processes (b): (a) well under the torch threads ({torch.get_num_threads()}) means other "
        "processes took the CPU; (b) is lower anyway, its start-up (imports, loading) runs on one thread.\n"
    )
    if merges is None:
        print(f"(b) skipped: no `--mergekit-bin`. Create mergekit's environment with\n\n    {MERGEKIT_SETUP}\n")
        print("and pass `--mergekit-bin /tmp/mergekit-venv/bin`.\n")
    print(row("#", "candidate", "c1", "c2", "score (a)", "score (b)", "abs diff", "(a) s", "(b) mergekit s",
              "(b) lm-eval s", "(b) s", "(b)/(a)", "cores used (a) / (b)"))  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    a_times = [e.switch + e.evaluation for e in evaluations]
    for i, (evaluation, a) in enumerate(zip(evaluations, a_times, strict=True)):
        c = evaluation.candidate
        cells = [i + 1, label(c), f"{c.c1:.3g}", f"{c.c2:.3g}", f"{c.score:.4f}"]
        cores = f"{evaluation.cpu / evaluation.evaluation:.1f}"
        if merges is None:
            cells += ["skipped", "-", f"{a:.1f}", "skipped", "skipped", "skipped", "-", cores]
        else:
            m = merges[i]
            b = m.merge + m.evaluation
            cells += [f"{m.score:.4f}", f"{abs(m.score - c.score):.4f}", f"{a:.1f}", f"{m.merge:.1f}",
                      f"{m.evaluation:.1f}", f"{b:.1f}", f"{b / a:.1f}x", f"{cores} / {m.cpu / b:.1f}"]  # fmt: skip
        print(row(*cells))
    n = len(evaluations)
    total_a = sum(a_times)
    cores_a = f"{sum(e.cpu for e in evaluations) / sum(e.evaluation for e in evaluations):.1f}"
    if merges is None:
        print(row("", "**mean**", "", "", "", "", "", f"{total_a / n:.1f}", "", "", "", "", cores_a))
        print(row("", "**total**", "", "", "", "", "", f"{total_a:.1f}", "", "", "", "", cores_a))
    else:
        merge_total, eval_total = sum(m.merge for m in merges), sum(m.evaluation for m in merges)
        total_b = merge_total + eval_total
        ratio, cores = f"{total_b / total_a:.1f}x", f"{cores_a} / {sum(m.cpu for m in merges) / total_b:.1f}"
        for name, k in (("**mean**", n), ("**total**", 1)):
            print(row("", name, "", "", "", "", "", f"{total_a / k:.1f}", f"{merge_total / k:.1f}",
                      f"{eval_total / k:.1f}", f"{total_b / k:.1f}", ratio, cores))  # fmt: skip
        differences = [abs(m.score - e.candidate.score) for m, e in zip(merges, evaluations, strict=True)]
        worst = max(range(n), key=lambda i: differences[i])
        where = f" (candidate {worst + 1})" if differences[worst] > 0 else ""
        print(
            f"\nLargest absolute score difference between (a) and (b): {differences[worst]:.4f}{where}; candidates "
            f"with different scores: {sum(d > 0 for d in differences)} of {n}."
        )

    print("\n| | (a) in-process | (b) mergekit + lm-eval |\n|---|---:|---:|")
    setup_b_text = "skipped" if setup_b is None else f"{sum(setup_b.values()):.1f}"
    print(row("setup (once)", f"{sum(setup_a.values()):.1f}", setup_b_text))
    if merges is not None:
        print(row(f"candidates ({n})", f"{total_a:.1f}", f"{total_b:.1f}"))
        print(row("per candidate (mean)", f"{total_a / n:.1f}", f"{total_b / n:.1f}"))
        a_all, b_all = sum(setup_a.values()) + total_a, sum(setup_b.values()) + total_b
        print(row("end to end (setup + candidates)", f"{a_all:.1f}", f"{b_all:.1f}"))
        print(row("ratio (b)/(a), candidates only", "", f"{total_b / total_a:.1f}x"))
        print(row("ratio (b)/(a), end to end", "", f"{b_all / a_all:.1f}x"))
    print("\nSetup, seconds:\n")
    for side, setup in (("(a)", setup_a), ("(b)", setup_b)):
        for what, seconds in (setup or {}).items():
            print(f"- {side} {what}: {seconds:.1f}")
    if merges is not None:
        fill = setup_b["first mergekit run (cold --lora-merge-cache)"] - merges[0].merge
        print(
            f"- (b) of which the cache's first fill (cold first merge minus the same merge warm, "
            f"{merges[0].merge:.1f} s): {fill:.1f}"
        )


def table_2(evaluations, sweep: Sweep) -> None:
    seconds, started, ended = sweep.seconds, sweep.started, sweep.ended
    print("\n## 2. Where an in-process sweep's time goes\n")
    print(
        "Per candidate (from the start of its switch to the start of the next): forward = inside the model's "
        "forward (hooks on the transformer, also the passes `generate` makes); harness = the evaluation minus "
        "forward (lm-eval's requests, tokenizing and metrics, and Hugging Face's generation loop around its forward "
        "passes, shown apart as 'gen. loop'); switch = `plane.apply`; bookkeeping = the rest. Seconds (share of the "
        "row).\n"
    )
    print(row("#", "candidate", "total", "forward", "harness", "(gen. loop)", "switch", "bookkeeping",
              "harness / evaluation"))  # fmt: skip
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|")
    first = evaluations[0].started
    before = f"before the first (kinship pass {sweep.gram:.2f} s)"
    print(row("", before, f"{first - started:.2f}", "", "", "", "", "", ""))
    totals = dict.fromkeys(("forward", "harness", "loop", "switch", "bookkeeping", "evaluation"), 0.0)
    for i, e in enumerate(evaluations):
        end = evaluations[i + 1].started if i + 1 < len(evaluations) else e.ended
        span = end - e.started
        harness, loop = e.evaluation - e.forward, e.generate - e.generate_forward
        bookkeeping = span - e.switch - e.evaluation
        parts = {"forward": e.forward, "harness": harness, "loop": loop, "switch": e.switch}
        parts.update(bookkeeping=bookkeeping, evaluation=e.evaluation)
        for key, value in parts.items():
            totals[key] += value
        cells = [f"{parts[k]:.2f} ({percent(parts[k], span)})" for k in ("forward", "harness", "loop", "switch")]
        cells.append(f"{bookkeeping:.3f} ({percent(bookkeeping, span)})")
        print(row(i + 1, label(e.candidate), f"{span:.2f}", *cells, percent(harness, e.evaluation)))
    tail = ended - evaluations[-1].ended
    print(row("", "after the last (choice, restore)", f"{tail:.2f}", "", "", "", "", "", ""))
    switch = totals["switch"]
    bookkeeping = seconds - totals["evaluation"] - switch  # includes the rows before the first and after the last
    cells = [f"{totals[k]:.1f} ({percent(totals[k], seconds)})" for k in ("forward", "harness", "loop")]
    cells += [f"{switch:.2f} ({percent(switch, seconds)})", f"{bookkeeping:.2f} ({percent(bookkeeping, seconds)})"]
    print(row("", "**sweep**", f"{seconds:.1f}", *cells, percent(totals["harness"], totals["evaluation"])))
    harness_share = totals["harness"] / totals["evaluation"]
    worst_share = max((e.evaluation - e.forward) / e.evaluation for e in evaluations)
    overhead = (switch + bookkeeping) / seconds
    print("\nTargets:\n")
    print(
        f"- harness <= 10% of an evaluation: {100 * harness_share:.1f}% over the sweep, {100 * worst_share:.1f}% at "
        f"worst ({'met' if worst_share <= 0.10 else 'not met'}); of the harness, Hugging Face's generation loop is "
        f"{totals['loop']:.1f} s and the rest (lm-eval) {totals['harness'] - totals['loop']:.1f} s."
    )
    print(
        f"- switch + bookkeeping <= 5% of the sweep: {100 * overhead:.2f}% ({switch:.2f} s + {bookkeeping:.2f} s "
        f"of {seconds:.1f} s; {'met' if overhead <= 0.05 else 'not met'})."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a finished quickstart run with its checkpoints (--save-checkpoints)")
    parser.add_argument("--mergekit-bin", help="the bin folder of a virtual environment with mergekit (for (b))")
    parser.add_argument("--candidates", type=int, help="only the first N candidates of the grid (default: all)")
    parser.add_argument(
        "--output-dir", help="scratch folder for (b), kept (default: a temporary folder under RUN_DIR, removed)"
    )
    args = parser.parse_args()
    total = ExMe().evaluations(2)
    if args.candidates is not None and args.candidates < 1:
        parser.error("--candidates must be a positive integer")
    limit = args.candidates if args.candidates is not None and args.candidates < total else None
    if args.mergekit_bin and not os.path.isfile(os.path.join(args.mergekit_bin, "mergekit-yaml")):
        parser.error(f"--mergekit-bin: no mergekit-yaml in {args.mergekit_bin}")
    started = time.perf_counter()

    import lm_eval
    import transformers

    print("# ExMe end to end: in-process against the paper's pipeline\n")
    print(f"- command: `{shlex.join(['python', *sys.argv])}`")
    print(
        f"- machine: {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), "
        f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}; torch "
        f"{torch.__version__}, transformers {transformers.__version__}, lm-eval {lm_eval.__version__}"
    )
    print(f"- load average at the start (1, 5, 15 min): {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.mergekit_bin:
        probe = "import importlib.metadata as m; print(m.version('mergekit'), m.version('torch'))"
        python = os.path.join(args.mergekit_bin, "python")
        versions = subprocess.run([python, "-c", probe], capture_output=True, text=True).stdout.split()
        print(f"- mergekit environment: {args.mergekit_bin} (mergekit {versions[0]}, torch {versions[1]})")

    ranked = rank_run(args.run_dir, METRIC, keep=2)
    folders = [ranked.folders[c.step] for c in ranked.checkpoints]
    print(
        f"- run: {os.path.abspath(args.run_dir)}; ranked by {ranked.metric}: "
        + ", ".join(f"step {c.step} ({c.score:.6g})" for c in ranked.checkpoints)
    )
    print(f"- candidates: {limit or total} of the default grid's {total}; selection tasks, batch size {BATCH_SIZE}")

    base, setup_a, sweep, evaluations, objective = in_process(args.run_dir, folders, ranked.checkpoints, limit)
    gc.collect()  # the live model is gone: (b) gets the machine to itself

    setup_b = merges = notes = None
    if args.mergekit_bin:
        scratch = args.output_dir or tempfile.mkdtemp(prefix="end-to-end-", dir=args.run_dir)
        os.makedirs(scratch, exist_ok=True)
        try:
            setup_b, merges, notes = paper_pipeline(
                args.mergekit_bin, base, folders, evaluations, args.run_dir, scratch, objective
            )
        finally:
            if not args.output_dir:
                shutil.rmtree(scratch, ignore_errors=True)

    table_1(evaluations, merges, setup_a, setup_b)
    table_2(evaluations, sweep)
    if notes:
        print("\nWhat mergekit and lm-eval printed as warnings (line: how many of the runs printed it):\n")
        for line, count in sorted(notes.items()):
            print(f"- {line}: {count}")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nWhole script: {time.perf_counter() - started:.0f} s; load average at the end (1, 5, 15 min): {load}.")


if __name__ == "__main__":
    main()
