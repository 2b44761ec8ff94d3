"""Where job processes run: :class:`Executor` is the seam; ``local`` (processes on this machine, the default)
and ``kubernetes`` (a Job per fine-tuning job) implement it."""

from __future__ import annotations

from typing import Any

from tuneforge.service.executors.base import Executor, Launch, Status

__all__ = ["Executor", "Launch", "Status", "make_executor"]


def make_executor(kind: str, **options: Any) -> Executor:
    if kind == "local":
        from tuneforge.service.executors.local import LocalExecutor

        return LocalExecutor(**options)
    if kind == "kubernetes":
        from tuneforge.service.executors.kubernetes import KubernetesExecutor

        return KubernetesExecutor(**options)
    raise ValueError(f"executor {kind!r}: expected local or kubernetes")
