"""Every run checks the planner: the forecast made before the model loads, refused up front when it cannot fit,
and held against what the run measured — in ``result.json`` (``planner``) and MLflow (``planner/*``)."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from tuneforge.config import Recipe
from tuneforge.errors import ModelError
from tuneforge.methods import method_spec
from tuneforge.models.loading import model_fingerprint
from tuneforge.planning.forecast import Forecast, check_fits, make_forecast, versus
from tuneforge.planning.hardware import local_hardware
from tuneforge.planning.measure import MemoryMeter
from tuneforge.planning.resolve import Resolved
from tuneforge.planning.timing import Rate, cached_rate, family, fixed_seconds, hardware_key, rate_entry, record_rate
from tuneforge.planning.workload import policy_shape, step_work

MB = 2**20


@dataclass
class RunCheck:
    recipe: Recipe
    res: Resolved
    forecast: Forecast | None
    meter: MemoryMeter | None = None
    t0: float = field(default_factory=time.perf_counter)
    prepared: Any = None

    def start_measuring(self) -> None:
        """Right before the model is built: the peak from here on is the training phase's."""
        self.meter = MemoryMeter(torch.device(self.res.device)).start()
        self.t0 = time.perf_counter()

    def finish(self, history: list[dict[str, float]], tracker: Any = None) -> dict[str, Any]:
        """Forecast vs measured (peak memory, median step time after the first step, wall time of the training).

        Without :meth:`start_measuring` (an elastic run: replica processes trained) the rows are the measurement:
        their largest ``peak_mb`` and the sum of their ``step_s`` (from the writing replica's model build on)."""
        steps = [float(r["step_s"]) for r in history if "step_s" in r]
        tail = steps[1:] or steps
        here = self.meter is not None
        measured: dict[str, Any] = {
            "step_s": statistics.median(tail) if tail else 0.0,
            "wall_s": time.perf_counter() - self.t0 if here else sum(steps),
        }
        if self.meter is not None:
            kind = "tensors" if self.meter.device.type == "cuda" else "process"
            measured.update(peak_mb=self.meter.peak_bytes() / MB, memory_kind=kind, memory_method=self.meter.method)
        elif peaks := [float(r["peak_mb"]) for r in history if "peak_mb" in r]:
            measured.update(replica_peak(peaks, torch.device(self.res.device)))
        if self.forecast is None:
            return {"forecast": None, "measured": measured}
        out = versus(self.forecast, measured)
        if tracker is not None:
            numbers = {
                "planner/forecast_peak_mb": out["forecast"]["process_peak_mb"]
                if measured.get("memory_kind") == "process"
                else out["forecast"]["memory"]["peak_mb"],
                "planner/forecast_step_s": self.forecast.step_s,
                "planner/forecast_wall_s": self.forecast.wall_s,
                "planner/measured_step_s": measured["step_s"],
                "planner/measured_wall_s": measured["wall_s"],
                **({"planner/measured_peak_mb": measured["peak_mb"]} if "peak_mb" in measured else {}),
                **{f"planner/error_{k}": v for k, v in out["errors"].items() if v is not None},
            }
            tracker.log_metrics(numbers, step=self.res.total_steps)
        if here:  # an elastic step also waits for quorum and all-reduce: not the work the rate cache describes
            self._calibrate(measured["step_s"])
        return out

    def _calibrate(self, step_s: float) -> None:
        """A finished run is a calibration: its measured rate serves the next forecast for this hardware and model."""
        spec = method_spec(self.recipe.method)
        if self.forecast is None or spec.generates or step_s <= 0 or self.res.total_steps < 3:
            return  # sampling time is not FLOP-bound; too few steps are all warm-up
        from tuneforge.planning.calibrate import shape_key

        device = torch.device(self.res.device)
        hardware, model = (
            hardware_key(device.type, self.res.num_threads, self.res.precision),
            model_fingerprint(self.recipe.model.path),
        )
        kind = family(self.recipe.adapter.kind)
        fixed = cached_rate(hardware, model, kind) or Rate(0.0)  # the fixed costs a calibration measured, if any
        shape = policy_shape(self.recipe, spec)
        work = step_work(
            self.recipe,
            shape,
            per_replica=self.recipe.train.global_batch_size // self.res.data_parallel,
            gradient_checkpointing=self.res.gradient_checkpointing,
            prepared=self.prepared,
            micro=self.res.micro_batch_size,
        )
        entry = rate_entry(
            shape_key(self.recipe, self.res), self.forecast.step_flops, step_s - fixed_seconds(work, fixed), kind, fixed
        )
        if entry is not None:
            record_rate(hardware, model, entry)


def replica_peak(peaks: list[float], device: torch.device) -> dict[str, Any]:
    """An elastic run's measured peak: each replica measured its own (a :class:`MemoryMeter` started before its model
    was built) and the steps logged the largest over replicas so far; the run's peak is the largest of those."""
    cuda = device.type == "cuda"
    method = (
        "torch.cuda.max_memory_allocated"
        if cuda
        else "VmHWM (peak RSS, reset before the model; ru_maxrss where clear_refs is not writable)"
    )
    return {
        "peak_mb": max(peaks),
        "memory_kind": "tensors" if cuda else "process",
        "memory_method": f"{method}, max over replicas",
    }


def check_run(recipe: Recipe, res: Resolved, prepared: Any, *, force: bool = False) -> RunCheck:
    """The forecast for this machine, refused with the numbers when it does not fit (unless `force`)."""
    try:
        forecast = make_forecast(recipe, res, local_hardware(recipe.train.device), prepared)
    except (ModelError, OSError):
        return RunCheck(recipe, res, None)  # e.g. a hub model not in the local cache: nothing to plan from
    check_fits(forecast, force=force)
    return RunCheck(recipe, res, forecast, prepared=prepared)
