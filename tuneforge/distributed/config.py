"""The settings of an elastic run: the ``resilience:`` recipe section and the job every replica builds.

Both are plain dataclasses that round-trip through JSON, because the supervisor writes them to the run
directory and each replica process (possibly started much later, on another host) reads them back.
The recipe schema maps its ``resilience:`` section onto :class:`ResilienceConfig` with
:meth:`ResilienceConfig.from_dict`, which names the offending field on bad input.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from tuneforge.distributed.network import host_problem, is_wildcard, lighthouse_url, node_problem
from tuneforge.errors import RecipeError, suggest
from tuneforge.files import atomic_write


def parse_replicas(text: str) -> tuple[int, int]:
    """``"2:8"`` -> (2, 8); ``"3"`` -> (3, 3)."""
    parts = str(text).split(":")
    try:
        if len(parts) == 1:
            lo = hi = int(parts[0])
        elif len(parts) == 2:
            lo, hi = int(parts[0]), int(parts[1])
        else:
            raise ValueError
    except ValueError:
        raise RecipeError(f"--replicas {text!r}: expected MIN:MAX (e.g. 2:8) or a single number") from None
    if lo < 1 or hi < lo:
        raise RecipeError(f"--replicas {text!r}: need 1 <= MIN <= MAX")
    return lo, hi


def _check_keys(cls: type, data: Mapping[str, Any], where: str) -> None:
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            hint = suggest(str(key), known, list_all=True)
            raise RecipeError(f"{where}.{key}: unknown option{hint}")


@dataclass
class ResilienceConfig:
    """Fault tolerance and elasticity knobs (recipe section ``resilience:``)."""

    min_replicas: int = 1
    max_replicas: int = 1
    replicas: int | None = None  # replicas to start with; default max_replicas
    hot_spares: int = 0  # pre-imported, pre-built idle processes that replace a failed replica
    checkpoint_every: int = 50  # steps between async disk checkpoints (fallback when all die); 0 = off
    keep_checkpoints: int = 2
    heartbeat_timeout_ms: int = 1000  # lighthouse: a replica silent this long is dead
    join_timeout_ms: int = 500  # lighthouse: after the first member asks, wait this long for live-but-absent ones
    quorum_tick_ms: int = 50
    heartbeat_interval_ms: int = 100
    timeout_s: float = 30.0  # collectives, commit votes and peer state transfer
    quorum_timeout_s: float = 600.0  # how long a replica waits for enough peers
    hang_timeout_s: float = 60.0  # supervisor kills a replica that made no progress this long
    max_restarts: int = 100
    batch_policy: str = "fixed"  # fixed | per_replica
    per_replica_batch_size: int = 0
    lr_scaling: str = "none"  # none | linear | sqrt (per_replica only)
    fault_plan: Any = None  # path, JSON text or dict; see tuneforge.distributed.faults
    backend: str = "auto"  # auto | gloo | nccl
    final_state: str = "rank0"  # which replicas write final/replica_<i>.pt: rank0 | all | none
    init_sync: bool = True  # copy step-0 state from one replica to all; False if build(seed) is identical anyway
    # several machines (docs/multi-node.md); the defaults keep a run on this host only
    lighthouse: str | None = None  # HOST:PORT of an external lighthouse; None = the supervisor starts its own
    node: str | None = None  # this machine's name in replica ids; default with a lighthouse: the host name
    bind_host: str = "127.0.0.1"  # address replica endpoints use and advertise; 0.0.0.0 = all interfaces
    advertise_host: str | None = None  # name peers connect to; default bind_host (host name if 0.0.0.0)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, where: str = "resilience") -> ResilienceConfig:
        data = dict(data or {})
        _check_keys(cls, data, where)
        if type(data.get("node")) is int:  # `--set resilience.node=7` arrives as a YAML int
            data["node"] = str(data["node"])
        cfg = cls(**data)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "resilience") -> None:
        def bad(name: str, expected: str) -> RecipeError:
            return RecipeError(f"{where}.{name}: got {getattr(self, name)!r}, expected {expected}")

        if self.min_replicas < 1:
            raise bad("min_replicas", ">= 1")
        if self.max_replicas < self.min_replicas:
            raise bad("max_replicas", f">= min_replicas ({self.min_replicas})")
        if self.replicas is not None and not self.min_replicas <= self.replicas <= self.max_replicas:
            raise bad("replicas", f"between min_replicas and max_replicas ({self.min_replicas}:{self.max_replicas})")
        for name in ("hot_spares", "checkpoint_every", "max_restarts"):
            if getattr(self, name) < 0:
                raise bad(name, ">= 0")
        if self.keep_checkpoints < 1:
            raise bad("keep_checkpoints", ">= 1")
        for name in ("heartbeat_timeout_ms", "join_timeout_ms", "quorum_tick_ms", "heartbeat_interval_ms"):
            if getattr(self, name) < 1:
                raise bad(name, "a positive number of milliseconds")
        if self.heartbeat_interval_ms * 2 > self.heartbeat_timeout_ms:
            raise bad("heartbeat_interval_ms", "at most half of heartbeat_timeout_ms")
        for name in ("timeout_s", "quorum_timeout_s", "hang_timeout_s"):
            if getattr(self, name) <= 0:
                raise bad(name, "a positive number of seconds")
        if self.batch_policy not in ("fixed", "per_replica"):
            raise bad("batch_policy", "'fixed' or 'per_replica'")
        if self.lr_scaling not in ("none", "linear", "sqrt"):
            raise bad("lr_scaling", "'none', 'linear' or 'sqrt'")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise bad("backend", "'auto', 'gloo' or 'nccl'")
        if self.final_state not in ("rank0", "all", "none"):
            raise bad("final_state", "'rank0', 'all' or 'none'")
        if self.lighthouse is not None:
            lighthouse_url(self.lighthouse, f"{where}.lighthouse")  # raises naming the field
        if self.node is not None and (problem := node_problem(self.node)):
            raise bad("node", problem)
        if problem := host_problem(self.bind_host):
            raise bad("bind_host", problem)
        if self.advertise_host is not None:
            if problem := host_problem(self.advertise_host):
                raise bad("advertise_host", problem)
            if is_wildcard(self.advertise_host):
                raise bad("advertise_host", "a name or address peers can connect to, not a wildcard")

    @property
    def multi_node(self) -> bool:
        """An external lighthouse: peers may live on other machines, beyond this supervisor's sight."""
        return self.lighthouse is not None

    @property
    def initial_replicas(self) -> int:
        return self.replicas if self.replicas is not None else self.max_replicas


@dataclass
class JobSpec:
    """Everything a replica process needs to build and train its part of the job."""

    task: str  # "package.module:factory"
    task_config: dict[str, Any]
    steps: int
    global_batch_size: int
    micro_batch_size: int
    seed: int = 0
    shuffle: bool = True
    max_grad_norm: float | None = None
    bucket_mb: float = 25.0  # gradient all-reduce bucket size
    resilience: ResilienceConfig = field(default_factory=ResilienceConfig)

    def __post_init__(self) -> None:
        if isinstance(self.resilience, Mapping):
            self.resilience = ResilienceConfig.from_dict(self.resilience)
        if self.steps < 1:
            raise RecipeError(f"steps: got {self.steps}, expected >= 1")
        if self.micro_batch_size < 1:
            raise RecipeError(f"micro_batch_size: got {self.micro_batch_size}, expected >= 1")
        if self.resilience.batch_policy == "fixed" and self.global_batch_size < 1:
            raise RecipeError(f"global_batch_size: got {self.global_batch_size}, expected >= 1")
        self.batch_policy()  # validates batch_policy / lr_scaling / per_replica_batch_size together
        if self.resilience.batch_policy == "fixed" and self.resilience.max_replicas > self.global_batch_size:
            raise RecipeError(
                f"resilience.max_replicas: {self.resilience.max_replicas} replicas cannot share a global batch "
                f"of {self.global_batch_size} samples (every replica needs at least one)"
            )
        try:
            json.dumps(self.task_config)
        except TypeError as exc:
            raise RecipeError(f"task_config: must be JSON-serialisable ({exc})") from exc

    def batch_policy(self) -> Any:
        from tuneforge.distributed.assignment import BatchPolicy

        r = self.resilience
        return BatchPolicy(
            global_batch_size=self.global_batch_size,
            micro_batch_size=self.micro_batch_size,
            mode=r.batch_policy,  # type: ignore[arg-type]
            per_replica_batch_size=r.per_replica_batch_size,
            lr_scaling=r.lr_scaling,  # type: ignore[arg-type]
            base_replicas=r.initial_replicas,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(self.to_dict(), indent=1), fsync=False)

    @classmethod
    def load(cls, path: Path) -> JobSpec:
        data = json.loads(Path(path).read_text())
        data["resilience"] = ResilienceConfig.from_dict(data.get("resilience"))
        return cls(**data)
