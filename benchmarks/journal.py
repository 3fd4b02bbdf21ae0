"""What the sweep's journal costs a candidate, against what the candidate's evaluation costs.

The evaluation is the quickstart's (SmolLM2-135M-Instruct's GGUF, its four generated skills, 32 selection documents
each, `LMEvalEvaluator` with batch size 32), timed on the model as loaded. The journal's cost is what the sweep adds
per evaluation: the key, the lookup, and the line appended and synced to disk (`Journal.add`), measured on that
evaluation's real metrics and per-document scores, and on the same payload repeated to 256 and 2,048 documents per
task (larger selection sets). Reading a whole journal back (a resumed sweep's one-off cost) is timed too.

    python benchmarks/journal.py                  # about 2 minutes on 2 CPU cores
    python benchmarks/journal.py --smoke          # a tiny model: checks the code path
"""

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from instruction_data import write_tasks  # noqa: E402
from quickstart import load_model, load_splits  # noqa: E402

from exme_callback import LMEvalEvaluator  # noqa: E402
from exme_callback.journal import Evaluation, Journal  # noqa: E402
from exme_callback.objective import Objective  # noqa: E402
from exme_callback.scoring import Scorer  # noqa: E402

ROWS = 19  # a default sweep's candidates: one journal line each


def median_seconds(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def journal_costs(evaluation: Evaluation, folder: str, repeats: int) -> tuple[float, float, int]:
    """The median seconds of one candidate's journal work (key, lookup, synced append), of reading back a journal of
    `ROWS` such lines, and the bytes of one line."""
    path = os.path.join(folder, f"exme-journal-{len(next(iter(evaluation.items.values())))}.jsonl")
    journal = Journal(path, "benchmark")
    counter = iter(range(10**9))

    def one_candidate():
        key = journal.key("selection", (1.0 + next(counter) * 1e-6, 0.5))
        if journal.get(key) is None:
            journal.add(key, evaluation)

    per_candidate = median_seconds(one_candidate, repeats)
    with open(path) as f:  # keep the last ROWS lines: the size of a default sweep's journal
        lines = f.read().splitlines()
    with open(path, "w") as f:
        f.write("\n".join([lines[0], *lines[-ROWS:]]) + "\n")
    read_back = median_seconds(lambda: Journal(path, "benchmark"), 5)
    return per_candidate, read_back, len(lines[-1].encode())


def repeated(evaluation: Evaluation, times: int) -> Evaluation:
    return Evaluation(evaluation.score, evaluation.metrics, {k: v * times for k, v in evaluation.items.items()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model: checks the code path")
    parser.add_argument("--repeats", type=int, default=50, help="journal operations timed per payload")
    args = parser.parse_args()
    quickstart = argparse.Namespace(smoke=args.smoke, model=None, dataset=None, steps=16 if args.smoke else 40)
    splits = load_splits(quickstart)
    model, tokenizer = load_model(quickstart, splits)
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    with tempfile.TemporaryDirectory() as folder:
        tasks = write_tasks(f"{folder}/tasks", splits["selection"])
        evaluator = LMEvalEvaluator(tasks, tokenizer, include_path=f"{folder}/tasks", batch_size=32)
        scorer = Scorer(evaluator, Objective.for_evaluator(evaluator))
        scorer(model)  # the first call builds lm-eval's wrapper of the model
        evaluation = Evaluation(*scorer(model))
        seconds = median_seconds(lambda: scorer(model), 1 if args.smoke else 3)
        documents = len(next(iter(evaluation.items.values())))
        rows = []
        for times in (1, 256 // documents, 2048 // documents):
            payload = repeated(evaluation, times)
            per_candidate, read_back, size = journal_costs(payload, folder, args.repeats)
            rows.append((documents * times, size, per_candidate, read_back))

    print(
        f"\n{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}; python benchmarks/journal.py"
    )
    print(f"one evaluation ({len(tasks)} tasks x {documents} documents, measured): {seconds:.2f} s\n")
    print(
        "| documents per task | line | journal per candidate | share of the evaluation above | reading back 19 lines |"
    )
    print("|---:|---:|---:|---:|---:|")
    for n, size, per_candidate, read_back in rows:
        share = per_candidate / seconds
        print(
            f"| {n} | {size / 1024:.1f} KiB | {per_candidate * 1e3:.2f} ms | {share:.3%} | {read_back * 1e3:.1f} ms |"
        )
    print(f"\nThe shares compare with the {documents}-document evaluation: an upper bound for larger sets.")


if __name__ == "__main__":
    main()
