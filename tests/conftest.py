"""Tiny models, tokenizers and datasets built in-process: the tests never touch the network."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel, TrainingArguments

WORDS = "the a cat dog sat ran on under mat log red blue big small and is was".split()


class RegressionConfig(PretrainedConfig):
    model_type = "exme-regression"

    def __init__(self, a: float = 0.0, b: float = 0.0, **kwargs):
        self.a, self.b = a, b
        super().__init__(**kwargs)


class RegressionModel(PreTrainedModel):
    """`y = a * x + b`: two scalars, so every candidate of the plane has closed-form weights."""

    config_class = RegressionConfig

    def __init__(self, config: RegressionConfig):
        super().__init__(config)
        self.a = nn.Parameter(torch.tensor(float(config.a)))
        self.b = nn.Parameter(torch.tensor(float(config.b)))
        self.post_init()

    def _init_weights(self, module):
        pass

    def forward(self, input_x, labels=None):
        y = self.a * input_x + self.b
        loss = None if labels is None else nn.functional.mse_loss(y, labels)
        return {"loss": loss, "logits": y}


class RegressionDataset(torch.utils.data.Dataset):
    """`y = 2 x + 3` plus fixed noise."""

    def __init__(self, n: int = 64, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, generator=generator)
        self.y = 2.0 * self.x + 3.0 + 0.1 * torch.randn(n, generator=generator)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_x": self.x[i], "labels": self.y[i]}


def regression_args(output_dir, **overrides) -> TrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        per_device_eval_batch_size=16,
        learning_rate=0.05,
        num_train_epochs=4,
        eval_strategy="steps",
        eval_steps=8,
        save_strategy="no",
        logging_steps=4,
        report_to=[],
        disable_tqdm=True,
        use_cpu=True,
        seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def make_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>", "<unk>", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def make_llama(seed: int = 0, bias: bool = False, **config):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        vocab_size=len(WORDS) + 3,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
        attention_bias=bias,
        mlp_bias=bias,
    )
    return LlamaForCausalLM(LlamaConfig(**{**settings, **config}))


def make_texts(n: int, seed: int) -> list[str]:
    generator = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        adjective, noun = (
            WORDS[9 + int(torch.randint(4, (1,), generator=generator))],
            WORDS[2 + int(torch.randint(2, (1,), generator=generator))],
        )
        texts.append(f"the {adjective} {noun} sat on the mat and the {noun} was {adjective}")
    return texts


def perturbed(tensors, seed: int, scale: float = 0.2) -> dict:
    """Random tensors of the same names and shapes: a checkpoint as if trained."""
    generator = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=generator) for n, t in tensors.items()}


def load(model, tensors) -> None:
    """Copy `tensors` into the model's parameters of the same names."""
    with torch.no_grad():
        parameters = dict(model.named_parameters())
        for name, tensor in tensors.items():
            parameters[name].copy_(tensor)


def dense_weights(model, tensors) -> dict:
    """The plain model that a PEFT model with `tensors` loaded into its trained adapter ("default") is, through
    PEFT's own merge of that adapter only (a plane may have added and activated its own)."""
    import copy

    twin = copy.deepcopy(model)
    load(twin, tensors)
    return {k: v.detach().clone() for k, v in twin.merge_and_unload(adapter_names=["default"]).state_dict().items()}


def logits(model, tokenizer):
    """The model's logits on four fixed texts, in eval mode."""
    batch = tokenizer(make_texts(4, seed=3), return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(autouse=True)
def ieee_float32_matmuls():
    """Float32 matmuls in full precision for every test: the tests compare float32 results with references at
    float32's tolerances, and a process set to `torch.set_float32_matmul_precision("medium")` (or oneDNN's bf16
    mode) computes them in bf16 on CPUs that have it (3e-5 apart in the QLoRA logits)."""
    torch.set_float32_matmul_precision("highest")
    torch.backends.mkldnn.matmul.fp32_precision = "ieee"


@pytest.fixture
def regression():
    """A fresh regression model, its training and evaluation data."""
    return RegressionModel(RegressionConfig()), RegressionDataset(64, seed=0), RegressionDataset(32, seed=1)


@pytest.fixture
def tokenizer():
    return make_tokenizer()


def write_lm_eval_tasks(folder, prefix: str = "toy", kinds=("choice", "generate")) -> list[str]:
    """lm-eval tasks over local jsonl files, written into `folder`: a multiple-choice task (8 documents), a
    generate_until task (4) and, among `kinds`, a loglikelihood_rolling task (5 texts of 13 to 78 words, so the
    longest take several windows of a model with 32 or 64 positions)."""
    import json

    import yaml

    folder.mkdir(parents=True, exist_ok=True)
    pairs = [(a, n) for a in ("red", "blue", "big", "small") for n in ("cat", "dog")]
    rows = {
        "choice": [
            {"q": f"the {a} {n} sat on the", "choices": ["mat", "log", "dog"], "label": i % 2}
            for i, (a, n) in enumerate(pairs)
        ],
        "generate": [{"q": f"the {a} cat sat on the", "answer": "mat"} for a in ("red", "blue", "big", "small")],
        "rolling": [{"q": "", "text": " ".join(make_texts(n, seed=n))} for n in (1, 3, 6, 2, 5)],
    }
    specific = {
        "choice": {
            "output_type": "multiple_choice",
            "doc_to_choice": "{{choices}}",
            "doc_to_target": "label",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        },
        "generate": {
            "output_type": "generate_until",
            "doc_to_target": " {{answer}}",
            "generation_kwargs": {"until": ["<eos>"], "max_gen_toks": 3, "do_sample": False},
            "metric_list": [{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True}],
        },
        "rolling": {
            "output_type": "loglikelihood_rolling",
            "doc_to_target": "{{text}}",
            "metric_list": [
                {"metric": "word_perplexity", "aggregation": "weighted_perplexity", "higher_is_better": False}
            ],
        },
    }
    for kind in kinds:
        data = folder / f"{prefix}_{kind}.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in rows[kind]))
        config = {
            "task": f"{prefix}_{kind}",
            "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}},
            "test_split": "test",
            "doc_to_text": "{{q}}",
            **specific[kind],
        }
        (folder / f"{prefix}_{kind}.yaml").write_text(yaml.safe_dump(config))
    return [f"{prefix}_{kind}" for kind in kinds]


SEQUENCE_VOCAB = 32


def make_sequence_llama():
    """A tiny Llama whose every tensor splits evenly over two ranks (for the sharded runs)."""
    return make_llama(
        vocab_size=SEQUENCE_VOCAB, num_key_value_heads=2, max_position_embeddings=32, tie_word_embeddings=False
    )


def sequences(seed: int, rows: int) -> torch.Tensor:
    """Token sequences that follow `x -> 3x + 1 (mod 32)` from a random start: learnable in a few steps."""
    start = torch.randint(0, SEQUENCE_VOCAB, (rows, 1), generator=torch.Generator().manual_seed(seed))
    powers = 3 ** torch.arange(12)
    return (start * powers + (powers - 1) // 2) % SEQUENCE_VOCAB


def log_report_writes(output_dir, rank: int) -> None:
    """Make every `Report.write` of this process append its rank to `<output_dir>/writes.txt` (which ranks wrote)."""
    from exme_callback.report import Report

    write = Report.write

    def logged_write(self, directory):
        with open(os.path.join(output_dir, "writes.txt"), "a") as f:
            f.write(f"{rank}\n")
        write(self, directory)

    Report.write = logged_write
