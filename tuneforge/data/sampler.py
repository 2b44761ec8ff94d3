"""The training plan: which samples every optimizer step sees, decided before step one.

Every packed row (a "sample") has a global index; step ``s`` takes rows ``[s·G, (s+1)·G)`` where ``G`` is
the global batch size. The plan is a pure function of (data, seed, lengths, batch), so resuming at step
``s`` is exact, replicas can split a step's rows any way they like without skipping or repeating one, and
the realised mixing ratio is known before training starts.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from array import array
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tuneforge.data.mixing import MixReport, mixture_stream
from tuneforge.data.token_cache import TokenizedSource
from tuneforge.paths import cache_dir


@dataclass
class Plan:
    """Rows of (source, example) references, grouped into steps of `global_batch_size` rows."""

    refs: np.ndarray  # (n_refs, 2) int64: source, example
    row_offsets: np.ndarray  # (n_rows + 1,) int64 into refs
    row_tokens: np.ndarray  # (n_rows,) supervised (predicted) tokens per row
    global_batch_size: int
    num_steps: int
    mix: MixReport

    def rows_for_step(self, step: int) -> range:
        g = self.global_batch_size
        return range(step * g, (step + 1) * g)

    def row(self, r: int) -> np.ndarray:
        return self.refs[self.row_offsets[r] : self.row_offsets[r + 1]]

    def step_tokens(self, step: int) -> int:
        rows = self.rows_for_step(step)
        return int(self.row_tokens[rows.start : rows.stop].sum())

    @property
    def total_tokens(self) -> int:
        return int(self.row_tokens[: self.num_steps * self.global_batch_size].sum())


def auto_epochs(n_examples: int) -> int:
    """``epochs: auto``: OpenAI's fine-tuning rule (cookbook "Data preparation and analysis for chat model
    fine-tuning"): 3 epochs, raised so small sets reach 100 examples seen (at most 25 epochs) and lowered so large
    ones stop near 25 000 (at least 1)."""
    target, low, high = 3, 100, 25_000
    n = max(n_examples, 1)
    if n * target < low:
        return min(25, low // n)
    if n * target > high:
        return max(1, high // n)
    return target


PLAN_VERSION = 1


def build_plan(
    sources: Sequence[TokenizedSource],
    weights: Sequence[float],
    *,
    mix_by: str,
    seed: int,
    max_length: int,
    packing: bool,
    global_batch_size: int,
    epochs: float | str,
    max_steps: int | None,
    cache: bool = False,
) -> Plan:
    """Stream the mixture, pack it into rows, and stop after `max_steps` steps or `epochs` passes of source 0
    (``"auto"``: :func:`auto_epochs` of source 0's size).

    With ``cache`` (and every source from the token cache) the plan is stored beside the tokens, keyed by their
    cache keys and every argument, so a warm start memory-maps it instead of walking millions of examples.
    """
    if epochs == "auto":
        epochs = auto_epochs(len(sources[0]))
    args = dict(
        weights=[float(w) for w in weights],
        mix_by=mix_by,
        seed=seed,
        max_length=max_length,
        packing=packing,
        global_batch_size=global_batch_size,
        epochs=epochs,
        max_steps=max_steps,
    )
    entry = _plan_entry(sources, args) if cache and all(s.cache_key for s in sources) else None
    if entry is not None and (hit := _load_plan(entry)) is not None:
        return hit
    plan = _build(sources, weights, **{k: v for k, v in args.items() if k != "weights"})
    if entry is not None:
        _store_plan(entry, plan)
    return plan


def _build(
    sources: Sequence[TokenizedSource],
    weights: Sequence[float],
    *,
    mix_by: str,
    seed: int,
    max_length: int,
    packing: bool,
    global_batch_size: int,
    epochs: float,
    max_steps: int | None,
) -> Plan:
    supervised = [s.supervised_counts() for s in sources]
    costs = supervised if mix_by == "tokens" else [np.ones(len(s), dtype=np.int64) for s in sources]
    lengths = [s.lengths.tolist() for s in sources]  # plain ints: the loop below runs once per example
    sup = [np.asarray(x).tolist() for x in supervised]
    g = global_batch_size
    need_rows = max_steps * g if max_steps else None
    primary_quota = max(1, round(epochs * len(sources[0])))
    mix = MixReport(
        names=[s.name for s in sources],
        target=(np.asarray(weights) / np.sum(weights)).tolist(),
        mix_by=mix_by,
        tokens=[0] * len(sources),
        examples=[0] * len(sources),
    )
    # Flat typed arrays, not lists of tuples: a plan of millions of rows holds no per-row Python objects.
    refs, row_offsets, row_tokens = array("q"), array("q", [0]), array("q")
    cur_len = cur_tok = primary_seen = 0
    for s, i, _ in mixture_stream(costs, weights, seed):
        length = lengths[s][i]
        if refs and (not packing or cur_len + length > max_length):
            row_offsets.append(len(refs) // 2)
            row_tokens.append(cur_tok)
            cur_len = cur_tok = 0
        if need_rows is not None and len(row_tokens) >= need_rows:
            break
        refs.append(s)
        refs.append(i)
        cur_len += length
        cur_tok += sup[s][i]
        mix.examples[s] += 1
        mix.tokens[s] += sup[s][i]
        primary_seen += s == 0
        if need_rows is None and primary_seen >= primary_quota:
            # Epoch-based runs end on a step boundary, so no row is dropped or padded.
            need_rows = -(-(len(row_tokens) + 1) // g) * g
    if cur_len:
        row_offsets.append(len(refs) // 2)
        row_tokens.append(cur_tok)
    assert need_rows is not None and len(row_tokens) == need_rows
    mix.passes = [ex / max(len(src), 1) for ex, src in zip(mix.examples, sources)]
    return Plan(
        np.frombuffer(refs, dtype=np.int64).reshape(-1, 2),
        np.frombuffer(row_offsets, dtype=np.int64),
        np.frombuffer(row_tokens, dtype=np.int64),
        g,
        need_rows // g,
        mix,
    )


def _plan_entry(sources: Sequence[TokenizedSource], args: dict) -> Path:
    blob = json.dumps({"v": PLAN_VERSION, "sources": [s.cache_key for s in sources], **args}, sort_keys=True)
    return cache_dir("tokens") / "plans" / hashlib.sha256(blob.encode()).hexdigest()[:24]


def _load_plan(entry: Path) -> Plan | None:
    try:
        meta = json.loads((entry / "plan.json").read_text())
    except (OSError, ValueError):
        return None
    arrays = {k: np.load(entry / f"{k}.npy", mmap_mode="r") for k in ("refs", "row_offsets", "row_tokens")}
    return Plan(
        arrays["refs"],
        arrays["row_offsets"],
        arrays["row_tokens"],
        meta["global_batch_size"],
        meta["num_steps"],
        MixReport(**meta["mix"]),
    )


def _store_plan(entry: Path, plan: Plan) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}-"))
    try:
        for k in ("refs", "row_offsets", "row_tokens"):
            np.save(tmp / f"{k}.npy", getattr(plan, k))
        meta = {"global_batch_size": plan.global_batch_size, "num_steps": plan.num_steps, "mix": asdict(plan.mix)}
        (tmp / "plan.json").write_text(json.dumps(meta))  # written last: marks the entry complete
        os.rename(tmp, entry)
    except OSError:  # another process stored the same plan first
        pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
