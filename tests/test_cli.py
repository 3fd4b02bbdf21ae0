"""The `exme` command on tiny finished runs written by the tests: the same result as the callback on the same run."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import make_llama, make_texts
from datasets import Dataset
from safetensors.torch import load_file
from torch.testing import assert_close
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DataCollatorForLanguageModeling,
    Trainer,
    TrainingArguments,
)

from exme_callback import ExMeCallback, combine
from exme_callback.cli import main
from exme_callback.evaluators import LossEvaluator

pytestmark = pytest.mark.slow


def finished_run(tmp_path, tokenizer, lora: bool, quantized: bool = False):
    """A Trainer run with ExMeCallback scoring by the eval loss on a jsonl file (which `exme run --eval-data` reads),
    checkpoints every evaluation, `save_total_limit=2`; `quantized`: QLoRA, the adapter trained on the base loaded
    in 4 bits (NF4). Returns the run folder, the data file and the callback."""
    base_dir, run_dir = tmp_path / "base", tmp_path / "run"
    make_llama(**(QUANTIZABLE if quantized else {})).save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    quantization = {"quantization_config": BitsAndBytesConfig(**NF4)} if quantized else {}
    model = AutoModelForCausalLM.from_pretrained(base_dir, **quantization)  # records its base, as a hub model would
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    data = tmp_path / "val.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(16, seed=1)))
    tokenize = lambda texts: Dataset.from_dict(dict(tokenizer(texts)))  # noqa: E731
    trainer = Trainer(
        model=model,
        args=TrainingArguments(
            output_dir=str(run_dir),
            per_device_train_batch_size=8,
            learning_rate=2e-2 if lora else 5e-3,
            max_steps=24,
            eval_strategy="steps",
            eval_steps=6,
            save_strategy="steps",
            save_steps=6,
            save_total_limit=2,
            report_to=[],
            disable_tqdm=True,
            use_cpu=True,
            seed=0,
        ),
        train_dataset=tokenize(make_texts(96, seed=0)),
        eval_dataset=tokenize(make_texts(16, seed=1)),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )
    callback = ExMeCallback(trainer, evaluator=LossEvaluator(str(data), tokenizer), baselines=not quantized)
    trainer.add_callback(callback)
    trainer.train()
    return run_dir, data, callback


NF4 = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
QUANTIZABLE = {"hidden_size": 64, "intermediate_size": 128}  # bitsandbytes' 4-bit CPU kernels pack 32 rows


def test_exme_run_on_a_qlora_run_loads_the_base_unquantized_or_in_4bit(tmp_path, tokenizer, monkeypatch):
    """By default the adapters are scored on the unquantized base; `--load-in-4bit` scores them as they were trained,
    and the fused model (`--merged`) is the same either way, written from the unquantized base's weights."""
    from peft import PeftModel
    from test_lora import plain_4bit_kernel

    from exme_callback import lora as exme_lora

    plain_4bit_kernel(monkeypatch)
    save_fused = exme_lora.save_fused
    run_dir, data, callback = finished_run(tmp_path, tokenizer, lora=True, quantized=True)
    trained = [c.score for c in callback.report.checkpoints]  # on the 4-bit base, during training
    steps = [c.step for c in callback.report.checkpoints]
    scores = {}
    for flags in ([], ["--load-in-4bit"]):
        out = tmp_path / ("exme" + "".join(flags))
        argv = ["run", str(run_dir), "--eval-data", str(data), "--metric", "exme/checkpoint/eval_loss"]
        assert main([*argv, "--alphas", "0.5", "--betas", "0.5", "--output-dir", str(out), *flags]) == 0
        report = json.loads((out / "exme_report.json").read_text())
        assert [c["step"] for c in report["checkpoints"]] == steps
        scores[tuple(flags)] = [c["score"] for c in report["checkpoints"]]
    assert_close(scores[("--load-in-4bit",)], trained, rtol=1e-6, atol=0)
    evaluate = LossEvaluator(str(data), tokenizer)
    unquantized = [
        evaluate(PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), folder))
        for folder in (run_dir / f"checkpoint-{step}" for step in steps)
    ]
    assert_close(scores[()], [m["eval_loss"] for m in unquantized], rtol=1e-6, atol=0)
    assert all(abs(a - b) > 1e-4 for a, b in zip(scores[()], trained, strict=True))  # 4 bits change the model

    # `exme apply --merged`: the fused model, the same bit for bit, written from the unquantized base's weights.
    fused_from_the_base = []
    monkeypatch.setattr(exme_lora, "save_fused", lambda *args: fused_from_the_base.append(save_fused(*args)))
    applied = {flag: tmp_path / f"applied{flag}" for flag in ("", "--load-in-4bit")}
    for flag, out in applied.items():
        checkpoints = [arg for step in steps for arg in ("--checkpoint", str(run_dir / f"checkpoint-{step}"))]
        argv = ["apply", *checkpoints, "--coefficients", "0.7", "0.5", "--merged", str(out)]
        assert main([*argv, *([flag] if flag else [])]) == 0
        assert len(fused_from_the_base) == bool(flag)
    ours, theirs = (load_file(folder / "model.safetensors") for folder in applied.values())
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_exme_run_reproduces_the_callback(tmp_path, tokenizer, lora, capsys):
    run_dir, data, callback = finished_run(tmp_path, tokenizer, lora)
    kept = [c.step for c in callback.report.checkpoints]
    on_disk = sorted(int(p.split("-")[1]) for p in os.listdir(run_dir) if p.startswith("checkpoint-"))
    assert sorted(kept) == on_disk  # the callback's two best are the two the trainer left on disk
    os.rename(run_dir / "exme", tmp_path / "callback-exme")

    argv = ["run", str(run_dir), "--eval-data", str(data), "--metric", "exme/checkpoint/eval_loss", "--baselines"]
    assert main(argv) == 0
    printed = capsys.readouterr()
    report = json.loads((run_dir / "exme" / "exme_report.json").read_text())
    expected = json.loads((tmp_path / "callback-exme" / "exme_report.json").read_text())

    # The same checkpoints, the same candidates with the same scores, the same choice.
    assert [c["step"] for c in report["checkpoints"]] == kept
    assert [(c["kind"], c["coefficients"], c["hyper"]) for c in report["candidates"]] == [
        (c["kind"], c["coefficients"], c["hyper"]) for c in expected["candidates"]
    ]
    assert_close(
        [c["score"] for c in report["candidates"]], [c["score"] for c in expected["candidates"]], rtol=1e-6, atol=0
    )
    assert report["final"]["coefficients"] == expected["final"]["coefficients"]
    assert_close(report["base"]["score"], expected["base"]["score"], rtol=1e-6, atol=0)
    assert "| ExMe |" in printed.out and "Ranked by exme/checkpoint/eval_loss" in printed.err

    # The same saved tensors, bit for bit.
    name = "adapter_model.safetensors" if lora else "model.safetensors"
    ours, theirs = load_file(run_dir / "exme" / name), load_file(tmp_path / "callback-exme" / name)
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert torch.equal(ours[key], theirs[key]), key

    # The model card and the recipe carry the chosen coefficients.
    card = (run_dir / "exme" / "README.md").read_text()
    metadata = yaml.safe_load(card.split("---")[1])
    assert set(metadata["tags"]) == {"exme", "merge"}
    assert metadata["library_name"] == ("peft" if lora else "transformers")
    recipe = yaml.safe_load((run_dir / "exme" / "mergekit.yml").read_text())
    assert recipe["merge_method"] == "task_arithmetic" and recipe["parameters"] == {"normalize": False}
    assert [m["parameters"]["weight"] for m in recipe["models"]] == report["final"]["coefficients"]
    folders = [os.path.join(run_dir, f"checkpoint-{step}") for step in kept]
    base = str(tmp_path / "base")
    assert recipe["base_model"] == base
    assert [m["model"] for m in recipe["models"]] == [f"{base}+{f}" if lora else f for f in folders]


def test_exme_apply_equals_combine_bit_for_bit(tmp_path, tokenizer):
    run_dir, _, _ = finished_run(tmp_path, tokenizer, lora=False)
    a, b = sorted(str(p) for p in run_dir.glob("checkpoint-*"))
    out = tmp_path / "applied"
    exme = ["--alpha1", "0.2", "--alpha2", "0.1", "--beta", "0.6"]
    assert main(["apply", "--checkpoint", a, "--checkpoint", b, *exme, str(out)]) == 0

    base = load_file(tmp_path / "base" / "model.safetensors")
    sft1, sft2 = load_file(os.path.join(a, "model.safetensors")), load_file(os.path.join(b, "model.safetensors"))
    expected = combine(base, sft1, sft2, 0.6 * 1.2, 0.4 * 1.1)
    written = load_file(out / "model.safetensors")
    assert written.keys() == expected.keys()
    for key in written:
        assert torch.equal(written[key], expected[key]), key
    reloaded = AutoModelForCausalLM.from_pretrained(out).state_dict()  # a loadable folder, holding that model
    assert all(torch.equal(reloaded[key], expected[key]) for key in expected)
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(a).get_vocab()


def test_exme_apply_lora_adapter_and_merged(tmp_path, tokenizer):
    from peft import PeftModel

    run_dir, _, _ = finished_run(tmp_path, tokenizer, lora=True)
    a, b = sorted(str(p) for p in run_dir.glob("checkpoint-*"))
    for merged in (False, True):
        out = tmp_path / f"applied-{merged}"
        argv = ["apply", "--checkpoint", a, "--checkpoint", b, "--coefficients", "0.7", "0.5", str(out)]
        assert main(argv + (["--merged"] if merged else [])) == 0
    batch = tokenizer(make_texts(4, seed=3), return_tensors="pt")
    adapter = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "applied-False"
    )
    fused = AutoModelForCausalLM.from_pretrained(tmp_path / "applied-True")
    # The reference: the dense task vectors of the two checkpoints, through PEFT's own merge.
    dense = [
        PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "base"), f).merge_and_unload()
        for f in (a, b)
    ]
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base").state_dict()
    reference = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    reference.load_state_dict(
        {
            k: base[k] + 0.7 * (dense[0].state_dict()[k] - base[k]) + 0.5 * (dense[1].state_dict()[k] - base[k])
            for k in base
        }
    )
    with torch.no_grad():
        expected = reference.eval()(**batch).logits
        assert_close(adapter.eval()(**batch).logits, expected, rtol=1e-4, atol=1e-5)
        assert_close(fused.eval()(**batch).logits, expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    from conftest import make_tokenizer

    tmp_path = tmp_path_factory.mktemp("errors")
    run_dir, data, _ = finished_run(tmp_path, make_tokenizer(), lora=False)
    return tmp_path, run_dir, data


def error_of(capsys, argv, status=1) -> str:
    assert main(argv) == status
    return capsys.readouterr().err


def test_usage_errors_exit_2(full_run, capsys):
    _, run_dir, data = full_run
    for argv, message in [
        (["run", str(run_dir)], "give one of --tasks"),
        (["run", str(run_dir), "--eval-data", str(data), "--alphas", "-1"], "--alphas must be"),
        (["run", str(run_dir), "--eval-data", str(data), "--min-gain", "-1"], "--min-gain must be a number >= 0"),
        (["run", str(run_dir), "--eval-data", str(data), "--min-gain", "big"], "a number >= 0 or 'significant'"),
        (["run", str(run_dir), "--eval-data", str(data), "--confidence", "95"], "--confidence must be a number in"),
        (["apply", "--checkpoint", "a", "--coefficients", "1", "2", "out"], "one value per --checkpoint"),
        (["apply", "--checkpoint", "a", "--beta", "0.5", "out"], "give --checkpoint twice"),
        (["apply", "--checkpoint", "a", "--coefficients", "1", "--alpha1", "0.2", "out"], "go with --beta"),
        (["run", str(run_dir), "--eval-data", str(data), "--load-in-4bit", "--baselines"], "--baselines and --dare"),
        (
            ["apply", "--checkpoint", "a", "--coefficients", "1", "--load-in-4bit", "--load-in-8bit", "out"],
            "not allowed",
        ),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_failures_exit_1_with_one_clear_line(full_run, capsys, tmp_path):
    root, run_dir, data = full_run
    run = ["run", str(run_dir), "--eval-data", str(data)]
    assert (
        "--metric: 'accuracy' is not in the run's log history; its evaluations have ['eval_loss', 'exme/"
        in error_of(capsys, run + ["--metric", "accuracy"])
    )
    assert "does not exist" in error_of(capsys, run + ["--checkpoint", str(tmp_path / "nowhere")])
    assert "takes no `items` argument" in error_of(capsys, run + ["--search", "racing"])  # the eval loss: aggregate

    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    assert "only pickled weights (pytorch_model.bin)" in error_of(capsys, run + ["--checkpoint", str(pickled)])

    corrupt = tmp_path / "corrupt"
    shutil.copytree(next(run_dir.glob("checkpoint-*")), corrupt)
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 16)
    assert "corrupt" in error_of(capsys, run + ["--checkpoint", str(corrupt)])

    other = tmp_path / "other"
    shutil.copytree(next(run_dir.glob("checkpoint-*")), other)
    tensors = load_file(other / "model.safetensors")
    tensors["model.norm.weight"] = torch.ones(3)
    from safetensors.torch import save_file

    save_file(tensors, other / "model.safetensors")
    assert "`model.norm.weight` has shape (3,)" in error_of(capsys, run + ["--checkpoint", str(other)])

    empty = tmp_path / "empty-run"
    empty.mkdir()
    assert "has no trainer_state.json" in error_of(capsys, ["run", str(empty), "--eval-data", str(data)])
    assert "cannot load 'no/such-model' offline" in error_of(capsys, run + ["--base", "no/such-model"])

    blocked = tmp_path / "blocked"
    blocked.write_text("a file where a folder should be")
    assert "not writable" in error_of(capsys, run + ["--output-dir", str(blocked / "exme")])
    assert not (run_dir / "exme.incomplete").exists()


def test_missing_checkpoints_are_skipped_and_said(full_run, capsys, caplog, tmp_path):
    root, run_dir, data = full_run
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=lambda folder, names: ["exme"] if folder == str(run_dir) else [])
    latest = max(copy.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    state = json.loads((latest / "trainer_state.json").read_text())
    ranked = [
        e["step"] for e in sorted(state["log_history"], key=lambda e: e.get("exme/checkpoint/eval_loss", math.inf))
    ][: len([e for e in state["log_history"] if "exme/checkpoint/eval_loss" in e])]
    assert ranked[0] == int(latest.name.split("-")[1])  # the latest is the best: the trainer keeps it
    shutil.rmtree(copy / f"checkpoint-{ranked[1]}")  # the second best is gone, as if `save_total_limit=1`
    argv = ["run", str(copy), "--eval-data", str(data), "--metric", "exme/checkpoint/eval_loss", "--alphas", "0.1"]
    assert main(argv + ["--betas", "0.5"]) == 0
    printed = capsys.readouterr().err
    assert f"Skipped, no longer on disk (save_total_limit?): steps {ranked[1:]}" in printed
    report = json.loads((copy / "exme" / "exme_report.json").read_text())
    assert [c["step"] for c in report["checkpoints"]] == ranked[:1]  # one left: EXPO only
    assert "only one checkpoint" in caplog.text


def test_help_lists_every_option_with_its_default(capsys):
    for argv in (["--help"], ["run", "--help"], ["apply", "--help"]):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = ("--metric", "--checkpoint", "--base", "--tasks", "--eval-data", "--heldout-tasks", "--coefficients")
    assert all(option in text for option in options)
    assert "--alphas ALPHAS [ALPHAS ...] extrapolation strengths (default: 0.1 0.2 0.3 0.4 0.5)" in text
    assert "(default: cpu)" in text and "(default: RUN_DIR/exme)" in text


def test_exme_run_with_another_strategy(full_run, capsys, tmp_path):
    root, run_dir, data = full_run
    argv = ["run", str(run_dir), "--eval-data", str(data), "--strategy", "mixup", "--mixup-draws", "2"]
    assert main(argv + ["--seed", "7", "--output-dir", str(tmp_path / "m3")]) == 0
    report = json.loads((tmp_path / "m3" / "exme_report.json").read_text())
    assert report["strategy"] == "mixup"
    assert [c["kind"] for c in report["candidates"]] == ["sft", "sft", "mixup", "mixup"]
    from exme_callback.strategies import mixup_draws

    assert [c["hyper"]["lambda"] for c in report["candidates"][2:]] == list(mixup_draws(2.0, 2, seed=7))
    assert "| M^3 |" in capsys.readouterr().out


def test_only_the_librarys_own_errors_exit_1_and_a_bug_raises(full_run, capsys, monkeypatch):
    root, run_dir, data = full_run

    def broken(*args, **kwargs):
        raise KeyError("a bug, not the user's mistake")

    monkeypatch.setattr("exme_callback.runs.rank_run", broken)
    with pytest.raises(KeyError, match="a bug"):  # with its traceback, not "exme: error: ..." and exit 1
        main(["run", str(run_dir), "--eval-data", str(data)])
    assert capsys.readouterr().err == ""


def test_exme_run_again_on_the_same_output_evaluates_only_what_its_journal_lacks(full_run, tmp_path, monkeypatch):
    root, run_dir, data = full_run
    calls, original = {"n": 0, "fail_at": 4}, LossEvaluator.__call__

    def counted(self, model):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            raise RuntimeError("the job was stopped")
        return original(self, model)

    monkeypatch.setattr(LossEvaluator, "__call__", counted)
    argv = ["run", str(run_dir), "--eval-data", str(data), "--strategy", "mixup", "--mixup-draws", "2"]
    with pytest.raises(RuntimeError, match="the job was stopped"):  # the checkpoints, the base, then the 1st draw
        main([*argv, "--output-dir", str(tmp_path / "out")])
    assert (tmp_path / "out-journal.jsonl").exists()
    calls.update(n=0, fail_at=None)
    assert main([*argv, "--output-dir", str(tmp_path / "out")]) == 0
    assert calls["n"] == 5 - 3  # two checkpoints, the base and two draws, less the three journaled
    assert not (tmp_path / "out-journal.jsonl").exists()
    calls.update(n=0)
    assert main([*argv, "--output-dir", str(tmp_path / "fresh")]) == 0
    assert calls["n"] == 5
    resumed, fresh = (json.loads((tmp_path / f / "exme_report.json").read_text()) for f in ("out", "fresh"))
    assert {**resumed, "saved": None} == {**fresh, "saved": None}
    ours, theirs = (load_file(tmp_path / f / "model.safetensors") for f in ("out", "fresh"))
    assert all(torch.equal(ours[key], theirs[key]) for key in ours) and ours.keys() == theirs.keys()


def test_exme_run_under_torchrun_splits_the_documents_and_matches_one_process(full_run, tmp_path):
    from conftest import write_lm_eval_tasks

    root, run_dir, _ = full_run
    names = write_lm_eval_tasks(tmp_path / "tasks")  # 8 multiple-choice documents, 4 generation documents
    script = os.path.join(os.path.dirname(__file__), "_cli_run.py")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}

    def exme_run(launcher, name):
        argv = ["run", str(run_dir), "--tasks", *names, "--include-path", str(tmp_path / "tasks")]
        argv += ["--metric", "exme/checkpoint/eval_loss", "--output-dir", str(tmp_path / name / "exme")]
        result = subprocess.run([*launcher, script, str(tmp_path / name), *argv], env=env, capture_output=True)
        assert result.returncode == 0, result.stderr.decode()[-3000:]
        return json.loads((tmp_path / name / "exme" / "exme_report.json").read_text()), result

    one, _ = exme_run([sys.executable], "one")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two, printed = exme_run(torchrun, "two")
    assert printed.stdout.decode().count("| ExMe |") == 1  # the table, from the main process only

    calls = [json.loads((tmp_path / "two" / f"documents-rank{r}.json").read_text()) for r in (0, 1)]
    alone = json.loads((tmp_path / "one" / "documents-rank0.json").read_text())
    assert alone == [8 + 4] * len(alone) and len(alone) == 2 + 1 + 19  # the checkpoints, the base, the sweep
    assert calls == [[4 + 2] * len(alone)] * 2  # each rank half of each task's documents, at every call
    for a, b in zip(one["candidates"], two["candidates"], strict=True):
        assert (a["kind"], a["coefficients"], a["metrics"], a["score"]) == (
            b["kind"],
            b["coefficients"],
            b["metrics"],
            b["score"],
        )
    assert one["final"]["coefficients"] == two["final"]["coefficients"]
    ours, theirs = (load_file(tmp_path / f / "exme" / "model.safetensors") for f in ("one", "two"))
    assert all(torch.equal(ours[key], theirs[key]) for key in ours) and ours.keys() == theirs.keys()
