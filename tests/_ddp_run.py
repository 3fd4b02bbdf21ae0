"""One ExMe run of the regression model, launched by tests/test_distributed.py with or without torchrun.

Usage: python _ddp_run.py OUTPUT_DIR PER_DEVICE_BATCH
Each process writes `weights-rank<r>.pt` (its model after training); report writes are logged to `writes.txt`.
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import (  # noqa: E402
    RegressionConfig,
    RegressionDataset,
    RegressionModel,
    log_report_writes,
    regression_args,
)
from transformers import Trainer  # noqa: E402

from exme_callback import ExMeCallback  # noqa: E402

output_dir, batch = sys.argv[1], int(sys.argv[2])
rank = int(os.environ.get("RANK", 0))

log_report_writes(output_dir, rank)

model = RegressionModel(RegressionConfig())
distributed = {"ddp_backend": "gloo"} if "WORLD_SIZE" in os.environ else {}
args = regression_args(output_dir, per_device_train_batch_size=batch, per_device_eval_batch_size=16, **distributed)
trainer = Trainer(
    model=model, args=args, train_dataset=RegressionDataset(64, 0), eval_dataset=RegressionDataset(32, 1)
)
trainer.add_callback(ExMeCallback(trainer))
trainer.train()
torch.save(torch.stack([model.a.detach(), model.b.detach()]), os.path.join(output_dir, f"weights-rank{rank}.pt"))
if torch.distributed.is_initialized():  # leave together: a rank exiting early can abort the other's gloo threads
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
