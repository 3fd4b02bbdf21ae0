"""lm-eval's requests for `LMEvalEvaluator`: built once per task, run on this rank's share of the documents asked
for, scored document by document, and gathered so every rank has every document's results.

A module of its own because it is the part of lm-eval's `evaluate` the evaluator re-does to split the work across
ranks (lm-eval runs a live model as rank 0 of a world of 1); `lm_eval.py` keeps the evaluator's own job: its
arguments, the model wrapper, and the metrics' names.

The steps follow `lm_eval.evaluator.evaluate` for a world of 1, on a subset of the documents:

1. (once) `Task.build_all_requests` for every document up to `limit`, with the few-shot seed set just before;
2. this rank's share of the documents asked for (round robin over them, `sharding.share`); their instances, grouped
   by request type in lm-eval's order (task by task, document by document, each instance `repeats` times);
3. on a sharded model (FSDP2, ZeRO-3), where every forward pass is a collective, each request type of each task is
   padded to the largest rank's count with copies whose results are dropped, so every rank runs as many batches;
4. the request types through the model (`HFLM.loglikelihood`, `loglikelihood_rolling`, `generate_until`);
5. the task's filters on these instances only, and `Task.process_results` per document and filter;
6. every rank's results gathered (`sharding.gather`), back in the order the documents were asked for.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import sharding

__all__ = ["BuiltTask", "build", "score"]


@dataclass
class BuiltTask:
    """One lm-eval task's documents and their instances, built once.

    Attributes:
        task (`lm_eval.api.task.Task`): the task.
        docs (`list`): its documents up to the evaluator's `limit`, by index.
        instances (`list[list[Instance]]`): each document's instances, in lm-eval's order (`Instance.idx`).
        filters (`list[str]`): the names of the task's filters, in lm-eval's order.
    """

    task: Any
    docs: list
    instances: list[list[Any]]
    filters: list[str]


def build(task, limit: int | None, seed: int, **context) -> BuiltTask:
    """The instances of every document of `task` up to `limit`, as `evaluate` builds them for a world of 1: the
    few-shot sampler seeded with `seed` first, so every build draws the same examples. `context`: the chat-template
    arguments of `Task.build_all_requests`."""
    task.set_fewshot_seed(seed=seed)
    task.build_all_requests(limit=limit, rank=0, world_size=1, cache_requests=False, **context)
    docs = [doc for _, doc in task.doc_iterator(rank=0, limit=limit, world_size=1)]
    instances: list[list[Any]] = [[] for _ in docs]
    for instance in task.instances:
        instances[instance.doc_id].append(instance)
    for group in instances:
        group.sort(key=lambda instance: instance.idx)
    return BuiltTask(task, docs, instances, [f.name for f in task._filters])


def request_types(built: Mapping[str, BuiltTask]) -> list[str]:
    """The request types of the tasks in the order `evaluate` runs them (first use, task by task); every rank runs
    them in this order."""
    order: dict[str, None] = {}
    for entry in built.values():
        for group in entry.instances:
            order.update(dict.fromkeys(instance.request_type for instance in group))
    return list(order)


def score(
    lm, built: Mapping[str, BuiltTask], requested: Mapping[str, Sequence[int]], synced: bool
) -> tuple[dict[str, list[dict[str, dict]]], int]:
    """Every requested document's results (`{filter: process_results(...)}`), by task, in the order asked for, the
    same on every rank; and how many documents this rank scored.

    Args:
        lm (`HFLM`): the wrapped live model.
        built (`Mapping[str, BuiltTask]`): the tasks, built once (`build`).
        requested (`Mapping[str, Sequence[int]]`): task -> the indices of the documents to score.
        synced (`bool`): the model is sharded: pad every rank to the same number of requests (step 3).
    """
    shares = {name: [(p, requested[name][p]) for p in sharding.share(len(ids))] for name, ids in requested.items()}

    # 2. This rank's instances by request type, each `repeats` times; no response from an earlier call is kept.
    runs: dict[str, list] = defaultdict(list)
    counts: dict[tuple[str, str], int] = defaultdict(int)
    for name, share in shares.items():
        for _, doc in share:
            for instance in built[name].instances[doc]:
                instance.resps, instance.filtered_resps = [], {}
                runs[instance.request_type] += [instance] * instance.repeats
                counts[name, instance.request_type] += instance.repeats
    real = {kind: len(requests) for kind, requests in runs.items()}

    # 3. Padding of a sharded model: copies of an instance of the task's first document asked for.
    if synced:
        largest: dict[tuple[str, str], int] = defaultdict(int)
        for rank_counts in sharding.gather(dict(counts)):
            for key, n in rank_counts.items():
                largest[key] = max(largest[key], n)
        for (name, kind), n in largest.items():
            pad = next(i for i in built[name].instances[requested[name][0]] if i.request_type == kind)
            runs[kind] += [pad] * (n - counts[name, kind])

    # 4. The model's responses, in the order every rank uses; the padding's are dropped.
    for kind in request_types(built):
        if runs.get(kind):
            n, responses = real.get(kind, 0), getattr(lm, kind)(runs[kind])
            for instance, response in zip(runs[kind][:n], responses[:n], strict=True):
                instance.resps.append(response)

    # 5. Filters on this rank's instances, then each document's results, filter by filter (lm-eval's order).
    mine: dict[str, dict[int, dict[str, dict]]] = {}
    for name, share in shares.items():
        entry, results = built[name], {p: {} for p, _ in share}
        instances = [instance for _, doc in share for instance in entry.instances[doc]]
        if instances:
            for ensemble in entry.task._filters:
                ensemble.apply(instances)
        for key in entry.filters:
            for p, doc in share:
                responses = [instance.filtered_resps[key] for instance in entry.instances[doc]]
                results[p][key] = entry.task.process_results(entry.docs[doc], responses)
        mine[name] = results

    # 6. Every rank's documents, back in the order asked for.
    ordered: dict[str, list] = {name: [None] * len(ids) for name, ids in requested.items()}
    for part in sharding.gather(mine):
        for name, results in part.items():
            for p, result in results.items():
                ordered[name][p] = result
    return ordered, sum(map(len, shares.values()))
