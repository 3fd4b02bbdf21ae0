"""A sweep scored by `LMEvalEvaluator` in one process against two processes (`torchrun`, gloo, CPU), side by side.

The sweep is the callback's, driven through its hooks as `Trainer` calls them (as tests/_sharded_run.py does): a
Llama of 4 layers, hidden size 128, built from its config; two checkpoints (the base with seeded perturbations);
`on_train_end` scores the 19 ExMe candidates (and the two checkpoints) on three lm-eval tasks over local files: a
multiple-choice task (31 documents, 3 choices), a generate_until task (15 documents, up to 8 tokens) and a
loglikelihood_rolling task (7 texts). Each configuration runs in a fresh process group:

- one process, with 2 threads (both cores) and with 1 thread;
- two processes of 1 thread each, with full parameters on each rank (as DDP and ZeRO-1/2), and sharded with FSDP2.

It prints the documents each rank scored per evaluation, the sweep's wall time (`on_train_end`, rank 0; the best of
two runs, the configurations interleaved) and its ratio to one process of 1 thread, and checks that every run chose
the same candidate.

    python benchmarks/distributed.py     # about 5 minutes on 2 CPU cores
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

SIZES = {"choice": 31, "generate": 15, "rolling": 7}


def write_tasks(folder: str) -> list[str]:
    """The three tasks, over jsonl files written into `folder`."""
    import yaml
    from conftest import WORDS, make_texts

    rows = {
        "choice": [
            {
                "q": f"the {WORDS[9 + i % 4]} {WORDS[2 + i % 2]} sat on the",
                "choices": ["mat", "log", "dog"],
                "label": i % 3,
            }
            for i in range(SIZES["choice"])
        ],
        "generate": [
            {"q": " ".join(make_texts(1, seed=i)[0].split()[:6]), "answer": "mat"} for i in range(SIZES["generate"])
        ],
        "rolling": [{"text": " ".join(make_texts(1 + i % 4, seed=i))} for i in range(SIZES["rolling"])],
    }

    def metric(name, aggregation, higher):
        return [{"metric": name, "aggregation": aggregation, "higher_is_better": higher}]

    specific = {
        "choice": {"output_type": "multiple_choice", "doc_to_text": "{{q}}", "doc_to_choice": "{{choices}}",
                   "doc_to_target": "label", "metric_list": metric("acc", "mean", True)},
        "generate": {"output_type": "generate_until", "doc_to_text": "{{q}}", "doc_to_target": " {{answer}}",
                     "generation_kwargs": {"until": ["<eos>"], "max_gen_toks": 8, "do_sample": False},
                     "metric_list": metric("exact_match", "mean", True)},
        "rolling": {"output_type": "loglikelihood_rolling", "doc_to_text": "", "doc_to_target": "{{text}}",
                    "metric_list": metric("word_perplexity", "weighted_perplexity", False)},
    }  # fmt: skip
    for kind, config in specific.items():
        data = os.path.join(folder, f"bench_{kind}.jsonl")
        with open(data, "w") as f:
            f.write("".join(json.dumps(row) + "\n" for row in rows[kind]))
        config = {"task": f"bench_{kind}", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": data}},
                  "test_split": "test", **config}  # fmt: skip
        with open(os.path.join(folder, f"bench_{kind}.yaml"), "w") as f:
            yaml.safe_dump(config, f)
    return [f"bench_{kind}" for kind in specific]


def worker(output_dir: str, shard: str) -> None:
    """One sweep in this process (of a `torchrun` group when `WORLD_SIZE` is set); rank 0 writes the result."""
    import torch.distributed as dist
    from conftest import make_llama, make_tokenizer, perturbed
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from exme_callback import ExMeCallback, LMEvalEvaluator

    distributed = "WORLD_SIZE" in os.environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    model = make_llama(seed=0, hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip
    trained = {name: p.detach().clone() for name, p in model.named_parameters()}
    if shard == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    tasks = write_tasks(output_dir) if rank == 0 else None
    if distributed:
        dist.barrier()
    evaluator = LMEvalEvaluator(
        [f"bench_{kind}" for kind in SIZES], make_tokenizer(), include_path=output_dir, batch_size=8
    )
    args = TrainingArguments(output_dir=output_dir, eval_strategy="steps", eval_steps=1, report_to=[],
                             disable_tqdm=True, use_cpu=True)  # fmt: skip
    state, control = TrainerState(global_step=0), TrainerControl()
    state.is_world_process_zero = rank == 0
    callback = ExMeCallback(evaluator=evaluator, evaluate_base=False)
    callback.on_train_begin(args, state, control, model=model)
    for step, seed in ((1, 1), (2, 2)):  # two checkpoints: the base moved along two seeded directions
        with torch.no_grad():
            for name, tensor in perturbed(trained, seed, scale=0.02).items():
                from exme_callback.sharding import local

                param = dict(model.named_parameters())[name]
                full = tensor if not hasattr(param, "to_local") else tensor.chunk(dist.get_world_size())[rank]
                local(param).copy_(full.reshape(local(param).shape))
        state.global_step = step
        callback.on_evaluate(args, state, control, metrics={}, model=model)
    before = evaluator.documents_scored
    start = time.perf_counter()
    callback.on_train_end(args, state, control, model=model)
    seconds = time.perf_counter() - start
    evaluations = len(callback.report.candidates) - 2
    per_rank = [(evaluator.documents_scored - before) / evaluations]
    if distributed:
        per_rank = [None] * dist.get_world_size()
        dist.all_gather_object(per_rank, (evaluator.documents_scored - before) / evaluations)
    if rank == 0:
        final = callback.report.final
        with open(os.path.join(output_dir, "result.json"), "w") as f:
            json.dump({"seconds": seconds, "per_rank": per_rank, "evaluations": evaluations,
                       "final": [final.kind, final.c1, final.c2], "tasks": tasks}, f)  # fmt: skip
    if distributed:
        dist.barrier()
        dist.destroy_process_group()


def launch(processes: int, threads: int, shard: str) -> dict:
    with tempfile.TemporaryDirectory() as output_dir:
        command = [sys.executable, __file__, "--worker", output_dir, shard]
        if processes > 1:
            command[1:1] = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        if result.returncode != 0:
            raise SystemExit(result.stderr[-3000:])
        with open(os.path.join(output_dir, "result.json")) as f:
            return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", nargs=2, metavar=("OUTPUT_DIR", "SHARD"), help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.worker:
        return worker(*options.worker)
    configurations = {
        "one process, 1 thread": (1, 1, "none"),
        "one process, 2 threads": (1, 2, "none"),
        "two processes, full parameters (DDP, ZeRO-1/2)": (2, 1, "none"),
        "two processes, FSDP2": (2, 1, "fsdp2"),
    }
    trials = [{label: launch(*settings) for label, settings in configurations.items()} for _ in range(2)]
    runs = {label: min((trial[label] for trial in trials), key=lambda run: run["seconds"]) for label in configurations}
    reference = runs["one process, 1 thread"]
    print(f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}")
    print(f"{reference['evaluations']} evaluations of {sum(SIZES.values())} documents ({SIZES}); gloo")
    print()
    print("| run | documents per rank per evaluation | sweep wall time | ratio to one process, 1 thread |")
    print("|---|---|---:|---:|")
    for label, run in runs.items():
        shares = " + ".join(f"{n:g}" for n in run["per_rank"])
        print(f"| {label} | {shares} | {run['seconds']:.1f} s | {run['seconds'] / reference['seconds']:.2f}x |")
    print()
    finals = {tuple(run["final"]) for trial in trials for run in trial.values()}
    print(f"the same choice in every run: {len(finals) == 1} ({sorted(finals)})")


if __name__ == "__main__":
    main()
