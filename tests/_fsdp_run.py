"""One ExMe run of a tiny Llama, in one process or sharded with FSDP2 (`fully_shard`) over the processes of
`torchrun` (gloo, CPU), launched by tests/test_sharding.py.

transformers' `Trainer` enables FSDP only on accelerators, so this drives the callback's hooks around a plain training
loop, as `Trainer` calls them: `on_train_begin`, `on_evaluate` every 2 steps, `on_save` at `--stop`, `on_train_end`.
Every process sees the same global batch of 8 sequences; a sharded rank trains on its half of it.

Usage: python _fsdp_run.py OUTPUT_DIR [--stop STEP | --resume STEP]
Writes `rank-<r>.json`: the bytes of the kept tensors before the sweep, and whether the trained weights came back.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM, TrainerControl, TrainerState, TrainingArguments

from exme_callback import ExMeCallback
from exme_callback.sharding import gathered_state_dict, reshard

STEPS, VOCAB = 8, 32
output_dir, option, step_arg = sys.argv[1], *(sys.argv[2:4] + [None, None])[:2]
stop = int(step_arg) if option == "--stop" else None
resume = int(step_arg) if option == "--resume" else 0

sharded = "WORLD_SIZE" in os.environ
if sharded:
    dist.init_process_group("gloo")
rank, world = (dist.get_rank(), dist.get_world_size()) if sharded else (0, 1)


def batch(seed: int, rows: int) -> torch.Tensor:
    """Sequences that follow `x -> 3x + 1 (mod VOCAB)` from a random start: learnable in a few steps."""
    start = torch.randint(0, VOCAB, (rows, 1), generator=torch.Generator().manual_seed(seed))
    return (start * 3 ** torch.arange(12) + (3 ** torch.arange(12) - 1) // 2) % VOCAB


torch.manual_seed(0)
config = LlamaConfig(
    vocab_size=VOCAB,
    hidden_size=16,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=2,
    max_position_embeddings=32,
    tie_word_embeddings=False,
)
model = LlamaForCausalLM(config)
checkpoint = os.path.join(output_dir, f"checkpoint-{resume}")
if resume:  # the trained weights of the checkpoint, as `Trainer` would load them
    model.load_state_dict(torch.load(os.path.join(checkpoint, "model.pt")))
if sharded:
    from torch.distributed.fsdp import fully_shard

    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # stateless: a resumed run continues exactly
evaluation = batch(10_000, 16)


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
callback = ExMeCallback(evaluator=evaluate)
callback.on_train_begin(args, state, control, model=model)
model.train()
for step in range(resume + 1, STEPS + 1):
    rows = batch(step, 8)[rank::world]
    model(input_ids=rows, labels=rows).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
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
    trained = {name: p.to_local().clone() if sharded else p.detach().clone() for name, p in model.named_parameters()}
    kept = callback._store.nbytes()
    callback.on_train_end(args, state, control, model=model)
    reshard(model)
    restored = all(
        torch.equal(p.to_local() if sharded else p.detach(), trained[name]) for name, p in model.named_parameters()
    )
    with open(os.path.join(output_dir, f"rank-{rank}.json"), "w") as f:
        json.dump({"kept_bytes": kept, "restored": restored}, f)
if sharded:  # leave together: a rank exiting early can abort the other's gloo threads
    dist.barrier()
    dist.destroy_process_group()
