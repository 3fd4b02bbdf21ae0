"""The refusals before work starts."""

import pytest

from exme_callback.candidates import Checkpoint
from exme_callback.preflight import check_items, check_racing
from exme_callback.settings import SearchSettings


def aggregate(model):
    return {"closeness": 0.0}


def per_item(model, items=None):
    return {"closeness": [0.0] * (6 if items is None else len(items["closeness"]))}


def test_racing_needs_an_evaluator_that_scores_a_subset():
    with pytest.raises(ValueError, match="`search='racing'`.*takes no `items` argument"):
        check_racing(aggregate, SearchSettings(search="racing"))
    check_racing(per_item, SearchSettings(search="racing"))


def test_per_item_scores_of_other_items_are_refused():
    a = Checkpoint(10, 0.5, items={"acc": [1.0, 0.0]})
    b = Checkpoint(20, 0.5, items={"acc": [1.0, 0.0, 1.0]})
    with pytest.raises(ValueError, match="per-item scores differ between evaluations.*same items, in the same order"):
        check_items([a, b], SearchSettings())
    check_items([a, a], SearchSettings())
