"""The LoRA plane: live logits equal a dense reference built independently with PEFT's `merge_and_unload`."""

import json
import os

import pytest
import torch
from conftest import dense_weights, load, logits, make_llama, make_texts, perturbed
from safetensors.torch import load_file
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


# ---- QLoRA: a LoRA adapter on a 4-bit or 8-bit bitsandbytes base -------------------------------------------------

QUANTIZATION = {"4bit": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}, "8bit": {"load_in_8bit": True}}
QLORA = {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]}


def load_quantized(folder, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**QUANTIZATION[bits]))


def plain_4bit_kernel(monkeypatch):
    """Make bitsandbytes use its plain 4-bit CPU kernel. The one for AVX512-BF16 CPUs repacks the weights at the first
    evaluation and unpacks them at every `state_dict()` (a checkpoint save), and its outputs shift each time (by up to
    0.02 in these logits with bitsandbytes 0.50.2): the tests that compare scores across saves do without it."""
    bitsandbytes = pytest.importorskip("bitsandbytes")
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)


def quantized_llama(folder, bits, dtype=torch.float32, bias=True, **save):
    """A tiny Llama saved to `folder` (the unquantized base), loaded back quantized by bitsandbytes. Its linear layers
    have multiples of 32 outputs, which bitsandbytes' 4-bit CPU kernels need."""
    make_llama(bias=bias, hidden_size=64, intermediate_size=128).to(dtype).save_pretrained(folder, **save)
    return load_quantized(folder, bits)


def scaled_adapters(model, points, coefficients):
    """`model` (a quantized base) with each point's adapter loaded under its own name, its scaling times `c_i`, all
    of them active together: `W x + sum_i c_i * s * B_i A_i x` through PEFT's own forward."""
    from peft.tuners.lora import LoraLayer

    names = [f"sft{i}" for i in range(len(points))]
    model = get_peft_model(model, LoraConfig(**QLORA), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, LoraConfig(**QLORA))
    for name, point, c in zip(names, points, coefficients, strict=True):
        load(model, {key.replace(".default.", f".{name}."): tensor for key, tensor in point.items()})
        for layer in model.modules():
            if isinstance(layer, LoraLayer):
                layer.scaling[name] *= c
    model.base_model.set_adapter(names)
    return model


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_qlora_saved_adapter_equals_the_checkpoints_adapters_scaled(tmp_path, tokenizer, bits):
    model = get_peft_model(quantized_llama(tmp_path / "base", bits), LoraConfig(**QLORA))
    base = {n: t.clone() for n, t in trainable_tensors(model).items()}
    sft1, sft2 = checkpoint(model, 1), checkpoint(model, 2)
    plane = LoraPlane(model, base, [sft1, sft2], base)
    c = (0.6 * 1.2, 0.4 * 1.3)  # ExMe: alphas 0.2 / 0.3, beta 0.6
    plane.apply(c)
    live = logits(model, tokenizer)
    plane.save_adapter(str(tmp_path / "exme"))
    plane.close()

    expected = logits(scaled_adapters(load_quantized(tmp_path / "base", bits), [sft1, sft2], c), tokenizer)
    reloaded = PeftModel.from_pretrained(load_quantized(tmp_path / "base", bits), str(tmp_path / "exme"))
    assert_close(logits(reloaded, tokenizer), expected, rtol=1e-5, atol=1e-5)
    assert_close(live, expected, rtol=1e-5, atol=1e-5)


def fused_reference(base_dir, base, points, c):
    """The unquantized base's tensors plus `c1 * d1 + c2 * d2`, in float64 from the adapters' own factors, where
    `d_i` is `s * (B_i A_i - B_0 A_0)` for an adapted weight and `s * (b_i - b_0)` for its `lora_bias`. A dense
    trainable tensor (`modules_to_save`, biases) is the live model's: `t_0 + sum_i c_i (t_i - t_0)` in its dtype."""
    from exme_callback.io import safetensors_files

    files = safetensors_files(str(base_dir))
    unquantized = {name: load_file(path)[name] for name, path in files.items()}
    prefix, s = "base_model.model.", QLORA["lora_alpha"] / QLORA["r"]
    names = {
        key: key.removeprefix(prefix).replace(".base_layer", "").replace(".modules_to_save.default", "")
        for key in base
    }
    expected = {name: tensor.double() for name, tensor in unquantized.items()}
    for key, name in names.items():
        if ".lora_" not in key:
            dense = base[key].double() + sum(
                ci * (p[key].double() - base[key].double()) for ci, p in zip(c, points, strict=True)
            )
            expected[name] = dense.to(base[key].dtype).double()
    for key, name in names.items():
        if ".lora_A." in key:
            b_key = key.replace(".lora_A.", ".lora_B.")
            deltas = [s * p[b_key].double() @ p[key].double() for p in (base, *points)]
        elif ".lora_B." in key and key.endswith(".bias"):
            deltas = [s * p[key].double() for p in (base, *points)]
        else:
            continue
        target = name.split(".lora_")[0] + (".weight" if ".lora_A." in key else ".bias")
        expected[target] += sum(ci * (d - deltas[0]) for ci, d in zip(c, deltas[1:], strict=True))
    return unquantized, {name: tensor.to(unquantized[name].dtype) for name, tensor in expected.items()}


@pytest.mark.parametrize(
    "bits, dtype, save",
    [("4bit", torch.float32, {}), ("8bit", torch.float32, {}), ("4bit", torch.bfloat16, {"max_shard_size": "40KB"})],
    ids=["4bit", "8bit", "4bit-bfloat16-sharded"],
)
def test_qlora_fused_model_is_the_unquantized_base_plus_the_deltas(tmp_path, tokenizer, bits, dtype, save):
    from exme_callback.io import safetensors_files

    base_dir = tmp_path / "base"
    config = {**QLORA, "modules_to_save": ["lm_head"], "lora_bias": True, "bias": "all"}
    model = get_peft_model(quantized_llama(base_dir, bits, dtype, **save), LoraConfig(**config))
    base = {n: t.clone() for n, t in trainable_tensors(model).items()}
    sft1, sft2 = checkpoint(model, 1), checkpoint(model, 2)
    plane = LoraPlane(model, base, [sft1, sft2], base, save_merged=True)
    c = (0.72, 0.52)
    plane.apply(c)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    saved = plane.save(str(tmp_path / "exme"))
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())  # only read
    plane.close()

    unquantized, expected = fused_reference(base_dir, base, [sft1, sft2], c)
    merged = tmp_path / "exme" / "merged"
    assert saved == {"adapter": str(tmp_path / "exme"), "merged": str(merged)}
    files = safetensors_files(str(merged))
    assert {n: os.path.basename(p) for n, p in files.items()} == {
        n: os.path.basename(p) for n, p in safetensors_files(str(base_dir)).items()
    }  # the base's own files, names and shards
    fused = {name: load_file(path)[name] for name, path in files.items()}
    changed = {name for name in fused if not torch.equal(fused[name], unquantized[name])}
    assert changed == {name for name in expected if not torch.equal(expected[name], unquantized[name])}
    biases = {"k_proj", "o_proj", "gate_proj", "up_proj"}  # trained (`bias="all"`), not adapted
    assert {name.split(".")[-2] for name in changed} == {*QLORA["target_modules"], *biases, "lm_head"}
    for name, tensor in fused.items():
        assert tensor.dtype == dtype
        assert_close(tensor, expected[name], msg=lambda m, name=name: f"{name}: {m}")
    reloaded = AutoModelForCausalLM.from_pretrained(merged)
    assert "quantization_config" not in reloaded.config.to_dict() and reloaded.dtype == dtype
    assert (merged / "generation_config.json").is_file()
    state = reloaded.state_dict()  # a plain model folder, holding the fused tensors
    assert all(torch.equal(state[name], tensor) for name, tensor in fused.items())


def qlora_model(tmp_path, bias=True):
    """A LoRA adapter on a 4-bit base loaded from `tmp_path / "base"`, which it records as its base. (Training needs
    `bias=False`: bitsandbytes' 4-bit CPU kernel adds a bias in place, which autograd refuses after an evaluation.)"""
    return get_peft_model(quantized_llama(tmp_path / "base", "4bit", bias=bias), LoraConfig(**QLORA))


def test_qlora_fused_save_finds_its_base_before_training_or_refuses(tmp_path, monkeypatch):
    import huggingface_hub

    from exme_callback.fusing import unquantized_base
    from exme_callback.preflight import check_model

    model = qlora_model(tmp_path)
    assert unquantized_base(model).folder == str(tmp_path / "base")  # the folder it was loaded from
    check_model(model, save_merged=True)
    moved = tmp_path / "moved"
    os.rename(tmp_path / "base", moved)
    check_model(model)  # without save_merged the base is not needed
    with pytest.raises(FileNotFoundError, match=r"but '.*base' is neither a folder nor a model in the local .*"
                       r"Pass `base_model=` \(`--base` to `exme`\)"):  # fmt: skip
        check_model(model, save_merged=True)
    check_model(model, save_merged=True, base_model=str(moved))

    # A model id resolves in the local Hugging Face cache, offline.
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / "abc123"
    os.makedirs(snapshot.parent)
    os.makedirs(snapshot.parent.parent / "refs")
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    os.rename(moved, snapshot)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert unquantized_base(model, "org/tiny").folder == str(snapshot)
    check_model(model, save_merged=True, base_model="org/tiny")
    with pytest.raises(FileNotFoundError, match="'org/other' is neither a folder nor a model in the local"):
        check_model(model, save_merged=True, base_model="org/other")

    # Weights that are not the unquantized base's.
    config = json.loads((snapshot / "config.json").read_text())
    (snapshot / "config.json").write_text(json.dumps({**config, "quantization_config": {"load_in_4bit": True}}))
    with pytest.raises(FileNotFoundError, match="are quantized themselves"):
        check_model(model, save_merged=True, base_model=str(snapshot))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"never unpickled")
    with pytest.raises(FileNotFoundError, match=f"{pickled} has no safetensors weights"):
        check_model(model, save_merged=True, base_model=str(pickled))


def test_qlora_base_of_another_model_is_refused_naming_the_tensor(tmp_path):
    from safetensors.torch import save_file

    from exme_callback.preflight import check_model

    model = qlora_model(tmp_path)
    other = tmp_path / "other"
    make_llama(bias=True, hidden_size=64, intermediate_size=96).save_pretrained(other)
    with pytest.raises(ValueError, match=r"`model.layers.0.mlp.gate_proj.weight` has shape \(96, 64\) in the unq"):
        check_model(model, save_merged=True, base_model=str(other))
    tensors = load_file(tmp_path / "base" / "model.safetensors")
    del tensors["model.layers.1.self_attn.v_proj.weight"]
    save_file(tensors, tmp_path / "base" / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(KeyError, match=r"has no tensor `model.layers.1.self_attn.v_proj.weight` \(the model's "
                       r"`model.layers.1.self_attn.v_proj.base_layer.weight`\)"):  # fmt: skip
        check_model(model, save_merged=True)


def test_qlora_set_ups_that_write_dense_weights_into_the_base_are_refused(tmp_path):
    from exme_callback.preflight import check_model
    from exme_callback.settings import SearchSettings

    model = qlora_model(tmp_path)
    for settings in (SearchSettings(baselines=True), SearchSettings(strategy="mixup", dare=0.5)):
        with pytest.raises(NotImplementedError, match="On a quantized base, neither `baselines=True` nor `dare=`"):
            check_model(model, settings=settings)
    check_model(model, settings=SearchSettings())
    dora = get_peft_model(load_quantized(tmp_path / "base", "8bit"), LoraConfig(**QLORA, use_dora=True))
    with pytest.raises(NotImplementedError, match="DoRA modules as dense weights, which a quantized base layer"):
        check_model(dora)
    with pytest.raises(NotImplementedError, match="cannot blend quantized weights"):
        check_model(load_quantized(tmp_path / "base", "4bit"))


def qlora_trainer(tmp_path, model, tokenizer, **args):
    """A `Trainer` of `model` on the tiny texts, evaluating and saving every 6 steps."""
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenize = lambda texts: Dataset.from_dict(dict(tokenizer(texts)))  # noqa: E731
    settings = dict(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=8,
        learning_rate=2e-2,
        max_steps=18,
        eval_strategy="steps",
        eval_steps=6,
        save_strategy="steps",
        save_steps=6,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    return Trainer(
        model=model,
        args=TrainingArguments(**{**settings, **args}),
        train_dataset=tokenize(make_texts(96, seed=0)),
        eval_dataset=tokenize(make_texts(16, seed=1)),
        data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False),
        processing_class=tokenizer,
    )


def test_qlora_run_without_its_unquantized_base_is_refused_before_training(tmp_path, tokenizer):
    import shutil

    from exme_callback import ExMeCallback

    model = qlora_model(tmp_path)
    shutil.rmtree(tmp_path / "base")
    trainer = qlora_trainer(tmp_path, model, tokenizer)
    trainer.add_callback(ExMeCallback(trainer, save_merged=True))
    with pytest.raises(FileNotFoundError, match="writes the fused model into the unquantized base's weights.*Pass "):
        trainer.train()
    assert trainer.state.global_step == 0


@pytest.mark.slow
def test_qlora_run_saves_the_adapter_and_the_fused_model_from_the_unquantized_base(tmp_path, tokenizer, monkeypatch):
    from exme_callback import ExMeCallback

    plain_4bit_kernel(monkeypatch)
    model = qlora_model(tmp_path, bias=False)
    os.rename(tmp_path / "base", tmp_path / "unquantized")  # found through `base_model=`, not the recorded folder
    trainer = qlora_trainer(tmp_path, model, tokenizer)
    callback = ExMeCallback(trainer, save_merged=True, base_model=tmp_path / "unquantized", alphas=(0.5,))
    trainer.add_callback(callback)
    trainer.train()
    report, exme = callback.report, tmp_path / "run" / "exme"
    assert report.saved == {"adapter": str(exme), "merged": str(exme / "merged")}

    # The fused model: the unquantized base plus c1 * d1 + c2 * d2, d_i from the kept checkpoints' adapters.
    c = report.final.coefficients
    assert any(c)
    checkpoints = [
        load_file(tmp_path / "run" / f"checkpoint-{k.step}" / "adapter_model.safetensors") for k in report.checkpoints
    ]
    unquantized = load_file(tmp_path / "unquantized" / "model.safetensors")
    fused = load_file(exme / "merged" / "model.safetensors")
    assert fused.keys() == unquantized.keys()
    scaling = QLORA["lora_alpha"] / QLORA["r"]
    for name, tensor in fused.items():
        expected = unquantized[name].double()
        module = "base_model.model." + name.removesuffix(".weight")
        if f"{module}.lora_A.weight" in checkpoints[0]:
            for ci, adapter in zip(c, checkpoints, strict=True):
                product = adapter[f"{module}.lora_B.weight"].double() @ adapter[f"{module}.lora_A.weight"].double()
                expected += ci * scaling * product
        assert_close(tensor, expected.float(), rtol=1e-6, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")
    changed = {name.split(".")[-2] for name in fused if not torch.equal(fused[name], unquantized[name])}
    assert changed == set(QLORA["target_modules"])

    # The adapter, on the 4-bit base, is the model the sweep scored.
    reloaded = PeftModel.from_pretrained(load_quantized(tmp_path / "unquantized", "4bit"), str(exme))
    loss = qlora_trainer(tmp_path / "check", reloaded, tokenizer).evaluate()["eval_loss"]
    assert_close(loss, report.final.metrics["eval_loss"], rtol=1e-5, atol=0)
