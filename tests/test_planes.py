"""The planes: the span and the merges written into live tensors, the trained weights put back bit for bit."""

import pytest
import torch
from conftest import dense_weights, load, logits, make_llama, perturbed
from torch.testing import assert_close
from transformers import AutoModelForCausalLM

from exme_callback.merges import Merge, merge_task_vectors
from exme_callback.planes import DensePlane, Plane, make_plane
from exme_callback.snapshots import trainable_tensors


def states(k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    make = lambda: {"w": torch.randn(6, 5, generator=g), "steps": torch.arange(3)}  # noqa: E731
    return make(), [make() for _ in range(k)]


# ---- make_plane on a plain model --------------------------------------------------------------------------------


def test_make_plane_on_a_plain_model_writes_the_span_of_three_checkpoints():
    model = make_llama()
    live = trainable_tensors(model)
    base = {n: t.clone() for n, t in live.items()}
    checkpoints = [perturbed(base, seed) for seed in (1, 2, 3)]
    trained = perturbed(base, 4)
    load(model, trained)

    plane = make_plane(model, base, checkpoints, trained)
    assert isinstance(plane, DensePlane)
    for coefficients in [(0.3, -0.5, 1.2), (0.0, 0.7, 0.0), (1.5, 0.0, 0.25)]:
        plane.apply(coefficients)
        for name, tensor in trainable_tensors(model).items():
            b = base[name].double()
            expected = b + sum(c * (ck[name].double() - b) for c, ck in zip(coefficients, checkpoints, strict=True))
            assert_close(tensor, expected.float(), rtol=1e-6, atol=1e-6, msg=name)

    plane.close()
    for name, tensor in trainable_tensors(model).items():
        assert torch.equal(tensor, trained[name]), name


# ---- DensePlane ---------------------------------------------------------------------------------------------------


def test_dense_plane_applies_a_merge_of_the_checkpoints_it_names_then_the_span_again():
    base, checkpoints = states()
    trained = {n: t.clone() for n, t in checkpoints[0].items()}
    live = {n: t.clone() for n, t in trained.items()}
    plane = DensePlane(live, base, checkpoints, trained)
    assert isinstance(plane, Plane)
    merge = Merge("ties", checkpoints=(2, 0), weights=(1.0, 1.0), density=0.5)
    plane.apply(merge)
    deltas = [c["w"] - base["w"] for c in checkpoints]
    assert_close(live["w"], base["w"] + merge([deltas[0], deltas[1], deltas[2]]), rtol=1e-6, atol=1e-6)
    assert torch.equal(live["steps"], checkpoints[0]["steps"])  # non-floating: copied, never merged
    plane.apply((0.0, 1.0, 0.0))
    assert torch.equal(live["w"], checkpoints[1]["w"])
    plane.close()
    assert all(torch.equal(live[n], trained[n]) for n in trained)


def test_dense_plane_draws_the_same_dare_masks_every_time_and_leaves_the_global_generator_alone():
    base, checkpoints = states()
    live = {n: torch.zeros_like(t) for n, t in base.items()}
    plane = DensePlane(live, base, checkpoints, base)
    merge = Merge("dare", checkpoints=(0, 1, 2), weights=(1 / 3, 1 / 3, 1 / 3), density=0.5, seed=3)
    torch.manual_seed(11)
    plane.apply(merge)
    first, after = live["w"].clone(), torch.rand(4)
    plane.apply(Merge("dare", checkpoints=(0, 1, 2), weights=(1 / 3, 1 / 3, 1 / 3), density=0.5, seed=4))
    assert not torch.equal(live["w"], first)  # another seed, other masks
    torch.manual_seed(11)
    plane.apply(merge)
    assert torch.equal(live["w"], first) and torch.equal(torch.rand(4), after)
    reference = {n: torch.zeros_like(t) for n, t in base.items()}
    merge_task_vectors(base, checkpoints, merge, reference)
    assert torch.equal(reference["w"], first)


def test_dense_plane_without_save_model_cannot_save(tmp_path):
    base, checkpoints = states(k=2)
    plane = DensePlane({n: t.clone() for n, t in base.items()}, base, checkpoints, base)
    with pytest.raises(ValueError, match="built without `save_model`"):
        plane.save(str(tmp_path))


# ---- LoRA merges off the span: TIES and DARE on each adapted module's dense delta -------------------------------


def lora_model():
    from peft import LoraConfig, get_peft_model

    return get_peft_model(make_llama(bias=True), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))


def plain_model(state_dict):
    reference = make_llama(bias=True)
    reference.load_state_dict(state_dict)
    return reference.eval()


def test_lora_ties_and_dare_baselines_against_a_dense_reference(tmp_path, tokenizer):
    from peft.utils import merge_utils

    model = lora_model()
    base = {n: t.clone() for n, t in trainable_tensors(model).items()}
    assert base and all("lora_" in n for n in base)
    sft1, sft2, trained = perturbed(base, 1), perturbed(base, 2), perturbed(base, 3)
    load(model, trained)
    before = logits(model, tokenizer)
    w0, w1, w2 = (dense_weights(model, t) for t in (base, sft1, sft2))
    assert not torch.equal(w1["model.layers.0.self_attn.q_proj.weight"], w0["model.layers.0.self_attn.q_proj.weight"])
    ties_weights = {}
    for key in w0:
        d1, d2 = w1[key] - w0[key], w2[key] - w0[key]
        ties_weights[key] = (
            w0[key] + merge_utils.ties([d1, d2], torch.ones(2), 0.5) if d1.is_floating_point() else w0[key]
        )
    ties_reference = logits(plain_model(ties_weights), tokenizer)
    c1, c2 = 0.5, 0.7
    span_reference = logits(
        plain_model({k: w0[k] + c1 * (w1[k] - w0[k]) + c2 * (w2[k] - w0[k]) for k in w0}), tokenizer
    )
    assert not torch.allclose(ties_reference, span_reference, rtol=1e-3, atol=1e-3)  # the checks can tell them apart

    plane = make_plane(model, base, [sft1, sft2], trained)
    try:
        ties = Merge("ties", (0, 1), (1.0, 1.0), 0.5)
        plane.apply(ties)
        assert_close(logits(model, tokenizer), ties_reference, rtol=1e-4, atol=1e-4)
        # Off the span is not low-rank: saved as the fused model, which computes what the live model does.
        assert plane.save(str(tmp_path / "ties")) == {"model": str(tmp_path / "ties")}
        saved = AutoModelForCausalLM.from_pretrained(tmp_path / "ties")
        assert_close(logits(saved, tokenizer), ties_reference, rtol=1e-4, atol=1e-4)

        # A point of the span next: the base layers are restored first.
        plane.apply((c1, c2))
        assert_close(logits(model, tokenizer), span_reference, rtol=1e-4, atol=1e-4)

        # DARE's random masks are seeded: the same candidate is the same model every time.
        dare = Merge("dare", (0, 1), (0.5, 0.5), 0.5)
        plane.apply(dare)
        first = logits(model, tokenizer)
        plane.apply(ties)
        plane.apply(dare)
        assert torch.equal(logits(model, tokenizer), first)
        assert not torch.allclose(first, ties_reference, rtol=1e-3, atol=1e-3)
        assert not torch.allclose(first, before, rtol=1e-3, atol=1e-3)
    finally:
        plane.close()
    assert torch.equal(logits(model, tokenizer), before)
    for name, tensor in trainable_tensors(model).items():
        assert torch.equal(tensor, trained[name]), name
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"


def test_dare_candidate_is_the_same_model_after_a_resume(tmp_path):
    from exme_callback.snapshots import SnapshotStore, load_state, save_state

    g = torch.Generator().manual_seed(0)
    base = {"weight": torch.randn(64, generator=g), "bias": torch.randn(64, generator=g)}  # not in sorted order
    sft1, sft2 = perturbed(base, 1, scale=1.0), perturbed(base, 2, scale=1.0)
    store = SnapshotStore("cpu", tmp_path / "store")
    for key, tensors in (("base", base), ("step-8", sft1), ("step-16", sft2)):
        store.save(key, tensors)
    save_state(store, str(tmp_path / "checkpoint-16"), {"metric": "eval_loss"}, ["base", "step-8", "step-16"])
    resumed = SnapshotStore("cpu", tmp_path / "resumed")
    load_state(resumed, str(tmp_path / "checkpoint-16"))

    dare = Merge("dare", (0, 1), (0.5, 0.5), 0.5)
    models = []
    for kept in (store, resumed):
        live = {name: torch.zeros(64) for name in base}
        plane = DensePlane(live, kept.load("base"), [kept.load("step-8"), kept.load("step-16")], base)
        plane.apply(dare)
        models.append(live)
    for name in base:
        assert torch.equal(models[0][name], models[1][name]), name
