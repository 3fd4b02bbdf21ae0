"""Rules of the code base that a test can check: every `zip` says whether its inputs must have one length."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = sorted(
    p for folder in ("exme_callback", "tests", "benchmarks", "examples") for p in (ROOT / folder).rglob("*.py")
)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_zip_is_explicit_about_its_lengths(path):
    """`zip` stops at its shortest input without a word: a loop over candidates and the weights an evaluator saw
    would check nothing if the two lists diverged. `strict=True` makes that an error; `strict=False` says the
    truncation is meant (ruff's B905, enforced in pyproject.toml too)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    loose = [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name)
        and node.func.id == "zip"
        and not any(keyword.arg == "strict" for keyword in node.keywords)
    ]
    assert not loose, f"{path.relative_to(ROOT)}: `zip` without `strict=` at lines {loose}"
