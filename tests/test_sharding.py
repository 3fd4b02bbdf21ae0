"""Sharded runs: FSDP2 and DeepSpeed ZeRO-3 over two CPU processes (gloo, `torchrun`) end like one unsharded process,
each rank keeping only its shards; a resumed sharded run ends like an uninterrupted one."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_llama
from safetensors.torch import load_file
from torch.testing import assert_close

from exme_callback import sharding
from exme_callback.kinship import dense_gram

SCRIPT = os.path.join(os.path.dirname(__file__), "_sharded_run.py")
DEEPSPEED = importlib.util.find_spec("deepspeed") is not None


def test_one_process_is_its_own_shard():
    model = make_llama()
    gram = dense_gram({"w": torch.zeros(3)}, [{"w": torch.ones(3)}])
    assert (sharding.world(), sharding.rank()) == (1, 0)
    assert not sharding.is_sharded(model)
    assert sharding.total(gram, model) is gram
    assert sharding.agree("step-4") == "step-4"
    weight = model.lm_head.weight
    assert sharding.local(weight).data_ptr() == weight.data_ptr()


def run(output_dir, shard="none", *options, processes=1):
    launcher = [sys.executable]
    if processes > 1:  # `--standalone`: a free port of its own
        launcher += ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [*launcher, SCRIPT, str(output_dir), shard, *options], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]


def outcome(output_dir, processes):
    with open(output_dir / "exme" / "exme_report.json") as f:
        report = json.load(f)
    ranks = [json.loads((output_dir / f"rank-{r}.json").read_text()) for r in range(processes)]
    return report, ranks, load_file(output_dir / "exme" / "model.safetensors")


def assert_same_run(report, expected):
    assert [c["step"] for c in report["checkpoints"]] == [c["step"] for c in expected["checkpoints"]]
    assert [(c["kind"], c["c1"], c["c2"]) for c in report["candidates"]] == [
        (c["kind"], c["c1"], c["c2"]) for c in expected["candidates"]
    ]
    assert_close(
        [c["score"] for c in report["candidates"]], [c["score"] for c in expected["candidates"]], rtol=1e-5, atol=1e-6
    )
    assert (report["final"]["c1"], report["final"]["c2"]) == (expected["final"]["c1"], expected["final"]["c2"])
    for metric in ("pearson", "cosine", "euclidean"):  # the Gram of the whole task vectors, summed over the shards
        assert_close(report["kinship"]["checkpoints"][metric], expected["kinship"]["checkpoints"][metric])


SHARDINGS = ["fsdp2", pytest.param("zero3", marks=pytest.mark.skipif(not DEEPSPEED, reason="needs deepspeed"))]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The unsharded run every sharded run is compared with."""
    output_dir = tmp_path_factory.mktemp("one")
    run(output_dir)
    return outcome(output_dir, 1)


@pytest.mark.slow
@pytest.mark.parametrize("shard", SHARDINGS)
def test_two_processes_match_one_and_keep_half_each(tmp_path, single, shard):
    expected, [unsharded], model = single
    run(tmp_path, shard, processes=2)
    sharded, ranks, gathered = outcome(tmp_path, 2)

    assert_same_run(sharded, expected)
    assert sharded["final"]["kind"] == "expo"  # the sweep chose a candidate off the trained weights
    # The chosen model, gathered from the shards and written by the main process, is the unsharded run's.
    assert gathered.keys() == model.keys()
    for name in model:
        assert_close(gathered[name], model[name], rtol=1e-5, atol=1e-6)
    # Each rank kept only its shard of the base and the kept checkpoints (every tensor splits evenly here), and
    # holds its trained shards again after the sweep.
    assert unsharded["kept_bytes"] == 3 * sum(t.numel() * t.element_size() for t in model.values())  # base, 2 kept
    assert [r["kept_bytes"] for r in ranks] == [unsharded["kept_bytes"] // 2] * 2
    assert all(r["restored"] for r in [unsharded, *ranks])


@pytest.fixture(scope="module")
def single_lm_eval(tmp_path_factory):
    """The unsharded run scored by an `LMEvalEvaluator`, which every sharded one is compared with."""
    output_dir = tmp_path_factory.mktemp("one-lm-eval")
    run(output_dir, "none", "--lm-eval", str(output_dir / "tasks"))
    return outcome(output_dir, 1)


@pytest.mark.slow
@pytest.mark.parametrize("shard", SHARDINGS)
def test_sharded_lm_eval_splits_the_documents_and_matches_one_process(tmp_path, single_lm_eval, shard):
    """Each rank scores its round-robin share of every task's documents (7, 4 and 5: 4 + 3, 2 + 2 and 3 + 2, so
    the ranks run different numbers of requests and of rolling windows, and generate different lengths, yet as
    many forward passes, which are collectives here), and the sweep is one process's."""
    pytest.importorskip("lm_eval")
    expected, [unsharded], model = single_lm_eval
    run(tmp_path, shard, "--lm-eval", str(tmp_path / "tasks"), processes=2)
    sharded, ranks, gathered = outcome(tmp_path, 2)

    calls, rest = divmod(unsharded["documents"], 7 + 4 + 5)
    assert rest == 0 and calls >= 20  # the base, the checkpoints, the candidates
    assert [r["documents"] for r in ranks] == [(4 + 2 + 3) * calls, (3 + 2 + 2) * calls]
    assert_same_run(sharded, expected)
    for c, e in zip(sharded["candidates"], expected["candidates"], strict=True):
        for metric in ("toy_choice/acc", "toy_generate/exact_match"):  # means of 0/1 scores: exactly equal
            assert c["metrics"][metric] == e["metrics"][metric]
        perplexity = "toy_rolling/word_perplexity"
        assert_close(c["metrics"][perplexity], e["metrics"][perplexity], rtol=1e-5, atol=0)
    for name in model:
        assert_close(gathered[name], model[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("shard", SHARDINGS)
def test_resumed_sharded_run_ends_like_an_uninterrupted_one(tmp_path, single, shard):
    expected, _, model = single
    run(tmp_path, shard, "--stop", "4", processes=2)
    state = tmp_path / "checkpoint-4" / "exme"
    saved = json.loads((state / "exme_state.json").read_text())
    assert saved["shards"] == 2 and saved["snapshots"] == ["base", "step-4", "step-2"]
    for r in range(2):  # each rank wrote its own shards of the kept snapshots: half of each tensor
        shard_file = load_file(state / f"rank-{r:05d}" / "base-00000.safetensors")
        assert shard_file["lm_head.weight"].numel() == model["lm_head.weight"].numel() // 2
    run(tmp_path, shard, "--resume", "4", processes=2)

    resumed, ranks, resumed_model = outcome(tmp_path, 2)
    assert_same_run(resumed, expected)
    for name in model:
        assert_close(resumed_model[name], model[name], rtol=1e-5, atol=1e-6)
    assert all(r["restored"] for r in ranks)


@pytest.mark.slow
def test_resuming_with_another_number_of_shards_is_refused(tmp_path):
    run(tmp_path, "fsdp2", "--stop", "4", processes=2)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [sys.executable, SCRIPT, str(tmp_path), "none", "--resume", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "was saved sharded over 2 ranks" in result.stderr and "same number of processes" in result.stderr


@pytest.mark.slow
@pytest.mark.skipif(not DEEPSPEED, reason="needs deepspeed")
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_trainer_with_deepspeed_matches_one_process(tmp_path, zero):
    """Through transformers' `Trainer` (which runs DeepSpeed on the CPU; FSDP it enables only on accelerators):
    ZeRO-3 shards the kept tensors, ZeRO-2 keeps full parameters on every rank, like DDP."""
    script = os.path.join(os.path.dirname(__file__), "_deepspeed_trainer_run.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    launchers = {
        "one": [sys.executable, script, str(tmp_path / "one"), "none"],
        zero: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
        + [script, str(tmp_path / zero), zero],
    }
    for command in launchers.values():
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    single, sharded = (json.loads((tmp_path / name / "exme" / "exme_report.json").read_text()) for name in launchers)
    model, gathered = (load_file(tmp_path / name / "exme" / "model.safetensors") for name in launchers)
    assert_same_run(sharded, single)
    for name in model:
        assert_close(gathered[name], model[name], rtol=1e-5, atol=1e-6)
    assert (tmp_path / zero / "writes.txt").read_text() == "0\n"  # the main process alone wrote the result
    assert not (tmp_path / zero / "exme-snapshots").exists()
