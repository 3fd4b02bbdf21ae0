"""The refusals before work starts."""

from types import SimpleNamespace

import pytest
from conftest import make_llama

from exme_callback.candidates import Checkpoint
from exme_callback.evaluators import TrainerEvaluator
from exme_callback.preflight import check_items, check_racing, check_reference
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


def dpo_like(ref_model=None, precompute=False):
    """What `check_reference` reads of a TRL preference trainer (`DPOTrainer`, `KTOTrainer`)."""
    return SimpleNamespace(ref_model=ref_model, args=SimpleNamespace(precompute_ref_log_probs=precompute))


@pytest.mark.parametrize(
    "use_dora, options, named",
    [(False, {"baselines": True}, "`baselines=True`"), (False, {"dare": 0.5}, "`dare=0.5`"), (True, {}, "DoRA")],
)
def test_a_reference_from_the_disabled_adapter_refuses_candidates_in_the_base_layers(use_dora, options, named):
    """Without `ref_model` a preference trainer's reference is the LoRA model with its adapters disabled, which
    dense candidates (in the base layers) change too: they would be scored against themselves."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"], use_dora=use_dora))
    trainer, settings = dpo_like(), SearchSettings(**options)
    with pytest.raises(NotImplementedError, match=f"{named}.*adapters disabled.*log 2.*Pass `ref_model=`"):
        check_reference(trainer, model, settings, [TrainerEvaluator(trainer)])

    # A reference of its own, reference log-probs computed before training, or an evaluator that does not use
    # the reference: the candidates are scored as they are.
    check_reference(dpo_like(ref_model=make_llama()), model, settings, [TrainerEvaluator(trainer)])
    precomputed = dpo_like(precompute=True)
    check_reference(precomputed, model, settings, [TrainerEvaluator(precomputed)])
    with pytest.raises(NotImplementedError, match=named):  # another dataset's reference is computed at each call
        check_reference(precomputed, model, settings, [aggregate, TrainerEvaluator(precomputed, eval_dataset=[])])
    check_reference(trainer, model, settings, [aggregate, None])
    check_reference(SimpleNamespace(args=SimpleNamespace()), model, settings, [TrainerEvaluator(trainer)])  # SFT


def test_a_reference_from_the_disabled_adapter_keeps_the_rank_concatenated_candidates():
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(make_llama(), LoraConfig(r=2, target_modules=["q_proj"]))
    check_reference(dpo_like(), model, SearchSettings(), [TrainerEvaluator(dpo_like())])  # only the adapter moves
    check_reference(dpo_like(), make_llama(), SearchSettings(baselines=True), [TrainerEvaluator(dpo_like())])
