"""The `Scorer` in a distributed run: a plain evaluator that takes `items` is split across the ranks, a rank-aware one
and one without `items` are not; launched by tests/test_scoring.py under `torchrun` (gloo, CPU) or alone.

Usage: python _scoring_run.py OUTPUT_DIR
Writes `rank-<r>.json`: the items each evaluator was asked for on this rank, and what the `Scorer` returned.
"""

import json
import os
import sys

import torch
import torch.distributed as dist

from exme_callback.scoring import FunctionEvaluator, Objective, Scorer

output_dir = sys.argv[1]
if "WORLD_SIZE" in os.environ:
    dist.init_process_group("gloo")
rank = dist.get_rank() if dist.is_initialized() else 0
ITEMS = {"a": [2, 3, 5, 7, 11, 13, 17], "b": [4]}  # 7 items (4 + 3 over two ranks) and 1 (1 + 0)
asked = {"plain": [], "rank_aware": [], "without_items": []}


def plain(model, items=None):
    asked["plain"].append(items)
    return {"a/acc": [i / 10 for i in items["a"]], "b": [float(-i) for i in items["b"]], "count": len(items["a"])}


def rank_aware(model, items=None):
    asked["rank_aware"].append(items)
    return {"a/acc": [i / 10 for i in items["a"]], "b": [float(-i) for i in items["b"]]}


def without_items(model):
    asked["without_items"].append(None)
    return {"a/acc": 0.5, "b": -1.0}


objective, model = Objective({"a/acc": True, "b": True}), torch.nn.Linear(1, 1)
returned = {
    "plain": Scorer(plain, objective)(model, items=ITEMS),
    "rank_aware": Scorer(FunctionEvaluator(rank_aware, rank_aware=True), objective)(model, items=ITEMS),
    "without_items": Scorer(without_items, objective)(model),
}
with open(os.path.join(output_dir, f"rank-{rank}.json"), "w") as f:
    json.dump({"asked": asked, "returned": returned}, f)
if dist.is_initialized():  # leave together: a rank exiting early can abort the other's gloo threads
    dist.barrier()
    dist.destroy_process_group()
