"""The DPO example (`examples/dpo.py --smoke`) and its preference data, end to end on a tiny model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from datasets import Dataset

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
sys.path.insert(0, str(EXAMPLES))

import dpo  # noqa: E402
import preference_data  # noqa: E402


def test_chosen_answers_are_right_rejected_ones_wrong_and_splits_disjoint():
    splits = preference_data.generate_preferences({"train": 30, "selection": 5, "heldout": 5}, seed=3)
    assert {split: len(rows) for split, rows in splits.items()} == {"train": 120, "selection": 20, "heldout": 20}
    prompts = [{r["prompt"] for r in rows} for rows in splits.values()]
    assert len(set.union(*prompts)) == sum(map(len, prompts)) == 160  # distinct within and across splits
    for row in splits["train"]:
        inputs = row["prompt"].split("Input: ")[1].split("\n")[0]
        chosen, rejected = row["chosen"].strip(), row["rejected"].strip()
        assert row["chosen"].startswith(" ") and row["rejected"].startswith(" ") and chosen != rejected
        if " + " in inputs:
            a, b = map(int, inputs.split(" + "))
            assert int(chosen) == a + b and abs(int(rejected) - (a + b)) in (1, 10, 100)
        elif ", " in inputs:
            terms = [int(t) for t in inputs.split(", ")]
            step = terms[1] - terms[0]
            assert int(chosen) == terms[-1] + step and int(rejected) in (terms[-1], terms[-1] + 2 * step)
        else:
            choices = inputs.split(" or ")
            larger = "larger" in row["prompt"]
            assert chosen == (max(choices, key=int) if larger else min(choices)) and rejected in choices
    assert splits == preference_data.generate_preferences({"train": 30, "selection": 5, "heldout": 5}, seed=3)


@pytest.mark.slow
def test_smoke_run_saves_the_adapter_it_reports(tmp_path):
    """The saved adapter, reloaded onto the rebuilt tiny base, has the DPO loss the report says, against the base."""
    from peft import PeftModel
    from trl import DPOConfig, DPOTrainer

    run = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / "dpo.py"), "--smoke", "--output-dir", str(run)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| Chosen" in result.stdout and "| ExMe |" in result.stdout and "Held-out reward accuracy" in result.stdout
    report = json.loads((run / "exme" / "exme_report.json").read_text())
    assert report["metric"] == "eval_loss" and report["heldout_metric"] == "eval_loss"
    assert [c["kind"] for c in report["candidates"]] == ["sft"] * 2 + ["expo"] * 10 + ["exme"] * 9

    args = dpo.parse_args(["--smoke"])
    splits = dpo.load_splits(args)
    base, tokenizer = dpo.load_sft_model(args, splits)
    reference, _ = dpo.load_sft_model(args, splits)
    check = DPOTrainer(
        model=PeftModel.from_pretrained(base, run / "exme"),
        ref_model=reference,
        args=DPOConfig(
            output_dir=str(tmp_path / "check"),
            max_length=64,
            per_device_eval_batch_size=32,
            bf16=False,
            use_cpu=True,
            report_to=[],
        ),
        train_dataset=Dataset.from_list(splits["train"][:1]),  # required; never trained on
        eval_dataset={
            "selection": Dataset.from_list(splits["selection"]),
            "heldout": Dataset.from_list(splits["heldout"]),
        },
        processing_class=tokenizer,
    )
    metrics = check.evaluate()
    final = report["final"]
    assert metrics["eval_selection_loss"] == pytest.approx(final["score"], rel=1e-5)
    assert metrics["eval_heldout_loss"] == pytest.approx(final["heldout_score"], rel=1e-5)
    assert report["base"]["score"] == pytest.approx(math.log(2), rel=1e-6)  # the policy is its reference at the start
