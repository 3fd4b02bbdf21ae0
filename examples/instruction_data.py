"""Instruction data for the quickstart: generated skills or an Alpaca-style dataset, and their lm-eval tasks.

Every record is Alpaca-style (`instruction`, `input`, `output`); multiple-choice skills add `choices`. The prompt
is the same in training (TRL's prompt/completion form) and in lm-eval, so the scores measure the skills, not the
format. Each skill is its own lm-eval task, like the several benchmarks of the ExMe paper.
"""

import json
import os
import random
import shutil

import yaml


def arithmetic(rng: random.Random) -> dict:
    a, b = rng.randrange(100, 1000), rng.randrange(100, 1000)
    return {"instruction": "Add the two numbers.", "input": f"{a} + {b}", "output": str(a + b)}


def comparison(rng: random.Random) -> dict:
    a = rng.randrange(100, 1000)
    b = a + rng.choice([-1, 1]) * rng.randrange(1, 100)
    b = b if 100 <= b < 1000 and b != a else 1099 - a
    return {
        "instruction": "Which number is larger?",
        "input": f"{a} or {b}",
        "output": str(max(a, b)),
        "choices": [str(a), str(b)],
    }


WORDS = (
    "apple banana cherry dragon eagle forest garden harbor island jacket kitten lemon mountain needle orange "
    "pencil quilt river summer tiger umbrella valley window yellow zebra anchor bridge candle desert engine "
    "feather guitar hammer insect jungle kettle ladder mirror napkin ocean pepper rabbit saddle tunnel violin "
    "wallet butter copper dinner finger ginger honey letter marble number paper rocket silver timber winter"
).split()


def alphabetical(rng: random.Random) -> dict:
    a, b = rng.sample(WORDS, 2)
    return {
        "instruction": "Which word comes first in alphabetical order?",
        "input": f"{a} or {b}",
        "output": min(a, b),
        "choices": [a, b],
    }


def sequence(rng: random.Random) -> dict:
    start, step = rng.randrange(1, 100), rng.randrange(2, 20)
    terms = [start + i * step for i in range(5)]
    return {
        "instruction": "Continue the sequence with the next number.",
        "input": ", ".join(map(str, terms[:4])),
        "output": str(terms[4]),
    }


MAX_RESPONSE_CHARS = 400  # free-form responses are scored on their first 400 characters (about 100 tokens)

SKILLS = {"arithmetic": arithmetic, "comparison": comparison, "alphabetical": alphabetical, "sequence": sequence}


def prompt(record: dict) -> str:
    """The prompt of a record, shared by training and evaluation."""
    input_line = f"Input: {record['input']}\n" if record.get("input") else ""
    return f"Instruction: {record['instruction']}\n{input_line}Response:"


def generate_skills(sizes: dict[str, int], seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """`{split: {skill: records}}` with `sizes[split]` records per skill; no input appears in two splits."""
    rng = random.Random(seed)
    splits = {split: {} for split in sizes}
    for skill, make in SKILLS.items():
        records = {}  # by input, in order of generation
        total = sum(sizes.values())
        for _ in range(100 * total):
            record = make(rng)
            records.setdefault(record["input"], record)
            if len(records) == total:
                break
        else:
            raise ValueError(f"the skill {skill!r} has fewer than {total} distinct inputs; ask for fewer records")
        records, start = list(records.values()), 0
        for split, size in sizes.items():
            splits[split][skill], start = records[start : start + size], start + size
    return splits


def load_records(name_or_path: str, sizes: dict[str, int], seed: int = 0) -> dict[str, dict[str, list[dict]]]:
    """An Alpaca-style dataset (a Hugging Face dataset name, or a local json/jsonl file) as one task, `"dataset"`,
    split like `generate_skills` (`sizes` has `train`, `selection` and `heldout`)."""
    from datasets import load_dataset

    if os.path.isfile(name_or_path):
        data = load_dataset("json", data_files=name_or_path, split="train")
    else:
        data = load_dataset(name_or_path, split="train")
    missing = {"instruction", "output"} - set(data.column_names)
    if missing:
        raise SystemExit(
            f"--dataset {name_or_path}: records need `instruction` and `output` fields (and optionally `input`), "
            f"as in Alpaca; missing {sorted(missing)}, found {data.column_names}."
        )
    records = [{"instruction": r["instruction"], "input": r.get("input") or "", "output": r["output"]} for r in data]
    random.Random(seed).shuffle(records)
    held, selection = sizes["heldout"], sizes["selection"]
    if len(records) <= held + selection:
        raise SystemExit(f"--dataset {name_or_path}: {len(records)} records, need more than {held + selection}.")
    return {
        "train": {"dataset": records[held + selection :][: sizes["train"]]},
        "selection": {"dataset": records[held : held + selection]},
        "heldout": {"dataset": records[:held]},
    }


def to_sft(records_by_task: dict[str, list[dict]], eos_token: str, seed: int = 0) -> list[dict]:
    """Prompt/completion rows for TRL's SFTTrainer, all tasks shuffled together."""
    rows = [
        {"prompt": prompt(r), "completion": f" {r['output']}{eos_token}"}
        for records in records_by_task.values()
        for r in records
    ]
    random.Random(seed).shuffle(rows)
    return rows


def write_tasks(folder: str, records_by_task: dict[str, list[dict]]) -> list[str]:
    """Write one lm-eval task per key of `records_by_task` (YAML over a local jsonl file); return the task names.

    Records with `choices` are multiple choice (accuracy); generated skills are scored by exact match of the
    greedy answer; free-form responses (`--dataset`) by the bits per byte of the reference response given the
    prompt (`response_bits_per_byte`, which lm-eval imports from a copy of this file beside the YAML).
    """
    os.makedirs(folder, exist_ok=True)
    for task, records in records_by_task.items():
        data = os.path.abspath(os.path.join(folder, f"{task}.jsonl"))
        with open(data, "w") as f:
            f.writelines(json.dumps({**r, "prompt": prompt(r), "target": _target(task, r)}) + "\n" for r in records)
        config = {
            "task": task,
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": data}},
            "test_split": "test",
            "doc_to_text": "{{prompt}}",
            **_scoring(task, records[0]),
        }
        with open(os.path.join(folder, f"{task}.yaml"), "w") as f:
            yaml.safe_dump(config, f, sort_keys=False)
            if config["output_type"] == "loglikelihood":
                f.write(f"process_results: !function {__name__}.response_bits_per_byte\n")
                shutil.copy(__file__, folder)
    return list(records_by_task)


def response_bits_per_byte(doc: dict, results: list) -> dict:
    """lm-eval `process_results` of a free-form response: its log-likelihood and its length in bytes, which the
    `bits_per_byte` aggregation turns into -sum(log-likelihood) / sum(bytes) / ln 2 (lower is better)."""
    ((loglikelihood, _),) = results
    return {"bits_per_byte": (loglikelihood, len(doc["target"].encode()))}


def _target(task: str, record: dict) -> str:
    """The continuation lm-eval scores. A free-form response is cut after `MAX_RESPONSE_CHARS` (at a word), which
    keeps evaluation affordable on a CPU and close to what training sees (`max_length` tokens in all)."""
    target = f" {record['output']}"
    if task in SKILLS or len(target) <= MAX_RESPONSE_CHARS:
        return target
    cut = target.rfind(" ", 1, MAX_RESPONSE_CHARS + 1)
    return target[: cut if cut > 0 else MAX_RESPONSE_CHARS]


def _scoring(task: str, record: dict) -> dict:
    if "choices" in record:
        return {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "{{choices.index(output)}}",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        }
    if task in SKILLS:
        return {
            "output_type": "generate_until",
            "doc_to_target": "{{target}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": 6, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        }
    return {
        "output_type": "loglikelihood",
        "doc_to_target": "{{target}}",
        "metric_list": [{"metric": "bits_per_byte", "aggregation": "bits_per_byte", "higher_is_better": False}],
    }
