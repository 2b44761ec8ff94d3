"""KTO objective checked against TRL 1.16's ``KTOTrainer`` code.

TRL has no standalone KTO loss function: the loss is inline in ``KTOTrainer._compute_loss``, which runs the policy
and reference models. So the trainer is built without ``__init__`` (only the attributes that method reads) and given
stand-in "models" that return fixed per-token log-probs, one completion token per row: TRL's own loss, reference
point, normalisation and metric code then run on exactly our inputs. The KL pairing is checked by running TRL's own
``add_kl_completion_ids`` through ``datasets.map`` the way ``_prepare_dataset`` does.
"""

from __future__ import annotations

import types
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tuneforge.objectives.kto import kto_loss, kto_mismatched_indices, kto_reference_point, kto_step_mismatched_indices

F64 = dict(dtype=torch.float64)
TOL = dict(rtol=1e-6, atol=1e-6)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def accelerator(tmp_path_factory):
    """A real single-process Accelerator, made after TRL's config (which resets accelerate's state); state undone."""
    pytest.importorskip("trl")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from trl import KTOConfig

    was_initialised = PartialState._shared_state != {}
    args = KTOConfig(output_dir=str(tmp_path_factory.mktemp("kto")), report_to="none", use_cpu=True)
    yield SimpleNamespace(accelerator=Accelerator(cpu=True), args=args)
    if not was_initialised:
        AcceleratorState._reset_state(reset_partial_state=True)


class _TableLM(torch.nn.Module):
    """Stands in for an LM with TRL's fused head: a row ``[0, k]`` scores its one completion token with ``table[k]``."""

    is_gradient_checkpointing = False

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = table

    def forward(self, input_ids, **_):
        log_probs = self.table[input_ids[:, 1]].unsqueeze(-1)  # (rows, seq - 1)
        zeros = torch.zeros_like(log_probs).detach()
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros)


def _trl_kto(env, policy_logps, ref_logps, desirable, policy_kl, ref_kl, *, beta, dw, uw):
    """TRL's ``_compute_loss`` on these log-probs: (loss, d loss / d policy_logps, logged metrics)."""
    from trl import KTOTrainer

    n = len(desirable)
    policy_table = torch.cat([policy_logps, policy_kl]).detach().requires_grad_()
    policy, ref = _TableLM(policy_table).eval(), _TableLM(torch.cat([ref_logps, ref_kl])).eval()
    trainer = KTOTrainer.__new__(KTOTrainer)
    attributes = dict(
        model=policy,
        ref_model=ref,
        args=env.args,
        accelerator=env.accelerator,
        beta=beta,
        loss_type="kto",
        desirable_weight=dw,
        undesirable_weight=uw,
        calculate_KL=True,
        precompute_ref_logps=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    for name, value in attributes.items():
        setattr(trainer, name, value)
    rows = torch.arange(n)
    ones, completion = torch.ones(n, 2, dtype=torch.long), torch.tensor([[0, 1]] * n)
    batch = {
        "input_ids": torch.stack([torch.zeros_like(rows), rows], 1),
        "attention_mask": ones,
        "completion_mask": completion,
        "KL_input_ids": torch.stack([torch.zeros_like(rows), rows + n], 1),
        "KL_attention_mask": ones,
        "KL_completion_mask": completion,
        "label": desirable.clone(),
    }
    loss = trainer._compute_loss(policy, batch, return_outputs=False)
    loss.backward()
    return loss, policy_table.grad[:n], trainer._metrics["eval"]


def _inputs(seed: int, labels: torch.Tensor, kl_shift: float):
    gen, n = _gen(seed), len(labels)
    policy, ref = (-(torch.rand(n, generator=gen, **F64) * 30 + 0.1) for _ in range(2))
    ref_kl = -(torch.rand(n, generator=gen, **F64) * 30 + 0.1)
    policy_kl = ref_kl + torch.randn(n, generator=gen, **F64) * 3 + kl_shift
    return policy, ref, labels, policy_kl, ref_kl


LABELS = {
    "mixed": [True, False, False, True, True, False, True],
    "all_desirable": [True] * 5,
    "all_undesirable": [False] * 4,
    "two": [False, True],
}


@pytest.mark.parametrize("labels", list(LABELS))
@pytest.mark.parametrize(("beta", "dw", "uw"), [(0.1, 1.0, 1.0), (0.5, 1.3, 0.7), (2.0, 0.6, 1.8)])
@pytest.mark.parametrize("kl_shift", [2.0, -4.0])  # z0 > 0, and a negative mean clamped to 0
def test_kto_matches_trl_compute_loss(accelerator, labels, beta, dw, uw, kl_shift):
    policy, ref, desirable, policy_kl, ref_kl = _inputs(7, torch.tensor(LABELS[labels]), kl_shift)
    trl_loss, trl_grad, logged = _trl_kto(
        accelerator, policy, ref, desirable, policy_kl, ref_kl, beta=beta, dw=dw, uw=uw
    )

    z0 = kto_reference_point(policy_kl, ref_kl)
    assert z0.item() == pytest.approx(logged["kl"][-1], abs=1e-12)
    assert (z0.item() > 0) == (kl_shift > 0)
    leaf = policy.clone().requires_grad_()
    total, metrics = kto_loss(leaf, ref, desirable, z0, beta=beta, desirable_weight=dw, undesirable_weight=uw)
    n = len(desirable)
    (total / n).backward()  # TRL averages the concatenated per-example losses of the batch
    torch.testing.assert_close(total / n, trl_loss, **TOL)
    torch.testing.assert_close(leaf.grad, trl_grad, **TOL)

    for side in ("chosen", "rejected"):
        count = metrics[f"count/{side}"].item()
        assert count == int((desirable if side == "chosen" else ~desirable).sum())
        if count:
            for kind in ("rewards", "logps"):
                assert metrics[f"{kind}/{side}_sum"].item() / count == pytest.approx(logged[f"{kind}/{side}"][-1])
        else:
            assert f"rewards/{side}" not in logged and metrics[f"rewards/{side}_sum"].item() == 0.0
    assert metrics["kl"].item() == z0.item() and not any(v.requires_grad for v in metrics.values())


def _trl_add_kl_completion_ids():
    """The nested ``add_kl_completion_ids`` of ``KTOTrainer._prepare_dataset``, rebuilt from its code object."""
    from trl import KTOTrainer

    codes = [
        c
        for c in KTOTrainer._prepare_dataset.__code__.co_consts
        if getattr(c, "co_name", None) == "add_kl_completion_ids"
    ]
    assert len(codes) == 1 and not codes[0].co_freevars, "TRL changed how it builds the KL completions"
    return types.FunctionType(codes[0], {})


@pytest.mark.parametrize(("n", "chunk"), [(8, 4), (10, 4), (9, 4), (6, 6), (5, 2), (3, 8)])
def test_mismatched_indices_match_trl_dataset_map(n, chunk):
    datasets = pytest.importorskip("datasets")
    dataset = datasets.Dataset.from_dict({"completion_ids": [[100 + i] for i in range(n)]})
    mapped = dataset.map(_trl_add_kl_completion_ids(), batched=True, batch_size=chunk)  # as _prepare_dataset does
    trl_src = [ids[0] - 100 for ids in mapped["KL_completion_ids"]]
    assert kto_mismatched_indices(n, chunk).tolist() == trl_src
    assert kto_mismatched_indices(4).tolist() == [3, 0, 1, 2]


def test_step_indices_are_split_invariant_and_match_trl_on_one_micro_batch():
    for n in (2, 5, 12):
        src = kto_step_mismatched_indices(n)
        assert src.tolist() == kto_mismatched_indices(n).tolist()
        assert sorted(src.tolist()) == list(range(n)) and all(s != i for i, s in enumerate(src.tolist()))
    assert kto_step_mismatched_indices(6, offset=2).tolist() == [4, 5, 0, 1, 2, 3]
    # TRL's pairing changes with the per-device batch size; the step rule has no such argument
    assert kto_mismatched_indices(8, 4).tolist() != kto_mismatched_indices(8, 2).tolist()
    with pytest.raises(ValueError, match="n >= 2"):
        kto_step_mismatched_indices(1)


def test_gradient_signs():
    """Raising a desirable example's policy log-prob lowers the loss; raising an undesirable one's raises it."""
    policy, ref, desirable, policy_kl, ref_kl = _inputs(3, torch.tensor(LABELS["mixed"]), 1.0)
    leaf = policy.clone().requires_grad_()
    loss, _ = kto_loss(leaf, ref, desirable, kto_reference_point(policy_kl, ref_kl), beta=0.5, desirable_weight=1.5)
    loss.backward()
    assert (leaf.grad[desirable] < 0).all() and (leaf.grad[~desirable] > 0).all()


def test_sum_over_split_equals_whole_with_shared_reference_point():
    policy, ref, desirable, policy_kl, ref_kl = _inputs(5, torch.tensor(LABELS["mixed"] * 2), 1.5)
    z0 = kto_reference_point(policy_kl, ref_kl)
    kwargs = dict(beta=0.3, desirable_weight=1.2, undesirable_weight=0.8)
    whole, whole_metrics = kto_loss(policy, ref, desirable, z0, **kwargs)
    for cut in (1, 5, 9):
        parts = [
            kto_loss(p, r, d, z0, **kwargs)
            for p, r, d in ((policy[:cut], ref[:cut], desirable[:cut]), (policy[cut:], ref[cut:], desirable[cut:]))
        ]
        torch.testing.assert_close(parts[0][0] + parts[1][0], whole, rtol=1e-12, atol=1e-12)
        for name, value in whole_metrics.items():
            if name != "kl":
                torch.testing.assert_close(parts[0][1][name] + parts[1][1][name], value, rtol=1e-12, atol=1e-12)


def test_reference_point_is_detached_and_bad_arguments_are_named():
    policy_kl = torch.tensor([-1.0, -2.0], requires_grad=True)
    z0 = kto_reference_point(policy_kl, torch.tensor([-1.5, -1.5]))
    assert not z0.requires_grad and z0.dim() == 0 and z0.item() == 0.0  # mean is 0 exactly: clamp keeps it 0
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="bool tensor"):
        kto_loss(x, x, torch.ones(3), torch.tensor(0.0))
    with pytest.raises(ValueError, match="one \\(N,\\) shape"):
        kto_loss(x, torch.zeros(2), torch.ones(3, dtype=torch.bool), torch.tensor(0.0))
    with pytest.raises(ValueError, match="kl must be a scalar"):
        kto_loss(x, x, torch.ones(3, dtype=torch.bool), torch.zeros(2))
    with pytest.raises(ValueError, match="beta must be > 0"):
        kto_loss(x, x, torch.ones(3, dtype=torch.bool), torch.tensor(0.0), beta=0.0)
