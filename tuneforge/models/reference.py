"""The frozen model a method compares against: DPO's, KTO's, GRPO's and PPO's reference policy, a teacher.

With an adapter the reference costs no second copy of the weights: it is the policy with its adapter switched
off for the forward pass. With full fine-tuning (or for a teacher) it is a separate frozen model. Either way
:meth:`Reference.use` yields the module to run, in eval mode (no dropout: its outputs are targets) and without
gradients, so a task writes its forward pass once for policy and reference alike.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from tuneforge.config import ModelConfig
from tuneforge.models.adapters import adapter_disabled, is_peft
from tuneforge.models.loading import load_frozen


class Reference:
    """Either "the policy with its adapter off" (``frozen is None``) or a frozen model of its own."""

    def __init__(self, frozen: torch.nn.Module | None = None) -> None:
        self.frozen = frozen

    @property
    def kind(self) -> str:
        return "adapter_off" if self.frozen is None else "frozen"

    @classmethod
    def for_policy(cls, policy: torch.nn.Module, base: ModelConfig, device: torch.device) -> Reference:
        """The base the policy started from: its adapter switched off, or (full fine-tuning) a fresh frozen copy.

        The copy is loaded from ``base.path`` rather than cloned from `policy`, whose weights may already be
        trained (a resumed run).
        """
        if is_peft(policy):
            return cls(None)
        return cls(
            load_frozen(
                base.path,
                device,
                attn_implementation=base.attn_implementation,
                trust_remote_code=base.trust_remote_code,
            )
        )

    @contextlib.contextmanager
    def use(self, policy: torch.nn.Module) -> Iterator[torch.nn.Module]:
        """The module that computes the reference's outputs, for the block (no gradients, no dropout)."""
        model = self.frozen if self.frozen is not None else policy
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), adapter_disabled(model) if self.frozen is None else contextlib.nullcontext():
                yield model
        finally:
            model.train(was_training)
