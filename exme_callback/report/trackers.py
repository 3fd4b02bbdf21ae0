"""The sweep's table and figure where the run's curves are: TensorBoard and Weights & Biases, through the trainer's
own reporting callbacks (`args.report_to`), at the run's last step, under `exme/` keys."""

from __future__ import annotations

import itertools
import logging
import os
from typing import TYPE_CHECKING

from .files import REPORT_PNG

if TYPE_CHECKING:
    from .report import Report

__all__ = ["REPORT_TAG", "SWEEP_TAG", "log_report", "table"]

logger = logging.getLogger(__name__)

REPORT_TAG = "exme/report"  # the table: TensorBoard text (markdown), a W&B table
SWEEP_TAG = "exme/sweep"  # the figure: a TensorBoard image, a W&B image


def log_report(trainer, report: Report, directory: str, step: int, caller=None) -> None:
    """Log `report`'s table (`Report.to_markdown`) and its figure (`directory/exme_sweep.png`) to the trackers the
    trainer reports to: TensorBoard (`TensorBoardCallback`'s writer, reopened on its folder when it is closed) and
    W&B (`WandbCallback`'s module, when a run is active). Call it on the main process only. A tracker that fails is
    named in a warning; nothing is raised.

    Args:
        trainer (`transformers.Trainer` or `None`): whose `callback_handler` holds the reporting callbacks.
        report (`Report`): a finished sweep's report.
        directory (`str`): the output folder the report was written to (its figure is read from there).
        step (`int`): the step the values are logged at (the trainer's last `global_step`).
        caller (`TrainerCallback`, *optional*): the callback calling this from its `on_train_end`; a reporting
            callback before it in the handler has already ended (TensorBoard's then closed its writer), so a writer
            reopened since is closed again here.
    """
    from transformers.integrations import TensorBoardCallback, WandbCallback

    callbacks = [] if trainer is None else list(trainer.callback_handler.callbacks)
    ended = callbacks[: callbacks.index(caller)] if caller in callbacks else []
    figure = os.path.join(directory, REPORT_PNG)
    for callback in callbacks:
        for kind, name, log in ((TensorBoardCallback, "TensorBoard", _tensorboard), (WandbCallback, "W&B", _wandb)):
            if not isinstance(callback, kind):
                continue
            try:
                log(callback, trainer.args, report, figure, step, ended=callback in ended)
            except Exception as error:  # logging the report never fails the sweep
                logger.warning(
                    f"ExMe: could not log the report to {name} ({type(error).__name__}: {error}); it is in "
                    f"{directory}."
                )


def _tensorboard(callback, args, report: Report, figure: str, step: int, ended: bool) -> None:
    """Text and image summaries in the run's own event folder, next to the training curves."""
    writer = callback.tb_writer
    if writer is None:  # closed at its `on_train_end`: a writer of ours on the same folder
        log_dir = getattr(callback, "logging_dir", None) or getattr(args, "logging_dir", None)
        writer = callback._SummaryWriter(log_dir=log_dir)
    writer.add_text(REPORT_TAG, report.to_markdown(), step)
    if os.path.exists(figure):
        import matplotlib.image

        writer.add_image(SWEEP_TAG, matplotlib.image.imread(figure), step, dataformats="HWC")
    writer.flush()
    if writer is not callback.tb_writer or ended:  # ours, or one reopened after the callback closed its own
        writer.close()
        callback.tb_writer = None


def _wandb(callback, args, report: Report, figure: str, step: int, ended: bool) -> None:
    """A table of the report's rows and the figure, in the active run."""
    wandb = getattr(callback, "_wandb", None)
    if wandb is None or getattr(wandb, "run", None) is None:
        return
    columns, rows = table(report.to_markdown())
    values = {REPORT_TAG: wandb.Table(columns=columns, data=rows), "train/global_step": step}
    if os.path.exists(figure):
        values[SWEEP_TAG] = wandb.Image(figure, caption=report.summary()[0])
    wandb.log(values)


def table(markdown: str) -> tuple[list[str], list[list]]:
    """The header and rows of the report's main table (`markdown.to_markdown`): a column whose every cell is a
    number or `-` holds floats (`None` for `-`), the others the cells' text."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
    block = itertools.takewhile(lambda line: line.startswith("|"), lines[start:])
    header, _, *rows = [[cell.strip() for cell in line.strip().strip("|").split("|")] for line in block]
    columns = [[row[j] for row in rows] for j in range(len(header))]
    columns = [_numbers(column) or column for column in columns]
    return header, [list(row) for row in zip(*columns, strict=True)]


def _numbers(cells: list[str]) -> list[float | None] | None:
    """The cells as floats (`None` for `-`), or `None` when one is text."""
    try:
        return [None if cell == "-" else float(cell) for cell in cells]
    except ValueError:
        return None
