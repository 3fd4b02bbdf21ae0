"""A finished run on disk, written by hand: its ranking metric, ranked checkpoints, their kind and base, the plane."""

import json
import math
import os

import pytest
import torch
from conftest import make_llama, make_tokenizer
from safetensors.torch import load_file, save_file
from torch.testing import assert_close

from exme_callback.candidates import Checkpoint
from exme_callback.runs import base_of, checkpoint_kind, load_plane, rank_run, resolve_metric
from exme_callback.snapshots import trainable_tensors
from exme_callback.span import span_point


def write_state(folder, log_history, global_step=None, **fields):
    os.makedirs(folder, exist_ok=True)
    steps = [e["step"] for e in log_history if "step" in e]
    state = {"global_step": max(steps, default=0) if global_step is None else global_step, "log_history": log_history}
    state.update(fields)
    with open(os.path.join(folder, "trainer_state.json"), "w") as f:
        json.dump(state, f)  # NaN and Infinity as the trainer writes them


def evaluation(step, **metrics):
    return {"step": step, "epoch": step / 10, **metrics, "eval_runtime": 0.1, "eval_samples_per_second": 100.0}


# ---- resolve_metric -----------------------------------------------------------------------------------------------


def test_resolve_metric_defaults_to_the_recorded_best_metric_else_eval_loss():
    history = [
        {"step": 5, "loss": 2.0, "grad_norm": 1.0, "learning_rate": 1e-3},
        evaluation(10, eval_loss=1.2, eval_accuracy=0.6),
        evaluation(20, eval_loss=1.1, eval_accuracy=0.8),
    ]
    recorded = {"log_history": history, "best_metric": 0.8, "best_global_step": 20}
    assert resolve_metric(recorded) == ("eval_accuracy", True)
    assert resolve_metric({"log_history": history}) == ("eval_loss", False)
    # A best metric that no evaluation at its step has is not trusted: the default applies.
    assert resolve_metric({**recorded, "best_global_step": 10}) == ("eval_loss", False)
    # Two metrics with the best value at that step: ambiguous, the default applies.
    tied = [*history[:2], evaluation(20, eval_loss=0.8, eval_accuracy=0.8)]
    assert resolve_metric({**recorded, "log_history": tied}) == ("eval_loss", False)
    # Given names are looked up as given, then with the `eval_` prefix; the direction follows the name.
    assert resolve_metric({"log_history": history}, "accuracy") == ("eval_accuracy", True)
    assert resolve_metric({"log_history": history}, "eval_loss") == ("eval_loss", False)


def test_resolve_metric_loss_finds_eval_loss():
    history = [evaluation(10, eval_loss=1.2), evaluation(20, eval_loss=1.1)]
    assert resolve_metric({"log_history": history}, "loss") == ("eval_loss", False)


def test_resolve_metric_loss_is_the_evaluation_loss_beside_training_logs(tmp_path):
    history = [
        {"step": 10, "loss": 0.1},
        evaluation(10, eval_loss=1.2),
        {"step": 20, "loss": 0.9},
        evaluation(20, eval_loss=1.1),
    ]
    assert resolve_metric({"log_history": history}, "loss") == ("eval_loss", False)
    write_state(tmp_path, history)
    for step in (10, 20):
        os.makedirs(tmp_path / f"checkpoint-{step}")
    assert [(c.step, c.score) for c in rank_run(str(tmp_path), "loss").checkpoints] == [(20, 1.1), (10, 1.2)]


def test_resolve_metric_missing_metric_names_it_and_lists_the_evaluated_ones():
    history = [{"step": 5, "loss": 2.0}, evaluation(10, eval_loss=1.2, eval_accuracy=0.6)]
    with pytest.raises(KeyError) as error:
        resolve_metric({"log_history": history}, "f1")
    message = error.value.args[0]
    assert "'f1' is not in the run's log history" in message
    assert "['eval_accuracy', 'eval_loss']" in message  # no timings, no training logs


# ---- rank_run -----------------------------------------------------------------------------------------------------


def ranked_run(root, on_disk, history=None, **fields):
    history = history or [
        evaluation(0, eval_loss=9.0),  # eval_on_start: the base, never a checkpoint
        evaluation(10, eval_loss=1.0),
        evaluation(20, eval_loss=0.5),
        evaluation(30, eval_loss=0.5),  # ties with step 20, evaluated later
        evaluation(40, eval_loss=0.7),
        evaluation(50, eval_loss=math.nan),
        evaluation(60, eval_loss=math.inf),
        evaluation(40, eval_loss=0.3),  # step 40 evaluated again: this evaluation counts
    ]
    write_state(root, history, **fields)
    for step in on_disk:
        os.makedirs(root / f"checkpoint-{step}")
    return root


def test_rank_run_keeps_the_best_on_disk_best_first(tmp_path):
    run = ranked_run(tmp_path, [0, 10, 20, 30, 40, 50, 60])
    ranked = rank_run(str(run))
    assert (ranked.metric, ranked.greater_is_better) == ("eval_loss", False)
    assert ranked.checkpoints == [Checkpoint(40, 0.3), Checkpoint(20, 0.5)]
    assert ranked.folders == {40: str(run / "checkpoint-40"), 20: str(run / "checkpoint-20")}
    assert ranked.missing == []
    three = rank_run(str(run), keep=3)
    assert [(c.step, c.score) for c in three.checkpoints] == [(40, 0.3), (20, 0.5), (30, 0.5)]
    everything = rank_run(str(run), keep=10)  # non-finite scores and the step-0 evaluation are dropped
    assert [c.step for c in everything.checkpoints] == [40, 20, 30, 10]


def test_rank_run_greater_is_better_and_missing_folders(tmp_path):
    history = [
        evaluation(10, eval_loss=1.0, eval_accuracy=0.6),
        evaluation(20, eval_loss=0.95, eval_accuracy=0.9),
        evaluation(30, eval_loss=0.8, eval_accuracy=0.7),
        evaluation(40, eval_loss=0.7, eval_accuracy=0.8),
    ]
    run = ranked_run(tmp_path, [10, 30], history, best_metric=0.9, best_global_step=20)
    ranked = rank_run(str(run))
    assert (ranked.metric, ranked.greater_is_better) == ("eval_accuracy", True)
    # By accuracy: 20, 40, 30, 10; 20 and 40 are gone, so 30 and 10 are kept and 20, 40 are missing.
    assert [(c.step, c.score) for c in ranked.checkpoints] == [(30, 0.7), (10, 0.6)]
    assert ranked.missing == [20, 40]
    by_loss = rank_run(str(run), "eval_loss")
    assert [c.step for c in by_loss.checkpoints] == [30, 10] and by_loss.missing == [40, 20]
    one = rank_run(str(run), "eval_loss", keep=1)
    assert [c.step for c in one.checkpoints] == [30] and one.missing == [40]


def test_rank_run_without_checkpoints_on_disk_is_refused(tmp_path):
    run = ranked_run(tmp_path, [25])  # a folder, but of a step never evaluated
    with pytest.raises(FileNotFoundError, match=r"none of the 4 checkpoints evaluated by eval_loss is on disk"):
        rank_run(str(run))


def test_rank_run_reads_the_most_complete_trainer_state(tmp_path):
    full = [evaluation(10, eval_loss=1.0), evaluation(20, eval_loss=0.6), evaluation(30, eval_loss=0.8)]
    write_state(tmp_path, full[:1])  # the run folder's: written early
    write_state(tmp_path / "checkpoint-20", full[:2])
    write_state(tmp_path / "checkpoint-30", full)
    os.makedirs(tmp_path / "checkpoint-10")
    ranked = rank_run(str(tmp_path))
    assert [(c.step, c.score) for c in ranked.checkpoints] == [(20, 0.6), (30, 0.8)]


def test_rank_run_corrupt_trainer_state_names_the_file(tmp_path):
    run = ranked_run(tmp_path, [10, 20])
    corrupt = run / "checkpoint-20" / "trainer_state.json"
    corrupt.write_text('{"global_step": 20, "log_his')
    with pytest.raises(ValueError, match=f"{corrupt} is not valid JSON"):
        rank_run(str(run))
    with pytest.raises(FileNotFoundError, match="has no trainer_state.json"):
        rank_run(str(tmp_path / "checkpoint-10"))


# ---- checkpoint_kind and base_of ----------------------------------------------------------------------------------


def write_json(path, data):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f)


def test_checkpoint_kind(tmp_path):
    full = tmp_path / "full"
    make_llama().save_pretrained(full)
    assert (full / "model.safetensors").is_file() and checkpoint_kind(str(full)) == "full"

    sharded = tmp_path / "sharded"
    sharded.mkdir()
    save_file({"a": torch.zeros(2)}, sharded / "model-00001-of-00002.safetensors")
    save_file({"b": torch.ones(2)}, sharded / "model-00002-of-00002.safetensors")
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    write_json(sharded / "model.safetensors.index.json", {"metadata": {}, "weight_map": weight_map})
    assert checkpoint_kind(str(sharded)) == "full"

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    save_file({"lora_A": torch.zeros(2, 2)}, adapter / "adapter_model.safetensors")
    write_json(adapter / "adapter_config.json", {"base_model_name_or_path": "org/base"})
    assert checkpoint_kind(str(adapter)) == "adapter"

    for name in ("pytorch_model.bin", "adapter_model.bin"):
        pickled = tmp_path / f"pickled-{name}"
        pickled.mkdir()
        (pickled / name).write_bytes(b"never unpickled")
        with pytest.raises(FileNotFoundError, match=rf"only pickled weights \({name}\).*Convert it once"):
            checkpoint_kind(str(pickled))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        checkpoint_kind(str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint_kind(str(tmp_path / "nowhere"))


def test_base_of_reads_adapter_config_then_config_then_exme_state(tmp_path):
    folder = tmp_path / "checkpoint-10"
    folder.mkdir()
    assert base_of(str(folder)) is None
    write_json(folder / "exme" / "exme_state.json", {"info": {"metric": "eval_loss", "base_model": "from/state"}})
    assert base_of(str(folder)) == "from/state"
    write_json(folder / "config.json", {"_name_or_path": "", "model_type": "llama"})  # empty: not a base
    assert base_of(str(folder)) == "from/state"
    write_json(folder / "config.json", {"_name_or_path": "from/config", "model_type": "llama"})
    assert base_of(str(folder)) == "from/config"
    write_json(folder / "adapter_config.json", {"base_model_name_or_path": "from/adapter"})
    assert base_of(str(folder)) == "from/adapter"
    write_json(folder / "adapter_config.json", {"base_model_name_or_path": None})
    assert base_of(str(folder)) == "from/config"


# ---- load_plane on full checkpoints, one of them sharded ----------------------------------------------------------


def read_checkpoint(folder):
    """All tensors of a checkpoint folder, merging the shards an index names."""
    index = folder / "model.safetensors.index.json"
    if not index.exists():
        return load_file(folder / "model.safetensors")
    tensors = {}
    for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        part = load_file(folder / shard)
        assert not part.keys() & tensors.keys()
        tensors.update(part)
    return tensors


def test_load_plane_on_full_checkpoints_one_sharded(tmp_path):
    base_dir, sft1_dir, sft2_dir = tmp_path / "base", tmp_path / "checkpoint-10", tmp_path / "checkpoint-20"
    make_llama(seed=0).save_pretrained(base_dir)
    make_tokenizer().save_pretrained(base_dir)
    make_llama(seed=1).save_pretrained(sft1_dir)
    make_llama(seed=2).save_pretrained(sft2_dir, max_shard_size="10KB")
    assert (sft2_dir / "model.safetensors.index.json").is_file() and not (sft2_dir / "model.safetensors").exists()
    assert len(list(sft2_dir.glob("model-*.safetensors"))) > 1
    base, sft1, sft2 = (read_checkpoint(folder) for folder in (base_dir, sft1_dir, sft2_dir))

    run = load_plane(str(base_dir), [str(sft1_dir), str(sft2_dir)])
    assert not run.adapter and run.tokenizer is not None
    live = trainable_tensors(run.model)
    assert live.keys() == base.keys()
    coefficients = (0.3, 0.9)
    run.plane.apply(coefficients)
    expected = span_point(base, [sft1, sft2], coefficients)
    for name, tensor in live.items():
        assert torch.equal(tensor, expected[name]), name
        reference = base[name].double() + sum(
            c * (s[name].double() - base[name].double()) for c, s in zip(coefficients, (sft1, sft2), strict=True)
        )
        assert_close(tensor, reference.float(), rtol=1e-6, atol=1e-6, msg=name)
    run.plane.close()  # the live model is the base again, bit for bit
    for name, tensor in trainable_tensors(run.model).items():
        assert torch.equal(tensor, base[name]), name


def test_load_plane_quantizes_lora_checkpoints_only(tmp_path):
    base_dir, sft_dir = tmp_path / "base", tmp_path / "checkpoint-10"
    make_llama(seed=0).save_pretrained(base_dir)
    make_llama(seed=1).save_pretrained(sft_dir)
    with pytest.raises(ValueError, match="--load-in-4bit/--load-in-8bit are for LoRA checkpoints"):
        load_plane(str(base_dir), [str(sft_dir)], load_in_4bit=True)
    with pytest.raises(ValueError, match="one of `load_in_4bit` and `load_in_8bit`, not both"):
        load_plane(str(base_dir), [str(sft_dir)], load_in_4bit=True, load_in_8bit=True)
