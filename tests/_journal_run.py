"""One ExMe run of the regression model under `Trainer`, killed with SIGKILL during the sweep when asked, launched by
tests/test_journal.py.

The evaluator is the mean squared error on a fixed set; it counts the sweep's evaluations (those after training
ends) and, with `--kill-at N`, kills its own process with SIGKILL when the sweep's N-th evaluation starts.

Usage: python _journal_run.py OUTPUT_DIR [--kill-at N] [--resume]
Writes `OUTPUT_DIR/evaluations.json`: the number of evaluations the sweep ran.
"""

import json
import logging
import os
import signal
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import RegressionDataset, RegressionModel, regression_args  # noqa: E402
from transformers import Trainer, TrainerCallback

from exme_callback import ExMeCallback

output_dir = sys.argv[1]
kill_at = int(sys.argv[sys.argv.index("--kill-at") + 1]) if "--kill-at" in sys.argv else None
sweep = {"started": False, "evaluations": 0}
data = RegressionDataset(32, 1)


class SweepStarts(TrainerCallback):
    """Added before ExMe's callback: its `on_train_end` runs first."""

    def on_train_end(self, args, state, control, **kwargs):
        sweep["started"] = True


def mse(model):
    if sweep["started"]:
        sweep["evaluations"] += 1
        if sweep["evaluations"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
    with torch.no_grad():
        return {"mse": float(torch.nn.functional.mse_loss(model.a * data.x + model.b, data.y))}


logging.basicConfig(format="%(message)s")
logging.getLogger("exme_callback.journal").setLevel(logging.INFO)  # the resumed sweep's line
torch.manual_seed(0)
model = RegressionModel(RegressionModel.config_class())
args = regression_args(output_dir, save_strategy="steps", save_steps=8)
trainer = Trainer(
    model=model, args=args, train_dataset=RegressionDataset(64, 0), eval_dataset=data, callbacks=[SweepStarts()]
)
trainer.add_callback(ExMeCallback(trainer, evaluator=mse, metrics={"mse": "min"}))
trainer.train(resume_from_checkpoint=True if "--resume" in sys.argv else None)
with open(os.path.join(output_dir, "evaluations.json"), "w") as f:
    json.dump(sweep["evaluations"], f)
