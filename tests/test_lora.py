"""The LoRA plane: live logits equal a dense reference built independently with PEFT's `merge_and_unload`."""

import os

import pytest
import torch
from conftest import dense_weights, load, logits, make_llama, perturbed
from torch.testing import assert_close

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from exme_callback import merges  # noqa: E402
from exme_callback.lora import LoraPlane, check_peft_model, quiet_peft_save  # noqa: E402
from exme_callback.merges import Merge  # noqa: E402
from exme_callback.snapshots import trainable_tensors  # noqa: E402

CANDIDATES = [(1.0, 0.0), (0.0, 1.0), (1.3, 0.0), (0.0, 1.5), (0.36, 0.98), (0.0, 0.0)]


def lora_model(seed=0, **config):
    settings = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.1)
    settings.update(config)
    return get_peft_model(make_llama(seed, bias=True), LoraConfig(**settings))


def checkpoint(model, seed):
    """Trainable tensors as if trained: every trainable tensor moved randomly."""
    return perturbed(trainable_tensors(model), seed)


def dense_points(model, base, sft1, sft2):
    """The dense weights of the base and of the two checkpoints, taken before the plane changes the model."""
    return [dense_weights(model, t) for t in (base, sft1, sft2)]


def dense_reference(points, c1, c2):
    w0, w1, w2 = points
    reference = make_llama(bias=True)
    reference.load_state_dict(
        {
            k: (
                w0[k].double() + c1 * (w1[k].double() - w0[k].double()) + c2 * (w2[k].double() - w0[k].double())
            ).float()
            for k in w0
        }
    )
    return reference.eval()


@pytest.mark.parametrize(
    "config",
    [
        {},
        {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3}},
        {"modules_to_save": ["lm_head"], "bias": "lora_only"},
        {"target_modules": ["embed_tokens", "q_proj"], "bias": "all"},
        {"lora_bias": True},
    ],
    ids=["plain", "rslora-patterns", "modules_to_save-bias", "embedding-bias", "lora_bias"],
)
def test_candidates_equal_dense_reference(tokenizer, config):
    model = lora_model(**config)
    base = {n: t.clone() for n, t in trainable_tensors(model).items()}
    sft1, sft2 = checkpoint(model, 1), checkpoint(model, 2)
    trained = checkpoint(model, 3)
    load(model, trained)
    before = logits(model, tokenizer)
    points = dense_points(model, base, sft1, sft2)

    plane = LoraPlane(model, base, [sft1, sft2], trained)
    assert model.active_adapter == "exme"
    for c1, c2 in CANDIDATES:
        plane.apply((c1, c2))
        expected = logits(dense_reference(points, c1, c2), tokenizer)
        assert_close(logits(model, tokenizer), expected, rtol=1e-4, atol=1e-4)

    plane.close()
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(base)
    assert torch.equal(logits(model, tokenizer), before)
    for name, tensor in trainable_tensors(model).items():
        assert torch.equal(tensor, trained[name]), name


def test_non_zero_starting_adapter_is_a_third_block(tokenizer):
    model = lora_model(init_lora_weights="pissa")
    base = {n: t.clone() for n, t in trainable_tensors(model).items()}
    assert any(torch.count_nonzero(t) for n, t in base.items() if "lora_B" in n)
    sft1, sft2 = checkpoint(model, 1), checkpoint(model, 2)
    points = dense_points(model, base, sft1, sft2)
    plane = LoraPlane(model, base, [sft1, sft2], base)
    assert model.peft_config["exme"].r == 3 * 4
    for c1, c2 in [(0.0, 0.0), (0.36, 0.98), (1.5, 0.0)]:
        plane.apply((c1, c2))
        expected = logits(dense_reference(points, c1, c2), tokenizer)
        assert_close(logits(model, tokenizer), expected, rtol=1e-4, atol=1e-4)
    plane.close()


@pytest.mark.parametrize("config", [{"modules_to_save": ["lm_head"]}, {"lora_bias": True}], ids=["mts", "lora_bias"])
def test_saved_adapter_and_merged_model_reload_to_the_same_logits(tmp_path, tokenizer, config):
    model = lora_model(**config)
    base = {n: t.clone() for n, t in trainable_tensors(model).items()}
    sft1, sft2 = checkpoint(model, 1), checkpoint(model, 2)
    plane = LoraPlane(model, base, [sft1, sft2], base)
    plane.apply((0.6, 0.55))
    live = logits(model, tokenizer)
    plane.save_adapter(str(tmp_path))
    plane.save_merged(str(tmp_path / "merged"))
    plane.close()

    assert {"adapter_config.json", "adapter_model.safetensors", "merged"} <= set(os.listdir(tmp_path))
    assert not os.path.exists(tmp_path / ".adapter")
    reloaded = PeftModel.from_pretrained(make_llama(bias=True), str(tmp_path))
    assert reloaded.peft_config["default"].r == 8
    assert_close(logits(reloaded, tokenizer), live, rtol=1e-5, atol=1e-5)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert_close(logits(merged, tokenizer), live, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "config",
    [{"use_dora": True}, {"use_dora": True, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}],
    ids=["dora", "dora-mixed"],
)
def test_dora_candidates_are_dense_effective_weights(tmp_path, tokenizer, config):
    model = lora_model(**config)
    base = {n: t.clone() for n, t in trainable_tensors(model).items()}
    sft1, sft2, trained = checkpoint(model, 1), checkpoint(model, 2), checkpoint(model, 3)
    load(model, trained)
    before, weights_before = logits(model, tokenizer), {k: v.clone() for k, v in model.state_dict().items()}
    points = dense_points(model, base, sft1, sft2)
    plane = LoraPlane(model, base, [sft1, sft2], trained)
    assert not plane.exact_adapter
    for c1, c2 in [(1.0, 0.0), (0.0, 1.0), (0.36, 0.98), (1.4, 0.0)]:
        plane.apply((c1, c2))
        expected = logits(dense_reference(points, c1, c2), tokenizer)
        assert_close(logits(model, tokenizer), expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="use `save_merged`"):
        plane.save_adapter(str(tmp_path))
    plane.save_merged(str(tmp_path / "merged"))
    assert_close(
        logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged"), tokenizer),
        logits(model, tokenizer),
        rtol=1e-5,
        atol=1e-5,
    )
    plane.close()
    assert torch.equal(logits(model, tokenizer), before)
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in weights_before.items())


def test_unsupported_peft_set_ups_are_refused():
    with pytest.raises(NotImplementedError, match="supports LoRA among PEFT methods, got IA3"):
        check_peft_model(
            get_peft_model(make_llama(), peft.IA3Config(target_modules=["q_proj"], feedforward_modules=[]))
        )
    with pytest.raises(NotImplementedError, match="through `peft.PeftModel`"):
        check_peft_model(make_llama())


def test_quiet_peft_save_hides_only_the_missing_config_warning(tmp_path):
    import warnings

    model = get_peft_model(make_llama(seed=8), LoraConfig(r=2, target_modules=["q_proj"]))
    folder = tmp_path / "gguf_model"  # like a base model loaded from a GGUF file: no config.json
    folder.mkdir()
    model.peft_config["default"].base_model_name_or_path = str(folder)
    expected = f"Could not find a config file in {folder} - will assume that the vocabulary was not modified."

    def messages(caught):
        return [str(w.message) for w in caught]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.save_pretrained(tmp_path / "loud")
    assert expected in messages(caught)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with quiet_peft_save():
            model.save_pretrained(tmp_path / "quiet")
            warnings.warn("Could not find a config file in this other sentence.", UserWarning, stacklevel=1)
        warnings.warn(expected, UserWarning, stacklevel=1)  # after the block: shows again
    assert expected not in messages(caught)[:-1] and messages(caught)[-1] == expected
    assert "Could not find a config file in this other sentence." in messages(caught)
    assert (tmp_path / "quiet" / "adapter_model.safetensors").is_file()


def assert_trained_adapter_is_back(model, trained):
    assert list(model.peft_config) == ["default"] and model.active_adapter == "default"
    assert [n for n, p in model.named_parameters() if p.requires_grad] == list(trained)
    for name, tensor in trainable_tensors(model).items():
        assert torch.equal(tensor, trained[name]), name


@pytest.mark.parametrize("failure", ["merge-function", "lora-bias-without-base-bias"])
def test_a_merge_failing_midway_leaves_the_trained_adapter(tokenizer, monkeypatch, failure):
    """The merge loads each checkpoint into the trained adapter, module by module: an error in the middle (the
    merge function, or LoRA biases on a base layer without a bias) must leave the trained tensors, bit for bit."""
    if failure == "merge-function":
        model = lora_model()
    else:  # a base model without biases
        model = get_peft_model(make_llama(), LoraConfig(r=4, target_modules=["q_proj", "v_proj"], lora_bias=True))
    base = {n: t.clone() for n, t in trainable_tensors(model).items()}
    sft1, sft2, trained = checkpoint(model, 1), checkpoint(model, 2), checkpoint(model, 3)
    load(model, trained)
    before = logits(model, tokenizer)
    calls = []

    def failing(task_vectors, weights, density):
        calls.append(len(task_vectors))
        if len(calls) == 3:  # the third adapted module
            raise RuntimeError("the merge broke")
        return sum(task_vectors)

    monkeypatch.setitem(merges.MERGES, "ties", failing)
    plane = LoraPlane(model, base, [sft1, sft2], trained)
    error = RuntimeError if failure == "merge-function" else NotImplementedError
    with pytest.raises(error, match="the merge broke" if failure == "merge-function" else "needs a base layer with"):
        plane.apply(Merge("ties", checkpoints=(0, 1), weights=(1.0, 1.0), density=0.5))
    parameters = dict(model.named_parameters())
    assert all(torch.equal(parameters[name], tensor) for name, tensor in trained.items())  # already, before close
    plane.close()
    assert_trained_adapter_is_back(model, trained)
    assert torch.equal(logits(model, tokenizer), before)


@pytest.mark.parametrize("where", ["dora-effective-weights", "after-the-exme-adapter"])
def test_a_failing_constructor_leaves_the_trained_adapter(tokenizer, monkeypatch, where):
    """Building the plane changes the model (DoRA's effective weights load every checkpoint into the trained adapter
    and merge it; then the "exme" adapter is added): an error on the way must leave the trained model."""
    from peft.tuners.lora import LoraLayer

    model = lora_model(use_dora=True, target_modules=["q_proj", "v_proj"])
    base = {n: t.clone() for n, t in trainable_tensors(model).items()}
    sft1, sft2, trained = checkpoint(model, 1), checkpoint(model, 2), checkpoint(model, 3)
    load(model, trained)
    before, weights_before = logits(model, tokenizer), {k: v.clone() for k, v in model.state_dict().items()}
    if where == "dora-effective-weights":
        layer_class = type(model.base_model.model.model.layers[0].self_attn.q_proj)
        assert issubclass(layer_class, LoraLayer)
        merge, calls = layer_class.merge, []

        def failing_merge(self, *args, **kwargs):
            merge(self, *args, **kwargs)
            calls.append(1)
            if len(calls) == 4:  # the first checkpoint's second module, once merged into its base weight
                raise RuntimeError("the merge broke")

        monkeypatch.setattr(layer_class, "merge", failing_merge)
    else:

        def failing_match(self, *args):
            raise RuntimeError("the merge broke")

        monkeypatch.setattr(LoraPlane, "_match_dense", failing_match)
    with pytest.raises(RuntimeError, match="the merge broke"):
        LoraPlane(model, base, [sft1, sft2], trained)
    assert_trained_adapter_is_back(model, trained)
    assert torch.equal(logits(model, tokenizer), before)
    after = model.state_dict()
    assert after.keys() == weights_before.keys() and all(torch.equal(after[k], v) for k, v in weights_before.items())
