"""Top-k greedy merging with model kinship (Hu et al. 2024, arXiv 2410.12613), on coefficient vectors."""

from __future__ import annotations

from collections.abc import Sequence

from ..candidates import Candidate, best
from .base import Search, Strategy

__all__ = ["TopkGreedy"]


class TopkGreedy(Strategy):
    """Top-k greedy merging. The pool starts with the kept checkpoints (their training scores). Each generation:

    1. merges every pair of the pool's `k` best models and scores the merges, which join the pool;
    2. when the best score did not improve, explores: merges the best model with its least related model of the
       pool (the lowest kinship, or the largest Euclidean distance), and scores it;
    3. stops after a generation whose merges (exploration included) did not improve the best score, when no new
       merge is left, or when `budget` evaluations are spent.

    Differences from the paper: the merge operator is the midpoint of the two models (a linear merge with equal
    weights: their coefficient vectors averaged), so every model stays a point of the span, switched in place and
    never written to disk; the paper merges with mergekit (SLERP in its experiments), which is not linear in the
    weights. A merge already in the pool is not evaluated twice.

    Args:
        k (`int`, *optional*, defaults to 2): how many of the best models each generation merges pairwise.
        budget (`int`, *optional*): the most evaluations; unlimited when `None`.
        metric (`str`, *optional*, defaults to `"pearson"`): the kinship of exploration (`"pearson"`, `"cosine"`,
            or the distance `"euclidean"`).

    Its candidates have `kind="topk"`, `hyper["generation"]`, `hyper["kinship"]` of the parents,
    `hyper["exploration"] = 1` for exploration merges, and `parents`.
    """

    name, label = "topk_greedy", "Top-k greedy"
    description = (
        "and merged pairwise, generation after generation (Top-k greedy merging with model kinship, "
        "[Hu et al. 2024](https://arxiv.org/abs/2410.12613))"
    )

    def __init__(self, k: int = 2, budget: int | None = None, metric: str = "pearson"):
        self.k, self.budget, self.metric = k, budget, metric

    @classmethod
    def from_settings(cls, settings) -> TopkGreedy:
        return cls(settings.top_k, settings.budget, settings.kinship_metric)

    def evaluations(self, k: int) -> int | None:
        return self.budget

    def search(self, search: Search) -> None:
        results, seen, generation = search.candidates, {c.coefficients for c in search.candidates}, 0
        sign = -1.0 if self.metric == "euclidean" else 1.0  # least related first: the lowest similarity

        def merge(i: int, j: int, **hyper) -> Candidate | None:
            a, b = results[i].coefficients, results[j].coefficients
            c = tuple((x + y) / 2 for x, y in zip(a, b, strict=True))
            if c in seen or self._spent(len(seen) - search.k):
                return None
            seen.add(c)
            hyper = {"generation": generation, "kinship": search.kinship(a, b, self.metric), **hyper}
            candidate = search.point("topk", c, hyper)
            candidate.parents = (i, j)
            return search.score(candidate)

        while not self._spent(len(seen) - search.k):
            generation += 1
            pool = [i for i, c in enumerate(results) if c.valid]
            leader = search.best([results[i] for i in pool])
            if leader is None:  # no model with a finite score to merge from
                break
            top = sorted(pool, key=lambda i: -results[i].score if search.greater_is_better else results[i].score)
            top = top[: self.k]
            merged = [merge(i, j) for a, i in enumerate(top) for j in top[a + 1 :]]
            if search.best() is leader:  # 2. no gain: explore with the least related model of the pool
                index = results.index(leader)
                others = sorted(
                    (i for i in pool if i != index),
                    key=lambda i: sign * search.kinship(leader.coefficients, results[i].coefficients, self.metric),
                )
                merged.append(next((m for m in (merge(index, i, exploration=1) for i in others) if m), None))
            if search.best() is leader or not any(merged):  # 3. a generation without gain (or nothing new): stop
                break

    def _spent(self, evaluations: int) -> bool:
        return self.budget is not None and evaluations >= self.budget

    def rows(self, candidates: Sequence[Candidate], greater_is_better: bool) -> list[tuple[str, Candidate]]:
        winner = best(candidates, greater_is_better, kinds=("topk",))
        return [] if winner is None else [(self.label, winner)]

    def notes(self, candidates: Sequence[Candidate]) -> list[str]:
        """Each merge with its generation, parents, their kinship and its score."""
        merges = [c for c in candidates if c.kind == "topk"]
        if not merges:
            return []
        labels = {id(c): f"SFT-{i + 1}" for i, c in enumerate(c for c in candidates if c.kind == "sft")}
        lines = ["", "Top-k greedy merging, by generation (merge #n is the n-th merge):", ""]
        lines += ["| merge | generation | parents | kinship | selection |", "|---:|---:|---|---:|---:|"]
        for n, c in enumerate(merges, start=1):
            labels[id(c)] = f"#{n}"
            parents = " + ".join(labels[id(candidates[i])] for i in c.parents)
            explored = " (exploration)" if c.hyper.get("exploration") else ""
            cells = [f"#{n}", f"{c.hyper['generation']:g}", parents + explored, _number(c.hyper["kinship"])]
            lines.append("| " + " | ".join([*cells, _number(c.score)]) + " |")
        return lines


def _number(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
