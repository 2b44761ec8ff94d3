"""The training loop: one readable PyTorch loop, parameterised by the objective.

Per optimizer step it takes the step's rows from the plan, splits them into micro-batches, accumulates
gradients of ``loss_sum / supervised_tokens_in_global_batch`` (exact under any split), clips, steps, and
schedules. Metrics stay on the device as tensors and are synchronised once per ``log_every`` steps, so the
host never waits on the accelerator inside the hot path.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tuneforge.data.batching import collate
from tuneforge.data.sampler import Plan
from tuneforge.data.token_cache import TokenizedSource
from tuneforge.objectives.sft import sft_loss
from tuneforge.training.checkpoint import save_checkpoint
from tuneforge.training.forward import supervised_logits
from tuneforge.training.precision import autocast
from tuneforge.training.progress import Progress


@dataclass
class LoopSettings:
    total_steps: int
    micro_batch_size: int
    max_length: int
    packing: bool
    grad_clip: float | None
    precision: str
    device: torch.device
    log_every: int
    eval_every: int | None
    checkpoint_every: int | None
    keep_checkpoints: int
    pad_id: int
    selective_head: bool


@dataclass
class LoopResult:
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    train_seconds: float = 0.0
    tokens: int = 0


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas: tuple[float, float],
                   device: torch.device) -> torch.optim.Optimizer:
    """AdamW; no weight decay on biases and norms (1-D tensors), fused kernels where available."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]]
    fused = device.type == "cuda"
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused, foreach=None if fused else True)


def forward_backward(model: torch.nn.Module, plan: Plan, rows: range | list[int], sources: list[TokenizedSource],
                     s: LoopSettings, scale: float) -> tuple[torch.Tensor, int]:
    """Accumulate gradients of ``scale · Σ token losses`` over `rows`, in micro-batches.

    Returns the (unscaled, detached) loss sum and the number of tokens fed. Shared by the single-process
    loop and the elastic replicas, so both compute exactly the same thing.
    """
    loss_acc = torch.zeros((), device=s.device)
    fed = 0
    rows = list(rows)
    for i in range(0, len(rows), s.micro_batch_size):
        batch = collate([plan.row(r) for r in rows[i : i + s.micro_batch_size]], sources, s.pad_id,
                        s.max_length if s.packing else None).to(s.device)
        with autocast(s.precision, s.device):
            logits, targets = supervised_logits(model, batch, s.selective_head)
        loss_sum, _ = sft_loss(logits, targets)
        (loss_sum * scale).backward()
        loss_acc += loss_sum.detach()
        fed += batch.num_tokens
    return loss_acc, fed


@torch.no_grad()
def evaluate(model: torch.nn.Module, val_sources: dict[str, TokenizedSource], s: LoopSettings,
             max_examples: int = 512) -> dict[str, float]:
    """Mean token loss on each validation source (documents unpacked, dynamic padding)."""
    model.eval()
    out: dict[str, float] = {}
    total_loss = total_tok = 0.0
    for name, src in val_sources.items():
        n = min(len(src), max_examples)
        loss_sum = torch.zeros((), device=s.device)
        tokens = 0
        for start in range(0, n, s.micro_batch_size):
            rows = [np.array([[0, i]]) for i in range(start, min(start + s.micro_batch_size, n))]
            batch = collate(rows, [src], s.pad_id).to(s.device)
            with autocast(s.precision, s.device):
                logits, targets = supervised_logits(model, batch, s.selective_head)
            part, _ = sft_loss(logits, targets)
            loss_sum += part
            tokens += targets.numel()
        out[f"val/{name}_loss"] = float(loss_sum) / max(tokens, 1)
        total_loss += float(loss_sum)
        total_tok += tokens
    out["val/loss"] = total_loss / max(total_tok, 1)
    model.train()
    return out


def train_loop(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, plan: Plan,
               sources: list[TokenizedSource], val_sources: dict[str, TokenizedSource], s: LoopSettings, *,
               start_step: int = 0, run_dir: Path, progress: Progress,
               log_fn: Callable[[dict[str, float], int], None] = lambda m, step: None,
               checkpoint_meta: dict[str, Any] | None = None) -> LoopResult:
    result = LoopResult()
    params = [p for p in model.parameters() if p.requires_grad]
    metrics_file = (run_dir / "metrics.jsonl").open("a")
    pending: list[tuple[int, torch.Tensor, torch.Tensor, float, int, float]] = []
    window_t0, window_tokens = time.perf_counter(), 0
    step_time = 0.0
    model.train()
    with progress:
        for step in range(start_step, s.total_steps):
            t0 = time.perf_counter()
            n_tok = max(plan.step_tokens(step), 1)
            loss_acc, fed = forward_backward(model, plan, plan.rows_for_step(step), sources, s, 1.0 / n_tok)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, s.grad_clip or math.inf)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step_time += time.perf_counter() - t0
            window_tokens += fed
            result.tokens += fed
            pending.append((step + 1, loss_acc / n_tok, grad_norm, lr, fed, time.perf_counter() - t0))

            done = step + 1
            last = done == s.total_steps
            if done % s.log_every == 0 or last:
                elapsed = time.perf_counter() - window_t0
                tok_s = window_tokens / elapsed if elapsed > 0 else 0.0
                for k, loss, gn, lr_k, fed_k, dt in pending:
                    row = {"step": k, "loss": float(loss), "grad_norm": float(gn), "lr": lr_k, "tokens": fed_k,
                           "step_s": dt}
                    result.history.append(row)
                    metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                latest = dict(result.history[-1], tokens_per_s=tok_s)
                log_fn({"train/loss": latest["loss"], "train/grad_norm": latest["grad_norm"], "train/lr": latest["lr"],
                        "train/tokens_per_s": tok_s}, done)
                progress.update(done, latest)
                pending.clear()
                window_t0, window_tokens = time.perf_counter(), 0
            if s.eval_every and val_sources and (done % s.eval_every == 0 or last):
                ev = evaluate(model, val_sources, s)
                result.evals.append({"step": done, **ev})
                log_fn(ev, done)
                progress.note(f"step {done}: " + "  ".join(f"{k} {v:.4f}" for k, v in ev.items()))
            if s.checkpoint_every and (done % s.checkpoint_every == 0) and not last:
                save_checkpoint(run_dir / "checkpoints", step=done, model=model, optimizer=optimizer,
                                scheduler=scheduler, meta=checkpoint_meta or {}, keep=s.keep_checkpoints)
    metrics_file.close()
    result.train_seconds = step_time
    return result
