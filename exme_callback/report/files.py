"""The names of the files an ExMe output folder holds, beside the model."""

REPORT_JSON = "exme_report.json"  # every candidate evaluated (`Report.to_dict`)
REPORT_ITEMS = "exme_items.json"  # every evaluated row's per-item scores, to recompute the intervals (`Report.items`)
REPORT_MD = "exme_report.md"  # the paper-style table (`markdown.to_markdown`)
REPORT_PNG = "exme_sweep.png"  # the sweep's figure (`figure.plot`)
MODEL_CARD = "README.md"  # the model card (`card.model_card`)
MERGEKIT_RECIPE = "mergekit.yml"  # the chosen model as a mergekit recipe (`card.mergekit_recipe`)
