"""What a finished sweep leaves behind: `exme_report.json` (`report`), the paper-style table in `exme_report.md`
(`markdown`), the sweep's figure `exme_sweep.png` (`figure`), the model card `README.md` and the same merge as a
mergekit recipe `mergekit.yml` (`card`); the table and the figure logged to TensorBoard and W&B (`trackers`)."""

from .files import MERGEKIT_RECIPE, MODEL_CARD, REPORT_ITEMS, REPORT_JSON, REPORT_MD, REPORT_PNG
from .report import Report
from .trackers import log_report

__all__ = [
    "MERGEKIT_RECIPE",
    "MODEL_CARD",
    "REPORT_ITEMS",
    "REPORT_JSON",
    "REPORT_MD",
    "REPORT_PNG",
    "Report",
    "log_report",
]
