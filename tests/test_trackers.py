"""The sweep's table and figure in the run's trackers: TensorBoard event files read back, W&B through a fake module."""

import io
import logging
from types import SimpleNamespace

import matplotlib.image
import pytest
import torch
from conftest import regression_args
from transformers import Trainer
from transformers.integrations import TensorBoardCallback, WandbCallback
from transformers.integrations.integration_utils import WandbLogModel

from exme_callback import ExMeCallback
from exme_callback.report import REPORT_PNG, log_report
from exme_callback.report.trackers import REPORT_TAG, SWEEP_TAG, table

TARGET = torch.tensor([2.5, 2.0])


def closeness(model):
    return {"closeness": -float(((torch.stack([model.a.detach(), model.b.detach()]) - TARGET) ** 2).sum())}


def train(tmp_path, regression, report_to=(), callbacks=(), exme_first=False):
    """A regression run with ExMeCallback; `exme_first`: its `on_train_end` before TensorBoard's (which closes its
    writer), else after (the trainer's order: reporting callbacks first)."""
    model, train_data, eval_data = regression
    args = regression_args(tmp_path / "run", report_to=list(report_to))
    trainer = Trainer(model=model, args=args, train_dataset=train_data, eval_dataset=eval_data)
    callback = ExMeCallback(trainer, evaluator=closeness, metrics={"closeness": "max"})
    moved = [trainer.pop_callback(TensorBoardCallback)] if exme_first else []
    for c in [callback, *[c for c in moved if c is not None], *callbacks]:
        trainer.add_callback(c)
    trainer.train()
    return trainer, callback


def events(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir), size_guidance={"tensors": 0, "images": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


@pytest.mark.parametrize("exme_first", [False, True])
def test_tensorboard_gets_the_table_and_the_figure_next_to_the_training_curves(
    tmp_path, regression, monkeypatch, exme_first
):
    pytest.importorskip("tensorboard", reason="the `test` extra installs tensorboard, which this test reads back")
    log_dir = tmp_path / "tensorboard"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(log_dir))  # transformers 5: no `logging_dir` argument
    trainer, callback = train(tmp_path, regression, report_to=["tensorboard"], exme_first=exme_first)
    step = trainer.state.global_step
    accumulator = events(log_dir)
    tags = accumulator.Tags()
    # transformers puts "train/" before every key that is not an evaluation's: the candidates' scalars too
    assert {"train/loss", "eval/loss", "train/exme/checkpoint/score", "train/exme/score"} <= set(tags["scalars"])

    (text,) = accumulator.Tensors(f"{REPORT_TAG}/text_summary")
    assert text.step == step
    markdown = text.tensor_proto.string_val[0].decode()
    assert markdown == callback.report.to_markdown()
    chosen = next(line for line in markdown.splitlines() if line.startswith("| Chosen ("))
    assert f"{callback.report.final.score:.4f}" in chosen

    (image,) = accumulator.Images(SWEEP_TAG)
    assert image.step == step and image.encoded_image_string.startswith(b"\x89PNG\r\n\x1a\n")
    decoded = matplotlib.image.imread(io.BytesIO(image.encoded_image_string))
    on_disk = matplotlib.image.imread(tmp_path / "run" / "exme" / REPORT_PNG)
    assert (image.height, image.width) == on_disk.shape[:2] == decoded.shape[:2] == (600, 1200)
    assert abs(decoded[..., :3].astype(float) - on_disk[..., :3].astype(float)).max() <= 1 / 255 + 1e-6

    (tensorboard,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, TensorBoardCallback)]
    assert tensorboard.tb_writer is None  # closed, whichever ended first
    log_report(trainer, callback.report, str(tmp_path / "run" / "exme"), step)  # no writer: one of its own
    assert len(events(log_dir).Tensors(f"{REPORT_TAG}/text_summary")) == 2


class FakeWandb:
    """What `WandbCallback` and the report use of the `wandb` module, recorded."""

    def __init__(self, active=True):
        self.run = SimpleNamespace(summary={}) if active else None
        self.logged = []

    def Table(self, columns, data):  # noqa: N802 (wandb's names)
        return SimpleNamespace(columns=columns, data=data)

    def Image(self, path, caption=None):  # noqa: N802
        return SimpleNamespace(path=path, caption=caption)

    def log(self, values):
        self.logged.append(values)


class FakeWandbCallback(WandbCallback):
    """transformers' W&B callback over the fake module, its run already set up."""

    def __init__(self, wandb):
        self._wandb, self._initialized, self._log_model = wandb, True, WandbLogModel("false")


def test_wandb_gets_a_table_of_the_rows_and_the_figure(tmp_path, regression):
    wandb = FakeWandb()
    trainer, callback = train(tmp_path, regression, callbacks=[FakeWandbCallback(wandb)])
    report = callback.report
    (values,) = [v for v in wandb.logged if REPORT_TAG in v]
    assert values["train/global_step"] == trainer.state.global_step
    assert values[REPORT_TAG].columns[:3] == ["model", "hyper-parameters", "c1"]
    assert values[REPORT_TAG].columns[-2:] == ["selection", "Δ selection"]
    rows = {row[0]: dict(zip(values[REPORT_TAG].columns, row, strict=True)) for row in values[REPORT_TAG].data}
    assert list(rows) == [label for label, _ in report.rows()]
    chosen = rows[f"Chosen ({report.final.kind})"]
    assert chosen["selection"] == pytest.approx(report.final.score, abs=5e-5)
    assert chosen["c1"] == pytest.approx(report.final.c1, abs=5e-5)
    assert rows["Base"]["hyper-parameters"] == "-" and isinstance(chosen["Δ selection"], float)
    assert values[SWEEP_TAG].path == str(tmp_path / "run" / "exme" / REPORT_PNG)
    assert values[SWEEP_TAG].caption.startswith(f"ExMe: chose {report.final.kind}")


def test_wandb_without_an_active_run_gets_nothing(tmp_path, regression):
    wandb = FakeWandb(active=False)
    callback = ExMeCallback(evaluator=closeness, metrics={"closeness": "max"})
    trainer = SimpleNamespace(callback_handler=SimpleNamespace(callbacks=[FakeWandbCallback(wandb), callback]))
    trainer.args = None
    log_report(trainer, SimpleNamespace(), str(tmp_path), 1, caller=callback)
    assert wandb.logged == []


def test_a_tracker_that_fails_is_a_warning_not_an_error(tmp_path, regression, caplog):
    wandb = FakeWandb()
    wandb.Table = lambda **kwargs: (_ for _ in ()).throw(RuntimeError("wandb is down"))
    with caplog.at_level(logging.WARNING, logger="exme_callback.report.trackers"):
        trainer, callback = train(tmp_path, regression, callbacks=[FakeWandbCallback(wandb)])
    assert callback.report.final is not None and (tmp_path / "run" / "exme" / REPORT_PNG).exists()
    assert "could not log the report to W&B (RuntimeError: wandb is down)" in caplog.text


def test_table_reads_the_main_table_of_the_markdown():
    markdown = "\n".join(
        [
            "# ExMe report",
            "",
            "| model | hyper-parameters | c1 | selection | Δ selection |",
            "|---|---|---:|---:|---:|",
            "| Base | - | 0.0000 | 0.2969 | -0.4609 [-0.5547, -0.3750] |",
            "| SFT-1 | step=40 | 1.0000 | 0.7578 | +0.0000 |",
            "| TIES | density=0.5 | - | 0.5000 | - |",
            "",
            "| models | pearson | cosine | euclidean |",
            "|---|---:|---:|---:|",
            "| SFT-1 / SFT-2 | 0.9 | 0.9 | 1.0 |",
        ]
    )
    columns, rows = table(markdown)
    assert columns == ["model", "hyper-parameters", "c1", "selection", "Δ selection"]
    assert rows == [
        ["Base", "-", 0.0, 0.2969, "-0.4609 [-0.5547, -0.3750]"],
        ["SFT-1", "step=40", 1.0, 0.7578, "+0.0000"],
        ["TIES", "density=0.5", None, 0.5, "-"],
    ]
