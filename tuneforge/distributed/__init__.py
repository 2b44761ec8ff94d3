"""Checkpointless, elastic data-parallel training on torchft.

Replica groups (one process each) train in lock-step under a torchft lighthouse; a failed replica is
replaced and heals from a live peer, survivors keep stepping, replicas can join and leave, and every
step's global batch is the same fixed set of samples whoever takes part. Disk checkpoints are only the
fallback for when every replica died.

Entry points: :func:`run` (blocking), :func:`start_background` + :meth:`Supervisor.scale`,
:func:`scale` (from any process), :func:`analyze` (metrics of a run directory). What is trained is a
:class:`ReplicaTask` named by a ``"module:factory"`` string in :class:`JobSpec`.

Several machines run the same engine: one lighthouse (:func:`tuneforge.distributed.lighthouse.serve`,
``python -m tuneforge.distributed lighthouse``) and one supervisor per machine with
``resilience.lighthouse`` / ``node`` / ``bind_host`` set (docs/multi-node.md).

Importing this package is cheap (no torch): replica processes start from here.
"""

from __future__ import annotations

from tuneforge.distributed.config import JobSpec, ResilienceConfig, parse_replicas
from tuneforge.distributed.faults import Fault, FaultPlan
from tuneforge.distributed.metrics import RecoveryEvent, RunReport, StartupBreakdown, analyze
from tuneforge.distributed.supervisor import Supervisor, new_run_dir, resolve_run_dir, run, scale, start_background
from tuneforge.distributed.task import ReplicaTask, load_task

__all__ = [
    "Fault",
    "FaultPlan",
    "JobSpec",
    "RecoveryEvent",
    "ReplicaTask",
    "ResilienceConfig",
    "RunReport",
    "StartupBreakdown",
    "Supervisor",
    "analyze",
    "load_task",
    "new_run_dir",
    "parse_replicas",
    "resolve_run_dir",
    "run",
    "scale",
    "start_background",
]
