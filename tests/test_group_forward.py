"""A GRPO group in one shared-prompt row: the prompt computed once, the same log-probs and gradients as one row each."""

from __future__ import annotations

import pytest
import torch

from tuneforge.training.forward import (
    group_sequence_batch,
    prompt_groups,
    sequence_batch,
    sequence_forward,
    shared_layout_agrees,
    sharing_pays,
)

from conftest import tiny_llama


def completions(lengths: list[int], width: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.zeros((len(lengths), width), dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        tokens[i, :n] = torch.randint(1, 40, (n,), generator=g)
        mask[i, :n] = 1
    return tokens, mask


def logps_and_grads(model: torch.nn.Module, batch, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    model.zero_grad()
    logps, _ = sequence_forward(model, batch, selective=True, temperature=0.7)
    (logps * mask * torch.linspace(-1, 1, mask.shape[1])).sum().backward()  # a loss that weighs every token
    return (logps * mask).detach(), torch.cat([p.grad.flatten() for p in model.parameters()])


def test_shared_rows_give_the_log_probs_and_gradients_of_separate_rows() -> None:
    model = tiny_llama(0)
    a, b = list(range(3, 23)), list(range(30, 5, -2))  # two prompts of 20 and 13 tokens
    prompts = [a, a, a, b, b, b, b]
    tokens, mask = completions([9, 1, 5, 9, 3, 7, 2], 9, seed=1)
    shared = group_sequence_batch(prompts, tokens, mask, pad_id=0)
    plain = sequence_batch(prompts, tokens, mask, pad_id=0)
    assert shared.input_ids.shape[0] == 2 and shared.num_sequences == 7  # one row per group
    assert shared.input_ids.numel() < plain.input_ids.numel()
    got, want = logps_and_grads(model, shared, mask), logps_and_grads(model, plain, mask)
    assert torch.allclose(got[0], want[0], atol=1e-5)
    assert (got[0][mask == 0] == 0).all()
    assert torch.allclose(got[1], want[1], atol=1e-5, rtol=1e-4)


def test_groups_are_runs_of_the_same_prompt() -> None:
    assert prompt_groups([[1, 2], [1, 2], [3], [1, 2]]) == [range(2), range(2, 3), range(3, 4)]
    assert prompt_groups([]) == []


@pytest.mark.parametrize(
    ("prompt", "lengths", "hidden", "expected"),
    [
        (100, [32] * 8, 128, True),  # a long prompt, short answers: 356 tokens in one row instead of 1056
        (10, [512] * 8, 128, False),  # long answers: one row's attention would cost more than the prompt saves
        (64, [64] * 2, 4096, True),  # a wide model: projections dominate, saving tokens is what counts
    ],
)
def test_sharing_is_chosen_by_the_work_it_saves(prompt: int, lengths: list[int], hidden: int, expected: bool) -> None:
    assert sharing_pays(prompt, lengths, hidden) is expected


def test_the_layout_check_passes_on_a_llama() -> None:
    assert shared_layout_agrees(tiny_llama(0), list(range(3, 15)), pad_id=0)
    assert shared_layout_agrees(tiny_llama(0), [5, 6], pad_id=0)  # a prompt shorter than the made-up completions
