"""`exme run` in this process, counting the documents its `LMEvalEvaluator` scores per call; launched by
tests/test_cli.py alone or under `torchrun`.

Usage: python _cli_run.py COUNTS_DIR EXME_RUN_ARGS...
Writes `COUNTS_DIR/documents-rank<r>.json`: the documents this process scored at each call.
"""

import json
import os
import sys

from exme_callback import LMEvalEvaluator
from exme_callback.cli import main

counts, calls, original = sys.argv[1], [], LMEvalEvaluator.__call__


def counted(self, model, items=None):
    before = self.documents_scored
    try:
        return original(self, model, items)
    finally:
        calls.append(self.documents_scored - before)


LMEvalEvaluator.__call__ = counted
status = main(sys.argv[2:])
os.makedirs(counts, exist_ok=True)
with open(os.path.join(counts, f"documents-rank{os.environ.get('RANK', '0')}.json"), "w") as f:
    json.dump(calls, f)
sys.exit(status)
