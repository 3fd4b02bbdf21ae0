"""Model kinship from the Gram matrix against a direct float64 computation on flattened task vectors."""

import json
import math

import pytest
import torch
from conftest import dense_weights, make_llama
from torch.testing import assert_close

from exme_callback import kinship
from exme_callback.kinship import METRICS, LoraModule, dense_gram, lora_gram
from exme_callback.planes import DensePlane
from exme_callback.snapshots import trainable_tensors

POINTS = [((1.0, 0.0, 0.0), (0.0, 1.0, 0.0)), ((1.2, 0.0, 0.0), (0.0, 0.0, 1.3)), ((0.6, 0.55, 0.0), (0.2, 0.1, 0.9))]


def direct(u: torch.Tensor, v: torch.Tensor, metric: str) -> float:
    """The kinship paper's metrics on two flattened task vectors, in float64."""
    if metric == "cosine":
        return float(u @ v / (u.norm() * v.norm()))
    if metric == "euclidean":
        return float((u - v).norm())
    return float(torch.corrcoef(torch.stack([u, v]))[0, 1])


def flat(deltas: list[torch.Tensor], c) -> torch.Tensor:
    return sum(ci * d for ci, d in zip(c, deltas, strict=True))


def random_states(seed=0, k=3):
    g = torch.Generator().manual_seed(seed)
    shapes = {"w": (5, 4), "b": (4,), "e": (3, 2, 2)}
    base = {n: torch.randn(s, generator=g, dtype=torch.float64) for n, s in shapes.items()}
    base["steps"] = torch.tensor(3)  # an integer buffer: not part of a task vector
    checkpoints = []
    for i in range(k):
        shift = torch.randn(1, generator=g, dtype=torch.float64)  # non-zero means: Pearson differs from cosine
        checkpoint = {
            n: t + 0.3 * torch.randn(t.shape, generator=g, dtype=torch.float64) + shift
            for n, t in base.items()
            if n != "steps"
        }
        checkpoint["steps"] = torch.tensor(4 + i)
        checkpoints.append({n: checkpoint[n].float() if n != "steps" else checkpoint[n] for n in base})
    base = {n: t.float() if t.is_floating_point() else t for n, t in base.items()}
    return base, checkpoints


@pytest.mark.parametrize("chunk", [1 << 22, 7], ids=["one-chunk", "chunked"])
def test_dense_kinship_equals_a_direct_computation(monkeypatch, chunk):
    monkeypatch.setattr(kinship, "_CHUNK", chunk)
    base, checkpoints = random_states()
    gram = dense_gram(base, checkpoints)
    names = ["w", "b", "e"]
    deltas = [torch.cat([(c[n].double() - base[n].double()).flatten() for n in names]) for c in checkpoints]
    assert gram.numel == sum(base[n].numel() for n in names)
    for a, b in POINTS:
        for metric in METRICS:
            expected = direct(flat(deltas, a), flat(deltas, b), metric)
            assert gram.kinship(a, b, metric) == pytest.approx(expected, rel=1e-9, abs=1e-12), (a, b, metric)
    matrix = gram.matrix("euclidean")
    assert [matrix[i][i] for i in range(3)] == [0.0] * 3
    assert gram.matrix("cosine")[0][0] == pytest.approx(1.0)


def test_merged_pairs_are_sft_and_expo_pairs_computed_directly():
    base, checkpoints = random_states()
    names = ["w", "b", "e"]
    deltas = [torch.cat([(c[n].double() - base[n].double()).flatten() for n in names]) for c in checkpoints]
    gram = dense_gram(base, checkpoints)
    sft, expo = gram.merged_pairs((0.2, 0.5))
    assert (sft["models"], sft["a"], sft["b"]) == ("SFT-1 / SFT-2", [1.0, 0.0, 0.0], [0.0, 1.0, 0.0])
    assert (expo["a"], expo["b"]) == ([1.2, 0.0, 0.0], [0.0, 1.5, 0.0])
    assert expo["models"] == "EXPO-1 (alpha1=0.2) / EXPO-2 (alpha2=0.5)"
    for pair in (sft, expo):
        for metric in METRICS:
            expected = direct(flat(deltas, pair["a"]), flat(deltas, pair["b"]), metric)
            assert pair[metric] == pytest.approx(expected, rel=1e-9, abs=1e-12)
    assert [p["models"] for p in gram.merged_pairs()] == ["SFT-1 / SFT-2"]  # no ExMe merge scored
    assert dense_gram(base, checkpoints[:1]).merged_pairs((0.1, 0.1)) == []  # one checkpoint: no pair


def test_lora_gram_equals_dense_deltas_with_and_without_a_starting_adapter():
    g = torch.Generator().manual_seed(1)
    modules, deltas = [], [[], []]
    for out_features, in_features, rank, with_base in [(6, 5, 2, False), (4, 7, 3, True)]:
        factors = [
            (torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g))
            for _ in range(2)
        ]
        start = (torch.randn(out_features, rank, generator=g), torch.randn(rank, in_features, generator=g))
        scaling = 1.7
        modules.append(LoraModule(scaling, factors, start if with_base else None))
        for i, (b, a) in enumerate(factors):
            delta = scaling * (b.double() @ a.double())
            if with_base:
                delta -= scaling * (start[0].double() @ start[1].double())
            deltas[i].append(delta.flatten())
    gram = lora_gram(modules)
    vectors = [torch.cat(d) for d in deltas]
    for a, b in [((1.0, 0.0), (0.0, 1.0)), ((0.4, 1.3), (1.1, -0.2))]:
        for metric in METRICS:
            assert gram.kinship(a, b, metric) == pytest.approx(
                direct(flat(vectors, a), flat(vectors, b), metric), rel=1e-9
            )


@pytest.mark.parametrize("counts", [(2, 3), (3, 2), (2, 2, 1)])
def test_lora_gram_refuses_modules_with_different_numbers_of_checkpoints(counts):
    g = torch.Generator().manual_seed(2)
    modules = [
        LoraModule(1.0, [(torch.randn(4, 2, generator=g), torch.randn(2, 3, generator=g)) for _ in range(k)])
        for k in counts
    ]
    position = next(i for i, k in enumerate(counts) if k != counts[0])
    expected = rf"`modules\[{position}\]` has {counts[position]} checkpoints but `modules\[0\]` has {counts[0]}"
    with pytest.raises(ValueError, match=expected):
        lora_gram(modules)
    with pytest.raises(ValueError, match="`modules` is empty"):
        lora_gram([])


def test_dense_plane_gram_and_errors():
    base, checkpoints = random_states(k=2)
    live = {n: t.clone() for n, t in base.items()}
    plane = DensePlane(live, base, checkpoints, base)
    assert_close(plane.gram().inner, dense_gram(base, checkpoints).inner)
    with pytest.raises(KeyError, match="`w` is missing from checkpoint 1"):
        dense_gram(base, [checkpoints[0], {n: t for n, t in checkpoints[1].items() if n != "w"}])
    with pytest.raises(ValueError, match=r"`b` has shape \(5,\) in checkpoint 0 but \(4,\)"):
        dense_gram(base, [{**checkpoints[0], "b": torch.zeros(5)}])
    with pytest.raises(ValueError, match="`metric` must be one of"):
        plane.gram().kinship((1, 0), (0, 1), "manhattan")
    with pytest.raises(ValueError, match="one coefficient per kept checkpoint"):
        plane.gram().kinship((1, 0, 0), (0, 1), "cosine")
    assert math.isnan(dense_gram(base, [base, base]).kinship((1, 0), (0, 1), "cosine"))  # zero task vectors


@pytest.mark.parametrize(
    "config",
    [{}, {"modules_to_save": ["lm_head"], "bias": "lora_only"}, {"init_lora_weights": "pissa"}],
    ids=["plain", "modules_to_save-bias", "pissa"],
)
def test_lora_plane_gram_equals_peft_dense_deltas(config):
    peft = pytest.importorskip("peft")
    from exme_callback.lora import LoraPlane

    model = peft.get_peft_model(
        make_llama(0, bias=True), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], **config)
    )
    base = {n: t.clone() for n, t in trainable_tensors(model).items()}
    g = torch.Generator().manual_seed(5)
    checkpoints = [{n: t + 0.2 * torch.randn(t.shape, generator=g) for n, t in base.items()} for _ in range(2)]

    def dense(tensors):  # the model with `tensors` in its adapter, merged by PEFT
        return {k: v.double() for k, v in dense_weights(model, tensors).items()}

    w0, w1, w2 = dense(base), dense(checkpoints[0]), dense(checkpoints[1])
    changed = [k for k in w0 if not (torch.equal(w1[k], w0[k]) and torch.equal(w2[k], w0[k]))]
    deltas = [torch.cat([(w[k] - w0[k]).flatten() for k in changed]) for w in (w1, w2)]

    plane = LoraPlane(model, base, checkpoints, base)
    gram = plane.gram()
    plane.close()
    assert gram.numel == deltas[0].numel()  # the adapted weights and the other trainable tensors, whole
    for a, b in [((1.0, 0.0), (0.0, 1.0)), ((1.2, 0.0), (0.0, 1.1)), ((0.6, 0.55), (0.3, 0.2))]:
        for metric in METRICS:
            expected = direct(flat(deltas, a), flat(deltas, b), metric)
            assert gram.kinship(a, b, metric) == pytest.approx(expected, rel=1e-4, abs=1e-6), (a, b, metric)


@pytest.mark.slow
def test_exme_kinship_command(tmp_path, capsys):
    from exme_callback.cli import main

    base = make_llama(0)
    base.save_pretrained(tmp_path / "base")
    g = torch.Generator().manual_seed(2)
    folders = []
    for i in range(3):
        model = make_llama(0)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.05 * torch.randn(p.shape, generator=g))
        model.save_pretrained(tmp_path / f"c{i}")
        folders.append(str(tmp_path / f"c{i}"))
    capsys.readouterr()  # what saving printed (DeepSpeed's first import logs to stdout)
    assert main(["kinship", str(tmp_path / "base"), *folders, "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    reference = {n: t.double() for n, t in base.state_dict().items()}
    states = [make_llama(0).__class__.from_pretrained(f).state_dict() for f in folders]
    deltas = [torch.cat([(s[n].double() - reference[n]).flatten() for n in reference]) for s in states]
    for metric in METRICS:
        for i in range(3):
            for j in range(3):
                assert printed[metric][i][j] == pytest.approx(direct(deltas[i], deltas[j], metric), rel=1e-6, abs=1e-9)
    assert main(["kinship", str(tmp_path / "base"), *folders[:2], "--metric", "cosine"]) == 0
    assert "cosine:" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_info:
        main(["kinship", str(tmp_path / "base"), folders[0]])
    assert exit_info.value.code == 2
