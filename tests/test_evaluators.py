import math

import pytest
import torch
from conftest import make_tokenizer, regression_args
from transformers import Trainer, TrainerCallback

from exme_callback.evaluators import TrainerEvaluator


def test_trainer_evaluator_is_silent(tmp_path, regression):
    model, train_data, eval_data = regression
    seen = []

    class Spy(TrainerCallback):
        def on_evaluate(self, args, state, control, **kwargs):
            seen.append("evaluate")

        def on_log(self, args, state, control, **kwargs):
            seen.append("log")

    trainer = Trainer(model=model, args=regression_args(tmp_path), eval_dataset=eval_data, callbacks=[Spy()])
    evaluator = TrainerEvaluator(trainer)
    history = list(trainer.state.log_history)
    metrics = evaluator(model)
    expected = torch.nn.functional.mse_loss(model.a.detach() * eval_data.x + model.b.detach(), eval_data.y)
    assert metrics["eval_loss"] == pytest.approx(expected.item(), rel=1e-6)
    assert seen == [] and trainer.state.log_history == history
    assert evaluator.reuses_training_scores and not TrainerEvaluator(trainer, eval_data).reuses_training_scores
    with pytest.raises(ValueError, match="its trainer's own model"):
        evaluator(torch.nn.Linear(1, 1))
    trainer.evaluate()
    assert seen == ["log", "evaluate"]  # the callbacks are back


@pytest.fixture(scope="module")
def lm_eval_tasks(tmp_path_factory):
    """Two lm-eval tasks over local files, and an evaluator of them (built once: indexing tasks takes seconds)."""
    pytest.importorskip("lm_eval")
    from conftest import make_tokenizer, write_lm_eval_tasks

    from exme_callback import LMEvalEvaluator

    folder = tmp_path_factory.mktemp("tasks")
    tasks = write_lm_eval_tasks(folder)
    return folder, LMEvalEvaluator(tasks, make_tokenizer(), include_path=str(folder), batch_size=4)


def test_lm_eval_multiple_choice_accuracy_matches_a_direct_computation(lm_eval_tasks, tokenizer):
    import json

    from conftest import make_llama

    folder, evaluator = lm_eval_tasks
    model = make_llama(seed=3)
    metrics = evaluator(model)
    assert evaluator.directions == {"toy_choice/acc": True, "toy_generate/exact_match": True}
    assert set(metrics) == set(evaluator.directions)

    # acc, document by document: whether the label has the highest log-likelihood of continuation " {choice}".
    correct = []
    rows = [json.loads(line) for line in (folder / "toy_choice.jsonl").read_text().splitlines()]
    for row in rows:
        scores = []
        for choice in row["choices"]:
            context = tokenizer(row["q"])["input_ids"]
            full = tokenizer(row["q"] + " " + choice)["input_ids"]
            with torch.no_grad():
                logprobs = model(torch.tensor([full])).logits.log_softmax(-1)[0]
            scores.append(sum(logprobs[i - 1, full[i]].item() for i in range(len(context), len(full))))
        correct.append(float(max(range(len(scores)), key=scores.__getitem__) == row["label"]))
    assert metrics["toy_choice/acc"] == correct  # per document, in document order: the score is their mean
    assert len(metrics["toy_generate/exact_match"]) == 4 and set(metrics["toy_generate/exact_match"]) <= {0.0, 1.0}


def test_lm_eval_evaluator_is_repeatable_and_leaves_rng_mode_and_lm_eval_alone(lm_eval_tasks):
    import random

    import lm_eval.api.task
    import numpy as np
    import tqdm
    from conftest import make_llama

    _, evaluator = lm_eval_tasks
    model = make_llama(seed=4).train()
    torch.manual_seed(123)
    random.seed(5)
    np.random.seed(6)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    first, second = evaluator(model), evaluator(model)
    assert first == second
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert model.training
    assert lm_eval.api.task.tqdm is tqdm.tqdm  # its progress bar is hidden only during an evaluation


def test_lm_eval_evaluator_errors(lm_eval_tasks):
    from exme_callback import LMEvalEvaluator

    folder, _ = lm_eval_tasks
    with pytest.raises(ValueError, match="`tasks` must be a non-empty list"):
        LMEvalEvaluator("toy_choice")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer"):
        LMEvalEvaluator(["toy_choice"], batch_size=0)
    with pytest.raises(ValueError, match="`include_path` must be a folder"):
        LMEvalEvaluator(["toy_choice"], include_path=str(folder / "missing"))


def _token_loss(model, ids: list[int], scored_from: int = 1) -> tuple[float, int]:
    """The summed next-token cross-entropy of one unpadded sequence from position `scored_from`, by hand."""
    with torch.no_grad():
        logprobs = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)
    positions = range(max(scored_from, 1), len(ids))
    return -sum(logprobs[t - 1, ids[t]].item() for t in positions), len(positions)


def _mean_loss(model, sequences: list[tuple[list[int], int]]) -> float:
    sums, counts = zip(*(_token_loss(model, ids, scored_from) for ids, scored_from in sequences), strict=True)
    return math.fsum(sums) / sum(counts)


def _write_jsonl(path, rows) -> str:
    import json

    path.write_text("".join(row if isinstance(row, str) else json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_loss_evaluator_text_loss_is_the_token_weighted_mean(tmp_path, tokenizer):
    from conftest import make_llama, make_texts

    from exme_callback.evaluators import LossEvaluator

    model = make_llama(seed=1)
    texts = [*make_texts(4, seed=0), "the cat", "dog"]  # different lengths: per-record means would differ
    path = _write_jsonl(tmp_path / "data.jsonl", [{"text": text} for text in texts])
    evaluator = LossEvaluator(path, tokenizer, batch_size=4)
    eos = tokenizer.eos_token_id
    sequences = [(tokenizer(text)["input_ids"] + [eos], 1) for text in texts]
    assert evaluator.directions == {"eval_loss": False}
    assert evaluator.format == "text" and evaluator.num_records == 6
    assert evaluator.num_tokens == sum(len(ids) - 1 for ids, _ in sequences)
    metrics = evaluator(model)
    assert set(metrics) == {"eval_loss"}
    torch.testing.assert_close(metrics["eval_loss"], _mean_loss(model, sequences), rtol=1e-5, atol=1e-6)
    # An eos already there is not doubled.
    same = LossEvaluator([{"text": text + " <eos>"} for text in texts], tokenizer, batch_size=4)
    torch.testing.assert_close(same(model)["eval_loss"], metrics["eval_loss"], rtol=1e-6, atol=1e-7)


def test_loss_evaluator_scores_only_completion_tokens(tokenizer):
    from conftest import make_llama

    from exme_callback.evaluators import LossEvaluator

    model = make_llama(seed=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # sharp predictions: token losses far apart, so masking shows
    records = [
        {"prompt": "the red cat sat on the", "completion": " mat"},
        {"prompt": "the dog", "completion": " ran under the big log and the dog was small"},
        {"prompt": "a blue", "completion": " cat"},
    ]
    eos = tokenizer.eos_token_id
    sequences = [
        (tokenizer(r["prompt"] + r["completion"])["input_ids"] + [eos], len(tokenizer(r["prompt"])["input_ids"]))
        for r in records
    ]
    evaluator = LossEvaluator(records, tokenizer, batch_size=2)
    assert evaluator.format == "prompt-completion"
    assert evaluator.num_tokens == sum(len(ids) - start for ids, start in sequences) == 2 + 11 + 2
    loss = evaluator(model)["eval_loss"]
    torch.testing.assert_close(loss, _mean_loss(model, sequences), rtol=1e-5, atol=1e-6)
    # The prompt tokens are not scored: the same tokens as text records (all scored) give another value.
    as_text = LossEvaluator([{"text": r["prompt"] + r["completion"]} for r in records], tokenizer)
    assert as_text.num_tokens == sum(len(ids) - 1 for ids, _ in sequences)
    torch.testing.assert_close(as_text(model)["eval_loss"], _mean_loss(model, [(ids, 1) for ids, _ in sequences]))
    assert abs(as_text(model)["eval_loss"] - loss) > 1e-3  # well beyond the tolerance above


def test_loss_evaluator_messages_use_the_chat_template(tmp_path, tokenizer):
    from conftest import make_llama

    from exme_callback.evaluators import LossEvaluator

    model = make_llama(seed=3)
    conversations = [
        [{"role": "user", "content": "the cat sat on"}, {"role": "assistant", "content": "the mat"}],
        [{"role": "user", "content": "a big dog"}, {"role": "assistant", "content": "ran"}],
    ]
    path = _write_jsonl(tmp_path / "chat.jsonl", [{"messages": m} for m in conversations])
    with pytest.raises(ValueError, match=r"line 1: `messages` records need a chat template"):
        LossEvaluator(path, tokenizer)
    tokenizer.chat_template = "{% for m in messages %}{{ m['role'] }} {{ m['content'] }} <eos> {% endfor %}"
    evaluator = LossEvaluator(path, tokenizer)
    rendered = ["user the cat sat on <eos> assistant the mat <eos> ", "user a big dog <eos> assistant ran <eos> "]
    assert [tokenizer.apply_chat_template(m, tokenize=False) for m in conversations] == rendered
    sequences = [(tokenizer(text)["input_ids"], 1) for text in rendered]
    assert evaluator.format == "messages" and evaluator.num_tokens == 9 + 7
    torch.testing.assert_close(evaluator(model)["eval_loss"], _mean_loss(model, sequences), rtol=1e-5, atol=1e-6)


def test_loss_evaluator_batch_size_and_truncation(tokenizer):
    from conftest import make_llama, make_texts

    from exme_callback.evaluators import LossEvaluator

    model = make_llama(seed=4)
    records = [{"text": text} for text in [*make_texts(5, seed=1), "the cat sat", "big"]]
    one, three = LossEvaluator(records, tokenizer, batch_size=1), LossEvaluator(records, tokenizer, batch_size=3)
    assert one.num_tokens == three.num_tokens
    torch.testing.assert_close(one(model)["eval_loss"], three(model)["eval_loss"], rtol=1e-5, atol=1e-6)
    short = LossEvaluator(records, tokenizer, batch_size=3, max_length=4)
    eos = tokenizer.eos_token_id
    sequences = [((tokenizer(r["text"])["input_ids"] + [eos])[:4], 1) for r in records]
    assert short.num_tokens == 6 * 3 + 1
    torch.testing.assert_close(short(model)["eval_loss"], _mean_loss(model, sequences), rtol=1e-5, atol=1e-6)


def test_loss_evaluator_restores_the_training_mode(tokenizer):
    from conftest import make_llama

    from exme_callback.evaluators import LossEvaluator

    evaluator = LossEvaluator([{"text": "the cat sat on the mat"}], tokenizer)
    model = make_llama(seed=5)
    modes = []
    model.register_forward_hook(lambda module, args, output: modes.append(module.training))
    grad_enabled = []
    model.register_forward_pre_hook(lambda module, args: grad_enabled.append(torch.is_grad_enabled()))
    for training in (True, False):
        model.train(training)
        evaluator(model)
        assert model.training is training
        assert all(m.training is training for m in model.modules())
    assert modes == [False, False] and grad_enabled == [False, False]


def test_loss_evaluator_errors_name_the_file_and_line(tmp_path, tokenizer):
    from exme_callback.evaluators import LossEvaluator

    missing = str(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        LossEvaluator(missing, tokenizer)
    empty = _write_jsonl(tmp_path / "empty.jsonl", ["\n"])
    with pytest.raises(ValueError, match=r"empty\.jsonl is empty"):
        LossEvaluator(empty, tokenizer)
    mixed = _write_jsonl(tmp_path / "mixed.jsonl", [{"text": "the cat"}, "\n", {"prompt": "a", "completion": " b"}])
    with pytest.raises(
        ValueError, match=r"mixed\.jsonl, line 3: a 'prompt-completion' record, but .*line 1 is a 'text'"
    ):
        LossEvaluator(mixed, tokenizer)
    unknown = _write_jsonl(tmp_path / "unknown.jsonl", [{"text": "the cat"}, {"prompt": "the", "answer": "cat"}])
    with pytest.raises(
        ValueError, match=r"unknown\.jsonl, line 2: a record needs .* got the fields \['answer', 'prompt'\]"
    ):
        LossEvaluator(unknown, tokenizer)
    broken = _write_jsonl(tmp_path / "broken.jsonl", [{"text": "the cat"}, "{not json\n"])
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 2 is not valid JSON"):
        LossEvaluator(broken, tokenizer)
    with pytest.raises(ValueError, match=r"`records_or_path`\[0\]: `text` must be a string, got a list"):
        LossEvaluator([{"text": ["the"]}], tokenizer)
    with pytest.raises(ValueError, match="`records_or_path` must be a file path or a non-empty list"):
        LossEvaluator([], tokenizer)
    with pytest.raises(ValueError, match="no token to score"):
        LossEvaluator([{"prompt": "the cat", "completion": " sat"}], tokenizer, max_length=2)  # only the prompt
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        LossEvaluator([{"text": "the cat"}], tokenizer, batch_size=0)
    with pytest.raises(ValueError, match="`max_length` must be an integer >= 2, got 1"):
        LossEvaluator([{"text": "the cat"}], tokenizer, max_length=1)
    with pytest.raises(ValueError, match="`tokenizer` is required"):
        LossEvaluator([{"text": "the cat"}], None)


_LIVE_MODEL_WARNINGS = ("`pretrained` model kwarg is not of type `str`", "Passed an already-initialized model")


def test_lm_eval_evaluator_hides_only_hflm_live_model_warnings(lm_eval_tasks, caplog, tokenizer):
    import logging

    from conftest import make_llama
    from lm_eval.models.huggingface import HFLM

    from exme_callback.evaluators.lm_eval import _without_live_model_warnings

    _, evaluator = lm_eval_tasks
    logger = logging.getLogger("lm_eval.models.huggingface")
    filters = list(logger.filters)

    def live_model_warnings():
        found = [r.getMessage() for r in caplog.records if r.name == logger.name and r.levelno == logging.WARNING]
        return [m for m in found if m.startswith(_LIVE_MODEL_WARNINGS)]

    with caplog.at_level(logging.WARNING, logger="lm_eval"):
        evaluator(make_llama(seed=6))  # a new model object: the evaluator wraps it in a new HFLM
        assert live_model_warnings() == []
        assert logger.filters == filters
        with _without_live_model_warnings():
            logger.warning("another warning")  # not one of the two: shows
        assert [r.getMessage() for r in caplog.records if r.name == logger.name] == ["another warning"]
        HFLM(pretrained=make_llama(seed=7), tokenizer=tokenizer, batch_size=1)  # outside the evaluator: shows
    assert len(live_model_warnings()) == 2


def test_lm_eval_scores_the_documents_asked_for(lm_eval_tasks):
    """Racing asks for subsets (task -> document indices): the per-document scores are those of a full run."""
    from conftest import make_llama

    _, evaluator = lm_eval_tasks
    model = make_llama(seed=3)
    full = evaluator(model)
    subset = evaluator(model, items={"toy_choice": [1, 3, 6], "toy_generate": [0, 2]})
    assert subset["toy_choice/acc"] == [full["toy_choice/acc"][i] for i in (1, 3, 6)]
    assert subset["toy_generate/exact_match"] == [full["toy_generate/exact_match"][i] for i in (0, 2)]


def test_evaluators_declare_their_capabilities(lm_eval_tasks, tokenizer, regression, tmp_path):
    import copy

    from exme_callback.evaluators import LossEvaluator

    _, evaluator = lm_eval_tasks
    assert evaluator.scores_subsets and not evaluator.reuses_training_scores
    own = evaluator.tokenizer
    borrowed = copy.copy(evaluator)
    borrowed.use_tokenizer(tokenizer)
    assert borrowed.tokenizer is own is not tokenizer  # one given at construction is kept
    borrowed.tokenizer = None
    borrowed.use_tokenizer(tokenizer)
    assert borrowed.tokenizer is tokenizer  # none given: the trainer's
    loss = LossEvaluator([{"text": "the cat"}], tokenizer)
    assert loss.directions == {"eval_loss": False} and not loss.scores_subsets and not loss.reuses_training_scores
    loss.use_tokenizer(make_tokenizer())
    assert loss.tokenizer is tokenizer
    model, _, eval_data = regression
    trainer = Trainer(model=model, args=regression_args(tmp_path), eval_dataset=eval_data)
    assert TrainerEvaluator(trainer).directions is None and not TrainerEvaluator(trainer).scores_subsets


@pytest.fixture(scope="module")
def three_tasks(tmp_path_factory):
    """A multiple-choice, a generate_until and a loglikelihood_rolling task, and an evaluator of them."""
    pytest.importorskip("lm_eval")
    from conftest import write_lm_eval_tasks

    from exme_callback import LMEvalEvaluator

    folder = tmp_path_factory.mktemp("three")
    names = write_lm_eval_tasks(folder, prefix="tri", kinds=("choice", "generate", "rolling"))
    return folder, names, LMEvalEvaluator(names, make_tokenizer(), include_path=str(folder), batch_size=4)


def _lm_eval_evaluate(folder, names, model, limit=None, samples=None):
    """lm-eval's own `evaluate` on fresh task objects, with the evaluator's settings (no chat template, zero-shot,
    no logits cache), in one process."""
    from lm_eval.evaluator import evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from exme_callback.scoring import preserved_rng

    tasks = TaskManager(include_path=str(folder)).load(names)
    for task in tasks["tasks"].values():
        task.set_config(key="num_fewshot", value=0)
    lm = HFLM(pretrained=model, tokenizer=make_tokenizer(), batch_size=4, logits_cache=False)
    with preserved_rng(1234), torch.no_grad():
        output = evaluate(lm=lm, task_dict=tasks, limit=limit, samples=samples, bootstrap_iters=0, log_samples=True)
    documents = {task: sorted(logged, key=lambda s: s["doc_id"]) for task, logged in output["samples"].items()}
    return output["results"], documents


def test_lm_eval_evaluator_equals_lm_eval_evaluate(three_tasks):
    """Every metric, document by document where lm-eval averages, equals lm-eval's own `evaluate` exactly: all
    documents, a subset of them (racing's `items`), and `limit`."""
    from conftest import make_llama

    from exme_callback import LMEvalEvaluator

    folder, names, evaluator = three_tasks
    choice, generate, rolling = names
    model = make_llama(seed=8)
    ours = evaluator(model)
    results, documents = _lm_eval_evaluate(folder, names, model)
    assert set(ours) == {f"{choice}/acc", f"{generate}/exact_match", f"{rolling}/word_perplexity"}
    assert ours[f"{choice}/acc"] == [s["acc"] for s in documents[choice]] and len(ours[f"{choice}/acc"]) == 8
    assert ours[f"{generate}/exact_match"] == [s["exact_match"] for s in documents[generate]]
    assert sum(ours[f"{choice}/acc"]) / 8 == results[choice]["acc,none"]  # lm-eval's mean, in document order
    assert ours[f"{rolling}/word_perplexity"] == results[rolling]["word_perplexity,none"]  # an aggregation
    assert 1 < ours[f"{rolling}/word_perplexity"] < float("inf")

    subset = {choice: [1, 3, 6], generate: [0, 2], rolling: [0, 4]}
    ours = evaluator(model, items=subset)
    results, documents = _lm_eval_evaluate(folder, names, model, samples=subset)
    assert ours[f"{choice}/acc"] == [s["acc"] for s in documents[choice]]
    assert ours[f"{generate}/exact_match"] == [s["exact_match"] for s in documents[generate]]
    assert ours[f"{rolling}/word_perplexity"] == results[rolling]["word_perplexity,none"]
    # Tasks left out of `items` are not evaluated.
    assert set(evaluator(model, items={choice: [2]})) == {f"{choice}/acc"}

    limited = LMEvalEvaluator(names, make_tokenizer(), include_path=str(folder), batch_size=4, limit=3)
    ours = limited(model)
    results, documents = _lm_eval_evaluate(folder, names, model, limit=3)
    assert ours[f"{choice}/acc"] == [s["acc"] for s in documents[choice]] and len(ours[f"{choice}/acc"]) == 3
    assert ours[f"{generate}/exact_match"] == [s["exact_match"] for s in documents[generate]]
    assert ours[f"{rolling}/word_perplexity"] == results[rolling]["word_perplexity,none"]
    assert limited.documents_scored == 3 * 3
    with pytest.raises(ValueError, match=r"`items\['tri_choice'\]` must be document indices in \[0, 3\)"):
        limited(model, items={choice: [3]})
    with pytest.raises(ValueError, match=r"`items` names \['other'\], which are not tasks of this evaluator"):
        limited(model, items={"other": [0]})


def test_lm_eval_requests_are_built_once_with_the_same_few_shot_examples(three_tasks):
    """The instances are built at the first call, as lm-eval builds them in one process, and reused: a subset's
    documents have the prompts (few-shot examples included) and the scores of a full call's."""
    from conftest import make_llama
    from lm_eval.tasks import TaskManager

    from exme_callback import LMEvalEvaluator

    folder, names, _ = three_tasks
    choice = names[0]
    evaluator = LMEvalEvaluator([choice], make_tokenizer(), include_path=str(folder), num_fewshot=2, batch_size=4)
    task = evaluator._tasks["tasks"][choice]
    builds = []
    build_all_requests = task.build_all_requests
    task.build_all_requests = lambda **kwargs: builds.append(kwargs) or build_all_requests(**kwargs)
    model = make_llama(seed=9)
    full = evaluator(model)
    subset = evaluator(model, items={choice: [5, 0, 2]})  # any order: the scores come in that order
    again = evaluator(model)
    assert len(builds) == 1 and (builds[0]["rank"], builds[0]["world_size"]) == (0, 1)
    assert subset[f"{choice}/acc"] == [full[f"{choice}/acc"][i] for i in (5, 0, 2)]
    assert again == full
    assert evaluator.documents_scored == 8 + 3 + 8
    # The journal's fingerprint follows the settings, not the calls made.
    same = LMEvalEvaluator([choice], make_tokenizer(), include_path=str(folder), num_fewshot=2, batch_size=4)
    assert evaluator.fingerprint() == same.fingerprint()
    other = LMEvalEvaluator([choice], make_tokenizer(), include_path=str(folder), num_fewshot=1, batch_size=4)
    assert other.fingerprint() != evaluator.fingerprint()

    # The prompts are lm-eval's for one process with the seed set before building (two examples drawn per doc).
    fresh = TaskManager(include_path=str(folder)).load([choice])["tasks"][choice]
    fresh.set_config(key="num_fewshot", value=2)
    fresh.set_fewshot_seed(seed=1234)
    fresh.build_all_requests(rank=0, world_size=1)
    built = [i.arguments for group in evaluator._built[choice].instances for i in group]
    assert built == [i.arguments for i in fresh.instances]
    assert all(args[0].count("\n\n") == 2 for args in built)  # two examples before each question
