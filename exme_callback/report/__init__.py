"""What a finished sweep leaves behind: `exme_report.json` (`report`), the paper-style table in `exme_report.md`
(`markdown`), the sweep's figure `exme_sweep.png` (`figure`), the model card `README.md` and the same merge as a
mergekit recipe `mergekit.yml` (`card`)."""

from .files import MERGEKIT_RECIPE, MODEL_CARD, REPORT_JSON, REPORT_MD, REPORT_PNG
from .report import Report

__all__ = ["MERGEKIT_RECIPE", "MODEL_CARD", "REPORT_JSON", "REPORT_MD", "REPORT_PNG", "Report"]
