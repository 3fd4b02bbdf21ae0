"""One ExMe run of a tiny Llama, in one process or sharded over the processes of `torchrun` (gloo, CPU) with FSDP2
(`fully_shard`) or DeepSpeed ZeRO-3, launched by tests/test_sharding.py.

transformers' `Trainer` enables FSDP only on accelerators, so this drives the callback's hooks around a plain training
loop, as `Trainer` calls them: `on_train_begin`, `on_evaluate` every 2 steps, `on_save` at `--stop`, `on_train_end`.
Every process sees the same global batch of 8 sequences; a sharded rank trains on its half of it.

Usage: python _sharded_run.py OUTPUT_DIR {none,fsdp2,zero3} [--stop STEP | --resume STEP] [--lm-eval TASKS_DIR]
Writes `rank-<r>.json`: the bytes of the kept tensors before the sweep, whether the trained weights came back, and
the documents this rank scored. With `--lm-eval` the candidates are scored by an `LMEvalEvaluator` of the three toy
tasks written into TASKS_DIR (7, 4 and 5 documents: the two ranks get different numbers), else by a loss.
"""

import json
import os
import pathlib
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_sequence_llama, make_tokenizer, sequences, write_lm_eval_tasks  # noqa: E402
from transformers import TrainerControl, TrainerState, TrainingArguments

from exme_callback import ExMeCallback, LMEvalEvaluator
from exme_callback.sharding import gathered_state_dict, local, reshard

STEPS = 8
output_dir, shard, *pairs = sys.argv[1:]
options = dict(zip(pairs[::2], pairs[1::2], strict=True))
stop = int(options["--stop"]) if "--stop" in options else None
resume = int(options.get("--resume", 0))

sharded = shard != "none"
if shard == "zero3":
    import importlib

    import deepspeed

    # DeepSpeed compiles a shared-memory C++ extension when it starts; gloo does not need it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    deepspeed.init_distributed(dist_backend="gloo")
elif sharded:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)


model = make_sequence_llama()
checkpoint = os.path.join(output_dir, f"checkpoint-{resume}")
if resume:  # the trained weights of the checkpoint, as `Trainer` would load them
    model.load_state_dict(torch.load(os.path.join(checkpoint, "model.pt")))
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # stateless: a resumed run continues exactly
engine = None
if shard == "fsdp2":
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
elif shard == "zero3":
    config = {
        "train_batch_size": 8,
        "train_micro_batch_size_per_gpu": 8 // world,
        "zero_optimization": {"stage": 3},
        "gradient_clipping": 0.0,  # DeepSpeed clips at 1.0 by default; the other runs do not clip
        "zero_allow_untested_optimizer": True,
    }
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
evaluation = sequences(10_000, 16)


def evaluate(model):
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=evaluation, labels=evaluation).loss
    model.train()
    return {"eval_loss": loss.item()}


args = TrainingArguments(
    output_dir=output_dir,
    eval_strategy="steps",
    eval_steps=2,
    report_to=[],
    disable_tqdm=True,
    use_cpu=True,
    resume_from_checkpoint=checkpoint if resume else None,
)
state, control = TrainerState(global_step=resume), TrainerControl()
state.is_world_process_zero = rank == 0
if "--lm-eval" in options:
    folder = options["--lm-eval"]
    if rank == 0:
        write_lm_eval_tasks(pathlib.Path(folder), kinds=("choice", "generate", "rolling"))
    if sharded:
        dist.barrier()
    tasks = ["toy_choice", "toy_generate", "toy_rolling"]
    evaluate = LMEvalEvaluator(tasks, make_tokenizer(), include_path=folder, limit=7, batch_size=2)
callback = ExMeCallback(evaluator=evaluate)
callback.on_train_begin(args, state, control, model=model)
model.train()
for step in range(resume + 1, STEPS + 1):
    rows = sequences(step, 8)[rank::world]
    if engine is None:
        model(input_ids=rows, labels=rows).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    else:
        engine.backward(engine(input_ids=rows, labels=rows).loss)
        engine.step()
    state.global_step = step
    if step % args.eval_steps == 0:
        callback.on_evaluate(args, state, control, metrics={}, model=model)
    if step == stop:
        full = gathered_state_dict(model) if sharded else model.state_dict()
        if rank == 0:
            os.makedirs(os.path.join(output_dir, f"checkpoint-{step}"))
            torch.save(full, os.path.join(output_dir, f"checkpoint-{step}", "model.pt"))
        if sharded:
            dist.barrier()
        callback.on_save(args, state, control, model=model)
        break
else:
    reshard(model)  # the shards, as the callback reads them
    trained = {name: local(p).clone() for name, p in model.named_parameters()}
    kept = callback._store.nbytes()
    callback.on_train_end(args, state, control, model=model)
    reshard(model)
    restored = all(torch.equal(local(p), trained[name]) for name, p in model.named_parameters())
    with open(os.path.join(output_dir, f"rank-{rank}.json"), "w") as f:
        documents = getattr(evaluate, "documents_scored", None)
        json.dump({"kept_bytes": kept, "restored": restored, "documents": documents}, f)
if sharded:  # leave together: a rank exiting early can abort the other's gloo threads
    dist.barrier()
    dist.destroy_process_group()
