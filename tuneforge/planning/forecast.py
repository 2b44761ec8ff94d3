"""The forecast of a resolved plan — peak memory by part, tokens and time per step, wall time, replicas — the check
that refuses a run which cannot fit, and the record that holds every finished run against its forecast."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from tuneforge.config import Recipe
from tuneforge.errors import TuneforgeError
from tuneforge.methods import method_spec
from tuneforge.planning.hardware import Hardware
from tuneforge.planning.resolve import ALLOCATOR_OVERHEAD, SAFETY, Resolved
from tuneforge.planning.timing import rate_for, step_flops, step_seconds
from tuneforge.planning.workload import memory, policy_shape, sample_size, step_work

MB = 2**20


class DoesNotFit(TuneforgeError):
    """The forecast peak memory exceeds the device's memory (``--force`` trains anyway)."""


@dataclass
class Forecast:
    hardware: str
    memory_limit_mb: float
    memory: dict[str, float]  # peak_mb and each part's MB (tensors)
    process_peak_mb: float  # what the process is forecast to hold: tensors × the allocator's overhead
    memory_without_ckpt_mb: float
    memory_with_ckpt_mb: float
    tokens_per_step: int
    step_flops: float
    step_s: float
    wall_s: float
    time_source: str
    replicas: int
    explain: dict[str, str] = field(default_factory=dict)
    sample: dict[str, Any] = field(default_factory=dict)

    @property
    def fits(self) -> bool:
        return self.process_peak_mb <= self.memory_limit_mb

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def make_forecast(recipe: Recipe, res: Resolved, hardware: Hardware, prepared: Any = None) -> Forecast:
    spec = method_spec(recipe.method)
    shape = policy_shape(recipe, spec)
    per_replica = recipe.train.global_batch_size // res.data_parallel
    common = dict(
        micro=res.micro_batch_size,
        grad_accumulation=res.grad_accumulation,
        precision=res.precision,
        prepared=prepared,
        data_parallel=res.data_parallel,
        device=hardware.kind,
    )
    mem = memory(recipe, shape, gradient_checkpointing=res.gradient_checkpointing, **common)
    without = memory(recipe, shape, gradient_checkpointing=False, **common).peak
    with_ckpt = memory(recipe, shape, gradient_checkpointing=True, **common).peak
    work = step_work(
        recipe,
        shape,
        per_replica=per_replica,
        gradient_checkpointing=res.gradient_checkpointing,
        prepared=prepared,
        micro=res.micro_batch_size,
    )
    flops = step_flops(shape, work)
    rate = rate_for(recipe, hardware, res.num_threads, res.precision)
    step_s = step_seconds(shape, work, rate)
    evals = res.total_steps // res.eval_every if res.eval_every else 0
    wall = res.total_steps * step_s + evals * step_s / 3  # an evaluation is about a forward over a batch
    overhead = ALLOCATOR_OVERHEAD.get(hardware.kind, 1.0)
    explain = dict(res.explain)
    explain.setdefault(
        "grad_accumulation",
        f"accumulation {res.grad_accumulation}: {per_replica} per replica / micro {res.micro_batch_size}",
    )
    return Forecast(
        hardware=hardware.label,
        memory_limit_mb=round((res.memory_limit_bytes or hardware.memory_bytes) / MB, 1),
        memory=mem.as_dict(),
        process_peak_mb=round(mem.peak * overhead / MB, 1),
        memory_without_ckpt_mb=round(without / MB, 1),
        memory_with_ckpt_mb=round(with_ckpt / MB, 1),
        tokens_per_step=work.tokens * res.data_parallel,
        step_flops=flops,
        step_s=step_s,
        wall_s=wall,
        time_source=rate.source,
        replicas=res.data_parallel,
        explain=explain,
        sample=asdict(sample_size(recipe, spec, prepared)),
    )


def check_fits(f: Forecast, *, force: bool = False) -> None:
    """Refuse up front, with the numbers, a run whose forecast peak exceeds the memory it may use."""
    if f.fits or force:
        return
    parts = ", ".join(f"{k.removesuffix('_mb')} {v:.0f}" for k, v in f.memory.items() if k != "peak_mb" and v)
    raise DoesNotFit(
        f"this run is forecast to need {f.process_peak_mb:.0f} MB at its peak but {f.memory_limit_mb:.0f} MB are "
        f"available ({f.hardware}); tensors {f.memory['peak_mb']:.0f} MB = {parts}. With gradient checkpointing it "
        f"would need {f.memory_with_ckpt_mb:.0f} MB of tensors. Lower train.micro_batch_size or data.max_length, "
        "use an adapter (adapter.kind: lora), set train.gradient_checkpointing: auto, or pass --force to try anyway "
        f"(the forecast keeps a {SAFETY:.0%} margin when it picks values itself)"
    )


def render(f: Forecast, recipe: Recipe, res: Resolved) -> str:
    """The plan as a person reads it: every resolved value with its reason, then the forecast."""
    m = f.memory
    lines = [
        f"tuneforge plan · {recipe.method} · {recipe.adapter.kind} · {f.hardware}",
        f"  device {res.device} · precision {res.precision} · micro-batch {res.micro_batch_size} × accumulation "
        f"{res.grad_accumulation} × replicas {res.data_parallel} = {recipe.train.global_batch_size} · lr {res.lr:.3g} · "
        f"grad-ckpt {'on' if res.gradient_checkpointing else 'off'} · {res.total_steps} steps",
        "auto values:",
        *[f"  {line}" for line in f.explain.values()],
        "memory forecast (peak, MB):",
        "  " + " · ".join(f"{k.removesuffix('_mb')} {v:.0f}" for k, v in m.items() if k != "peak_mb" and v),
        f"  tensors {m['peak_mb']:.0f} (grad-ckpt off {f.memory_without_ckpt_mb:.0f}, on {f.memory_with_ckpt_mb:.0f}) · "
        f"process ≈ {f.process_peak_mb:.0f} of {f.memory_limit_mb:.0f} available — "
        + ("fits" if f.fits else "DOES NOT FIT"),
        f"time forecast ({f.time_source}):",
        f"  {f.tokens_per_step} tokens/step · {f.step_flops / 1e9:.1f} GFLOP/step · {f.step_s:.3g} s/step · "
        f"wall ≈ {_duration(f.wall_s)}",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def versus(f: Forecast, measured: dict[str, Any]) -> dict[str, Any]:
    """Forecast next to measurement, with relative errors ((forecast − measured) / measured)."""

    def err(a: float, b: float) -> float | None:
        return round((a - b) / b, 4) if b else None

    out: dict[str, Any] = {"forecast": f.as_dict(), "measured": measured}
    mem_forecast = f.process_peak_mb if measured.get("memory_kind") == "process" else f.memory["peak_mb"]
    out["errors"] = {
        "peak_memory": err(mem_forecast, measured.get("peak_mb", 0.0)),
        "step_time": err(f.step_s, measured.get("step_s", 0.0)),
        "wall_time": err(f.wall_s, measured.get("wall_s", 0.0)),
    }
    return out
