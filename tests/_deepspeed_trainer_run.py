"""One ExMe run of a tiny Llama through transformers' `Trainer`: with DeepSpeed ZeRO-2 or ZeRO-3 over the processes of
`torchrun` (gloo, CPU), or in one process without it; launched by tests/test_sharding.py.

Usage: python _deepspeed_trainer_run.py OUTPUT_DIR {none,zero2,zero3}
Report writes are logged to `writes.txt`.
"""

import importlib
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import log_report_writes, make_sequence_llama, sequences  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from exme_callback import ExMeCallback  # noqa: E402

output_dir, shard = sys.argv[1], sys.argv[2]
world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
settings = {}
if shard in ("zero2", "zero3"):
    # DeepSpeed compiles a shared-memory C++ extension when it starts; gloo does not need it.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    auto = dict.fromkeys(["train_batch_size", "train_micro_batch_size_per_gpu", "gradient_clipping"], "auto")
    zero = {"zero_optimization": {"stage": int(shard[-1])}, "zero_allow_untested_optimizer": True}
    settings = {"deepspeed": {**auto, **zero}}

log_report_writes(output_dir, rank)

args = TrainingArguments(
    output_dir=output_dir,
    per_device_train_batch_size=8 // world,
    per_device_eval_batch_size=8,
    max_steps=8,
    optim="sgd",  # plain SGD: Adam would magnify the rounding of the ranks' gradient reduction
    learning_rate=1.0,
    eval_strategy="steps",
    eval_steps=2,
    save_strategy="no",
    report_to=[],
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
    **settings,
)
train, evaluation = ([{"input_ids": x, "labels": x} for x in sequences(seed, n)] for seed, n in ((0, 64), (1, 16)))
trainer = Trainer(model=make_sequence_llama(), args=args, train_dataset=train, eval_dataset=evaluation)
trainer.add_callback(ExMeCallback(trainer))
trainer.train()
if torch.distributed.is_initialized():  # leave together: a rank exiting early can abort the other's gloo threads
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
