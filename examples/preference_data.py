"""Preference pairs for the DPO example: the quickstart's generated skills, each prompt with its correct answer
(chosen) and a plausible wrong one (rejected).

The prompt is the quickstart's (`instruction_data.prompt`); rows are in TRL's preference form (`prompt`, `chosen`,
`rejected`), and `DPOTrainer` appends the end-of-sequence token to both answers.
"""

import random

from instruction_data import generate_skills, prompt


def wrong_answer(skill: str, record: dict, rng: random.Random) -> str:
    """A wrong answer of the kind a model makes: the other choice, a digit off in a sum, a sequence's term skipped
    or repeated."""
    if "choices" in record:  # comparison, alphabetical
        return next(choice for choice in record["choices"] if choice != record["output"])
    right = int(record["output"])
    if skill == "arithmetic":
        return str(right + rng.choice([-100, -10, -1, 1, 10, 100]))
    terms = [int(t) for t in record["input"].split(", ")]
    step = terms[1] - terms[0]
    return str(rng.choice([terms[-1], right + step]))


def to_preferences(records_by_task: dict[str, list[dict]], seed: int = 0) -> list[dict]:
    """Preference rows for TRL's `DPOTrainer`, all skills shuffled together."""
    rng = random.Random(seed)
    rows = [
        {"prompt": prompt(r), "chosen": f" {r['output']}", "rejected": f" {wrong_answer(skill, r, rng)}"}
        for skill, records in records_by_task.items()
        for r in records
    ]
    rng.shuffle(rows)
    return rows


def generate_preferences(sizes: dict[str, int], seed: int = 0) -> dict[str, list[dict]]:
    """`{split: rows}` with `sizes[split]` prompts per skill; no prompt appears in two splits."""
    return {split: to_preferences(records, seed) for split, records in generate_skills(sizes, seed).items()}
