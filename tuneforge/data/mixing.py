"""Deterministic weighted mixing of several data sources.

Mixing is what keeps a fine-tune from forgetting: e.g. 75 % customer data, 25 % general data. The share is
measured in supervised *tokens* by default (a source of long answers should not dominate because its
examples are long), or in examples. The order is a pure function of the seed: at every pick the source
furthest below its target share goes next ("largest deficit first"), so the realised ratio tracks the
target within one example at every point of the run, not just on average — which also makes a run
stopped at any step have the asked ratio. A source that runs out starts a fresh seeded shuffle (a
*repeat*); how many passes each source made is reported.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np


def source_order(n: int, seed: int, source: int, epoch: int) -> np.ndarray:
    """The shuffled order of one pass over a source; independent for every (seed, source, pass)."""
    return np.random.default_rng([seed, source, epoch]).permutation(n)


def mixture_stream(costs: Sequence[np.ndarray], weights: Sequence[float], seed: int) -> Iterator[tuple[int, int, int]]:
    """Endless stream of ``(source, example, pass)``; `costs[s][i]` is what example i counts for (tokens or 1).

    Plain Python floats and lists inside (the same IEEE arithmetic as numpy's, so the same order): a plan of
    millions of examples is built in seconds, not minutes of per-item numpy calls.
    """
    w = [float(x) for x in weights]
    total = float(np.sum(np.asarray(weights, dtype=np.float64)))
    shares = [x / total for x in w]
    k = len(costs)
    consumed = [0.0] * k
    passes = [0] * k
    cursors = [0] * k
    orders = [source_order(len(c), seed, s, 0).tolist() for s, c in enumerate(costs)]
    cost_lists = [np.asarray(c, dtype=np.float64).tolist() for c in costs]
    while True:
        s = 0 if k == 1 else min(range(k), key=lambda j: consumed[j] / shares[j])
        if cursors[s] == len(orders[s]):
            passes[s] += 1
            cursors[s] = 0
            orders[s] = source_order(len(costs[s]), seed, s, passes[s]).tolist()
        i = orders[s][cursors[s]]
        cursors[s] += 1
        consumed[s] += max(cost_lists[s][i], 1.0)
        yield s, i, passes[s]


@dataclass
class MixReport:
    """What a run actually consumed per source, next to what was asked."""

    names: list[str]
    target: list[float]
    tokens: list[int] = field(default_factory=list)
    examples: list[int] = field(default_factory=list)
    passes: list[float] = field(default_factory=list)  # examples drawn / examples in the source
    mix_by: str = "tokens"

    def realised(self, by: str | None = None) -> list[float]:
        values = np.asarray(self.tokens if (by or self.mix_by) == "tokens" else self.examples, dtype=np.float64)
        total = values.sum()
        return (values / total).tolist() if total else [0.0] * len(values)

    def as_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for name, tgt, real, tok_share, passes in zip(
            self.names, self.target, self.realised(), self.realised("tokens"), self.passes
        ):
            out[f"mix/{name}/target"] = tgt
            out[f"mix/{name}/realised"] = real
            out[f"mix/{name}/token_share"] = tok_share
            out[f"mix/{name}/passes"] = passes
        return out

    def summary(self) -> str:
        lines = [f"data mix (by {self.mix_by}):"]
        for name, tgt, real, tok, ex, passes in zip(
            self.names, self.target, self.realised(), self.tokens, self.examples, self.passes
        ):
            note = (
                f", {passes:.2f} passes — repeated, reshuffled each pass"
                if passes > 1.001
                else f", {passes:.2f} passes"
            )
            lines.append(
                f"  {name}: target {tgt:.1%}, realised {real:.1%} ({tok} supervised tokens, {ex} examples{note})"
            )
        return "\n".join(lines)
