"""One ExMe run of a tiny Llama through TRL's `SFTTrainer`, scored by an `LMEvalEvaluator` with `search="racing"`, in
one process or over the processes of `torchrun` (DDP, gloo, CPU); launched by tests/test_distributed.py.

Usage: python _lm_eval_ddp_run.py OUTPUT_DIR PER_DEVICE_BATCH
Writes `rank-<r>.json`: for every evaluator call, the number of documents asked for per task and the number this
rank scored; and the evaluator's metrics of the trained model, on all documents and on a subset.
"""

import json
import os
import pathlib
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))
from conftest import make_llama, make_texts, make_tokenizer, write_lm_eval_tasks  # noqa: E402
from datasets import Dataset  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from exme_callback import ExMeCallback, LMEvalEvaluator  # noqa: E402
from exme_callback.strategies import racing  # noqa: E402

racing.RACING_MIN_ITEMS = 1  # rounds of any size on these 11 documents: requests of one document, rank 1 scoring none

output_dir, batch = sys.argv[1], int(sys.argv[2])
rank = int(os.environ.get("RANK", 0))
distributed = {"ddp_backend": "gloo"} if "WORLD_SIZE" in os.environ else {}
tasks = write_lm_eval_tasks(pathlib.Path(output_dir) / f"tasks-{rank}")  # toy_choice (8 documents), toy_generate (4)


class Counted(LMEvalEvaluator):
    """Records, for every call, the documents asked for per task and how many this rank scored."""

    calls: list = []

    def __call__(self, model, items=None):
        before = self.documents_scored
        metrics = super().__call__(model, items)
        everything = {"toy_choice": 7, "toy_generate": 4}  # `limit=7`
        asked = everything if items is None else {t: len(ids) for t, ids in items.items()}
        self.calls.append([asked, self.documents_scored - before])
        return metrics


evaluator = Counted(tasks, include_path=str(pathlib.Path(output_dir) / f"tasks-{rank}"), limit=7, batch_size=2)
tokenizer = make_tokenizer()
args = SFTConfig(
    output_dir=output_dir,
    max_length=32,
    per_device_train_batch_size=batch,
    learning_rate=3e-2,
    max_steps=12,
    eval_strategy="steps",
    eval_steps=4,
    save_strategy="no",
    report_to=[],
    disable_tqdm=True,
    use_cpu=True,
    seed=0,
    **distributed,
)
trainer = SFTTrainer(
    model=make_llama(),
    args=args,
    train_dataset=Dataset.from_dict({"text": make_texts(64, seed=0)}),
    eval_dataset=Dataset.from_dict({"text": make_texts(16, seed=1)}),
    processing_class=tokenizer,
)
trainer.add_callback(ExMeCallback(trainer, evaluator=evaluator, search="racing"))
trainer.train()
subset = {"toy_choice": [0, 3, 4, 6, 5], "toy_generate": [1]}  # 3 + 2 and 1 + 0 documents
direct = {"all": evaluator(trainer.model), "subset": evaluator(trainer.model, items=subset)}
with open(os.path.join(output_dir, f"rank-{rank}.json"), "w") as f:
    json.dump({"calls": evaluator.calls, "direct": direct}, f)
if torch.distributed.is_initialized():  # leave together: a rank exiting early can abort the other's gloo threads
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()
