"""Recipe + hardware + data → the resolved plan (kept as the entry point callers import; the planner lives in
:mod:`tuneforge.planning`: ``resolve`` for ``auto`` values, ``memory`` / ``timing`` for the forecast)."""

from __future__ import annotations

from tuneforge.planning.resolve import MICRO_TOKENS, Resolved, resolve, resolve_micro_batch, sequences_per_sample

__all__ = ["MICRO_TOKENS", "Resolved", "resolve", "resolve_micro_batch", "sequences_per_sample"]
