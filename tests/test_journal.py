"""The sweep's journal: its file, what it reuses and ignores, and a run killed during the sweep that resumes."""

import json
import os
import signal
import subprocess
import sys

import torch
from conftest import RegressionModel

from exme_callback.journal import Evaluation, Journal, fingerprint
from exme_callback.merges import Merge
from exme_callback.settings import SearchSettings

HERE = os.path.dirname(__file__)


def test_evaluations_come_back_from_the_file_exactly(tmp_path):
    path = str(tmp_path / "exme-journal.jsonl")
    journal = Journal(path, "abc")
    dare = Merge("dare", checkpoints=(0, 1), weights=(0.5, 0.5), density=0.3, seed=1).to_dict()
    done = {
        journal.key("selection", (1.1, 0.0)): Evaluation(0.1 + 0.2, {"acc": 1 / 3}, {"acc": [0.0, 1.0, 0.0]}),
        journal.key("selection", dare): Evaluation(float("nan"), {}, {}),
        journal.key("selection", (1.1, 0.0), {"task": [3, 1]}): Evaluation(-2.5, {"acc": 0.5}, {"acc": [1.0, 0.0]}),
        journal.key("heldout", (1.1, 0.0)): Evaluation(7.0, {"f1": 7.0}, {}),
    }
    for key, evaluation in done.items():
        journal.add(key, evaluation)
    assert len(done) == 4  # the keys differ by role, model and items

    again = Journal(path, "abc")
    assert len(again) == 4 and again.reused == 0
    for key, evaluation in done.items():
        found = again.get(key)
        if evaluation.score != evaluation.score:  # NaN
            assert found.score != found.score and found[1:] == evaluation[1:]
        else:
            assert found == evaluation
    assert again.get(journal.key("selection", (1.2, 0.0))) is None and again.reused == 4
    again.remove()
    assert not os.path.exists(path)


def test_another_fingerprint_and_a_torn_line_are_not_read(tmp_path, caplog):
    path = str(tmp_path / "exme-journal.jsonl")
    journal = Journal(path, "abc")
    journal.add(journal.key("selection", (1.0, 0.0)), Evaluation(1.0, {}, {}))
    journal.add(journal.key("selection", (0.0, 1.0)), Evaluation(2.0, {}, {}))
    with open(path, "rb+") as f:  # a kill in the middle of the last line
        f.truncate(os.path.getsize(path) - 5)
    torn = Journal(path, "abc")
    assert len(torn) == 1 and torn.get(journal.key("selection", (1.0, 0.0))).score == 1.0
    with caplog.at_level("WARNING", logger="exme_callback.journal"):
        assert len(Journal(path, "other")) == 0
    assert any("journal of another sweep" in r.getMessage() for r in caplog.records)
    assert len(Journal(path, "abc")) == 0  # replaced by the other sweep's journal


def test_fingerprints_follow_settings_not_addresses():
    assert fingerprint(SearchSettings()) == fingerprint(SearchSettings())
    assert fingerprint(SearchSettings()) != fingerprint(SearchSettings(alphas=(0.1, 0.3)))
    assert fingerprint(object()) == fingerprint(object())  # a type's name, never an address


def run(output_dir, *options):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    script = os.path.join(HERE, "_journal_run.py")
    return subprocess.run([sys.executable, script, str(output_dir), *options], env=env, capture_output=True, text=True)


def test_a_run_killed_during_the_sweep_resumes_where_it_stopped(tmp_path):
    uninterrupted = run(tmp_path / "a")
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    total = json.loads((tmp_path / "a" / "evaluations.json").read_text())
    assert total == 5 + 5 + 9  # EXPO-1, EXPO-2, the merges

    killed = run(tmp_path / "b", "--kill-at", "8")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    journal = (tmp_path / "b" / "exme-journal.jsonl").read_text().splitlines()
    assert len(journal) == 1 + 7  # the header and the seven evaluations that finished
    assert not (tmp_path / "b" / "exme").exists()

    resumed = run(tmp_path / "b", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "b" / "evaluations.json").read_text()) == total - 7
    assert "resuming the sweep from" in resumed.stderr and "7 evaluations are done" in resumed.stderr
    assert not (tmp_path / "b" / "exme-journal.jsonl").exists()
    reports = [json.loads((tmp_path / r / "exme" / "exme_report.json").read_text()) for r in "ab"]
    for report in reports:
        report.pop("saved"), report.pop("sources")  # the run folders
    assert reports[0] == reports[1]
    a, b = (RegressionModel.from_pretrained(tmp_path / r / "exme") for r in "ab")
    assert torch.equal(a.a, b.a) and torch.equal(a.b, b.b)


def test_a_run_killed_at_the_first_evaluation_resumes_with_nothing_done(tmp_path):
    assert run(tmp_path, "--kill-at", "1").returncode == -signal.SIGKILL
    assert len((tmp_path / "exme-journal.jsonl").read_text().splitlines()) == 1  # the header only
    resumed = run(tmp_path, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((tmp_path / "evaluations.json").read_text()) == 19
