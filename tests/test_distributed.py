"""DDP on the CPU (gloo): two processes end with the same ExMe model as one process, and only rank 0 writes; an
`LMEvalEvaluator` splits its documents across them."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import RegressionModel
from torch.testing import assert_close

pytestmark = pytest.mark.slow

SCRIPT = os.path.join(os.path.dirname(__file__), "_ddp_run.py")


def launch(command, output_dir):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(output_dir / "exme" / "exme_report.json") as f:
        return json.load(f)


def test_ddp_two_processes_match_one(tmp_path):
    single = launch([sys.executable, SCRIPT, str(tmp_path / "one"), "8"], tmp_path / "one")
    ddp = launch(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",  # a free port of its own
            "--nproc_per_node",
            "2",
            SCRIPT,
            str(tmp_path / "ddp"),
            "4",
        ],
        tmp_path / "ddp",
    )
    # Rank 0 alone wrote the result; every rank holds the same restored weights.
    assert (tmp_path / "ddp" / "writes.txt").read_text() == "0\n"
    rank0, rank1 = (torch.load(tmp_path / "ddp" / f"weights-rank{r}.pt") for r in (0, 1))
    assert torch.equal(rank0, rank1)
    assert_close(rank0, torch.load(tmp_path / "one" / "weights-rank0.pt"), rtol=1e-5, atol=1e-6)

    # The same sweep and the same final model as one process (up to the reduction order of the gradients).
    assert [c["step"] for c in ddp["checkpoints"]] == [c["step"] for c in single["checkpoints"]]
    assert [(c["kind"], c["c1"], c["c2"]) for c in ddp["candidates"]] == [
        (c["kind"], c["c1"], c["c2"]) for c in single["candidates"]
    ]
    assert_close(
        [c["score"] for c in ddp["candidates"]], [c["score"] for c in single["candidates"]], rtol=1e-4, atol=1e-6
    )
    assert (ddp["final"]["c1"], ddp["final"]["c2"]) == (single["final"]["c1"], single["final"]["c2"])
    a = RegressionModel.from_pretrained(tmp_path / "ddp" / "exme")
    b = RegressionModel.from_pretrained(tmp_path / "one" / "exme")
    assert_close(torch.stack([a.a, a.b]).detach(), torch.stack([b.a, b.b]).detach(), rtol=1e-5, atol=1e-6)


def test_ddp_lm_eval_splits_the_documents_and_matches_one_process(tmp_path):
    """`SFTTrainer` under DDP with an `LMEvalEvaluator` and racing: every call, each rank scores its round-robin share
    of the documents asked for (racing's first rounds ask for one document of each task: rank 1 scores none), and
    the sweep and the metrics are one process's."""
    pytest.importorskip("lm_eval")
    pytest.importorskip("trl")
    script = os.path.join(os.path.dirname(__file__), "_lm_eval_ddp_run.py")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    single = launch([sys.executable, script, str(tmp_path / "one"), "8"], tmp_path / "one")
    ddp = launch([*torchrun, script, str(tmp_path / "ddp"), "4"], tmp_path / "ddp")
    [one] = [json.loads((tmp_path / "one" / "rank-0.json").read_text())]
    ranks = [json.loads((tmp_path / "ddp" / f"rank-{r}.json").read_text()) for r in (0, 1)]

    # The same calls; each rank scored ceil(n / 2) or floor(n / 2) documents of every task's n asked for.
    assert [asked for asked, _ in one["calls"]] == [asked for asked, _ in ranks[0]["calls"]]
    assert len(one["calls"]) > 20 and {"toy_choice": 1, "toy_generate": 1} in [a for a, _ in one["calls"]]
    for (asked, scored), *shares in zip(one["calls"], ranks[0]["calls"], ranks[1]["calls"], strict=True):
        assert scored == sum(asked.values())
        halves = [sum((n + 1) // 2 for n in asked.values()), sum(n // 2 for n in asked.values())]
        assert [n for _, n in shares] == halves
    # Every rank returns the gathered metrics, one process's, document by document.
    assert ranks[0]["direct"] == ranks[1]["direct"] == one["direct"]
    assert len(one["direct"]["all"]["toy_choice/acc"]) == 7 and len(one["direct"]["subset"]["toy_choice/acc"]) == 5
    assert 0 < sum(one["direct"]["all"]["toy_choice/acc"]) < 7
    assert [(c["kind"], c["c1"], c["c2"], c["error"]) for c in ddp["candidates"]] == [
        (c["kind"], c["c1"], c["c2"], c["error"]) for c in single["candidates"]
    ]
    assert [c["score"] for c in ddp["candidates"]] == [c["score"] for c in single["candidates"]]
    assert (ddp["final"]["c1"], ddp["final"]["c2"]) == (single["final"]["c1"], single["final"]["c2"])
