"""A tiny task for tests and benchmarks: an MLP regressing synthetic data addressed by global index.

Each sample carries a different number of "tokens" (1..4), its loss weight, so the token-normalised
exactness rule of :mod:`tuneforge.distributed.task` is actually exercised. ``sample_time_s`` adds a
sleep per sample to stand in for accelerator compute (a sleeping replica leaves the CPU to the
others, so wall-clock numbers on a small CPU box behave like a GPU job's).

Factory string: ``"tuneforge.distributed.toy:make_task"``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn


class ToyTask:
    def __init__(
        self,
        num_samples: int = 512,
        dim: int = 8,
        hidden: int = 16,
        lr: float = 1e-2,
        warmup_steps: int = 5,
        data_seed: int = 1234,
        sample_time_s: float = 0.0,
        threads: int = 1,
    ) -> None:
        torch.set_num_threads(threads)
        self.dim, self.hidden, self.lr, self.warmup = dim, hidden, lr, warmup_steps
        self.sample_time_s = sample_time_s
        gen = torch.Generator().manual_seed(data_seed)
        self.x = torch.randn(num_samples, dim, generator=gen)
        teacher = torch.randn(dim, 1, generator=gen)
        self.y = torch.tanh(self.x @ teacher) + 0.05 * torch.randn(num_samples, 1, generator=gen)
        self.tokens = 1 + torch.arange(num_samples) % 4

    def build(self, seed: int) -> tuple[nn.Module, torch.optim.Optimizer, Any]:
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Linear(self.dim, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
        optimizer = torch.optim.AdamW(model.parameters(), lr=self.lr, weight_decay=0.01)
        warmup = self.warmup
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, warmup)))
        return model, optimizer, scheduler

    def num_samples(self) -> int:
        return int(self.x.shape[0])

    def loss_tokens(self, indices: Sequence[int]) -> int:
        return int(self.tokens[list(indices)].sum()) if len(indices) else 0

    def forward_backward(self, model: nn.Module, indices: Sequence[int], scale: float) -> Mapping[str, float]:
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        pred = model(self.x[idx])
        per_sample = ((pred - self.y[idx]) ** 2).squeeze(1) * self.tokens[idx]
        loss = per_sample.sum() * scale
        loss.backward()
        if self.sample_time_s:
            time.sleep(self.sample_time_s * len(indices))
        return {"loss": float(loss.detach())}


def make_task(config: Mapping[str, Any]) -> ToyTask:
    return ToyTask(**dict(config))
