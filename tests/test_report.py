import json
import math
import os

import pytest

from exme_callback.report import Report, publish_dir
from exme_callback.search import Candidate, Checkpoint


def make_report():
    candidates = [
        Candidate("sft", 1.0, 0.0, step1=40, score=0.50),
        Candidate("sft", 0.0, 1.0, step2=30, score=0.60),
        Candidate("expo", 1.2, 0.0, step1=40, alpha1=0.2, score=0.45),
        Candidate("expo", 1.4, 0.0, step1=40, alpha1=0.4, score=0.48),
        Candidate("expo", 0.0, 1.2, step2=30, alpha2=0.2, score=math.nan, error="non-finite score nan"),
        Candidate("expo", 0.0, 1.4, step2=30, alpha2=0.4, score=0.55),
        Candidate("exme", 0.6, 0.7, 40, 30, 0.2, 0.4, 0.5, score=0.40),
    ]
    return Report(
        metric="eval_loss",
        greater_is_better=False,
        checkpoints=[Checkpoint(40, 0.5), Checkpoint(30, 0.6)],
        candidates=candidates,
        final=candidates[-1],
        alphas=(0.2, 0.4),
        betas=(0.5,),
        choose_from="all",
        base=Candidate("base", 0.0, 0.0, score=2.0),
    )


def test_rows_follow_the_paper_table():
    report = make_report()
    rows = {label: c for label, c in report.rows()}
    assert list(rows) == ["Base", "SFT-1", "SFT-2", "EXPO-1", "EXPO-2", "ExMe", "Chosen (exme)"]
    assert rows["EXPO-1"].alpha1 == 0.2 and rows["EXPO-2"].alpha2 == 0.4  # best valid alpha of each
    assert report.best_sft.score == 0.5 and report.best_exme is report.final


def test_markdown_numbers_equal_json(tmp_path):
    report = make_report()
    report.write(str(tmp_path))
    data = json.loads((tmp_path / "exme_report.json").read_text())
    table = [line for line in (tmp_path / "exme_report.md").read_text().splitlines() if line.startswith("| ")][1:]
    by_label = {line.split(" | ")[0][2:]: line.split(" | ") for line in table}
    assert float(by_label["Chosen (exme)"][5]) == pytest.approx(data["final"]["score"], abs=5e-5)
    assert by_label["Chosen (exme)"][6].strip(" |") == "+0.1000"  # 0.5 -> 0.4, lower is better
    assert by_label["SFT-1"][6].strip(" |") == "+0.0000"
    assert by_label["Base"][6].strip(" |") == "-1.5000"
    assert by_label["ExMe"][2] == "alpha1=0.2, alpha2=0.4, beta=0.5"
    assert data["best_exme"] == data["final"] and data["checkpoints"] == [
        {"step": 40, "score": 0.5},
        {"step": 30, "score": 0.6},
    ]
    assert "non-finite score nan" in (tmp_path / "exme_report.md").read_text()


def test_publish_dir_replaces_atomically(tmp_path):
    final = tmp_path / "exme"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with publish_dir(str(final)) as folder:
            (tmp_path / "exme.incomplete" / "new.txt").write_text("partial")
            raise RuntimeError("evaluator failed")
    assert os.listdir(final) == ["old.txt"] and not os.path.exists(folder)
    with publish_dir(str(final)) as folder:
        with open(os.path.join(folder, "new.txt"), "w") as f:
            f.write("new")
        assert (final / "old.txt").exists()  # the earlier result stays whole until the new one is complete
    assert os.listdir(final) == ["new.txt"]
    assert sorted(os.listdir(tmp_path)) == ["exme"]


def test_publish_dir_on_other_processes_touches_nothing(tmp_path):
    with publish_dir(str(tmp_path / "exme"), write=False):
        pass
    assert os.listdir(tmp_path) == []
