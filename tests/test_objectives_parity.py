"""Every objective checked numerically against a reference.

Where TRL 1.16 implements the same loss, the reference is TRL's own code, called on a real TRL trainer object built
without its ``__init__`` (which wants datasets, tokenizers and downloads): only the attributes the loss method reads
are set. DPO, GRPO and the reward model loss live inside TRL methods that run the model, so those comparisons run a
tiny randomly initialised Llama through both TRL's path and ours and compare losses, metrics and parameter
gradients. Everything else is compared with explicit per-element formulas written out below (Python floats, loops).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from tuneforge.objectives.distill import distill_loss
from tuneforge.objectives.dpo import dpo_loss, orpo_loss, simpo_loss
from tuneforge.objectives.grpo import group_advantages, grpo_loss
from tuneforge.objectives.logprobs import masked_mean, sequence_logprobs, token_logprobs
from tuneforge.objectives.ppo import gae, kl_penalized_rewards, masked_whiten, ppo_policy_loss, ppo_value_loss
from tuneforge.objectives.reward import pairwise_accuracy, reward_loss

from conftest import tiny_llama

pytestmark = pytest.mark.filterwarnings("ignore:You are importing from 'trl.experimental'")

VOCAB = 40
F64 = dict(dtype=torch.float64)
TIGHT = dict(rtol=1e-10, atol=1e-12)  # float64 against float64
MODEL = dict(rtol=2e-5, atol=2e-6)  # float32 model forwards: TRL's fused LM head vs. plain logits


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _right_padded_mask(gen: torch.Generator, rows: int, cols: int, min_len: int = 1) -> torch.Tensor:
    lengths = torch.randint(min_len, cols + 1, (rows,), generator=gen)
    return (torch.arange(cols) < lengths[:, None]).long()


# --------------------------------------------------------------------------------------------------------------
# TRL plumbing (test-only dependency)


@pytest.fixture(scope="module")
def trl_env(tmp_path_factory):
    """A real single-process Accelerator factory; global accelerate state is undone afterwards.

    Build the TRL config first: ``TrainingArguments`` resets accelerate's shared state, so an Accelerator made
    before it would be left without a device.
    """
    pytest.importorskip("trl")
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState

    was_initialised = PartialState._shared_state != {}
    env = {"accelerator": lambda: Accelerator(cpu=True), "dir": str(tmp_path_factory.mktemp("trl"))}
    yield env
    if not was_initialised:
        AcceleratorState._reset_state(reset_partial_state=True)


def _bare_trainer(cls, **attributes):
    """A TRL trainer object without ``__init__``: just the attributes its loss method reads."""
    trainer = cls.__new__(cls)
    trainer._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}
    trainer._total_train_tokens = 0
    trainer._tp_size = 1
    for name, value in attributes.items():
        setattr(trainer, name, value)
    return trainer


def _grads(model) -> list[torch.Tensor]:
    grads = [p.grad.detach().clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad(set_to_none=True)
    return grads


def _assert_grads_close(ours, theirs, rel: float) -> None:
    """Parameter gradients agree to ``rel`` of each tensor's largest entry (float32 noise sits near zero)."""
    assert len(ours) == len(theirs) and len(ours) > 0
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=rel, atol=rel * float(b.abs().max()))


# --------------------------------------------------------------------------------------------------------------
# logprobs


def test_token_logprobs_matches_trl_selective_log_softmax():
    pytest.importorskip("trl")
    from trl.trainer.utils import selective_log_softmax

    gen = _gen(0)
    logits = torch.randn(3, 7, VOCAB, generator=gen, **F64) * 3
    labels = torch.randint(0, VOCAB, (3, 7), generator=gen)
    torch.testing.assert_close(token_logprobs(logits, labels), selective_log_softmax(logits, labels), **TIGHT)
    # small chunks and a non-contiguous (shifted) view give the same numbers
    torch.testing.assert_close(
        token_logprobs(logits[:, :-1], labels[:, 1:], chunk_tokens=2),
        selective_log_softmax(logits[:, :-1], labels[:, 1:]),
        **TIGHT,
    )


def test_token_logprobs_hand_reference_ignore_index_and_bf16():
    gen = _gen(1)
    logits = torch.randn(2, 5, VOCAB, generator=gen, **F64)
    labels = torch.randint(0, VOCAB, (2, 5), generator=gen)
    labels[0, 3] = labels[1, 0] = -100
    got = token_logprobs(logits, labels)
    for b in range(2):
        for t in range(5):
            if labels[b, t] == -100:
                assert got[b, t].item() == 0.0
                continue
            row = logits[b, t].tolist()
            expected = row[labels[b, t]] - math.log(sum(math.exp(x) for x in row))
            assert got[b, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-12)

    # half precision is normalised in float32: same as upcasting the bf16 values first
    half = (logits * 4).to(torch.bfloat16)
    got_half = token_logprobs(half, labels)
    assert got_half.dtype == torch.float32
    upcast = half.float().log_softmax(-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1) * (labels != -100)
    torch.testing.assert_close(got_half, upcast, rtol=1e-6, atol=1e-6)


def test_sequence_logprobs_matches_trl_get_batch_logps():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    gen = _gen(2)
    logits = torch.randn(4, 9, VOCAB, generator=gen, **F64) * 2
    input_ids = torch.randint(0, VOCAB, (4, 9), generator=gen)
    labels = input_ids.clone()
    labels[:, :3] = -100  # prompt
    labels[1, 7:] = labels[3, 5:] = -100  # padding
    for average in (False, True):
        # TRL shifts inside; our convention is "already aligned", so the caller shifts
        theirs = ORPOTrainer.get_batch_logps(logits, labels, average_log_prob=average)
        shifted = labels[:, 1:]
        ours = sequence_logprobs(logits[:, :-1], shifted, shifted != -100, average=average)
        torch.testing.assert_close(ours, theirs, **TIGHT)
        torch.testing.assert_close(sequence_logprobs(logits[:, :-1], shifted, average=average), theirs, **TIGHT)


def test_token_logprobs_gradient_matches_log_softmax_gather():
    gen = _gen(3)
    base = torch.randn(2, 6, VOCAB, generator=gen, **F64)
    labels = torch.randint(0, VOCAB, (2, 6), generator=gen)
    weights = torch.randn(2, 6, generator=gen, **F64)
    ours = base.clone().requires_grad_()
    (token_logprobs(ours, labels, chunk_tokens=4) * weights).sum().backward()
    ref = base.clone().requires_grad_()
    (ref.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1) * weights).sum().backward()
    torch.testing.assert_close(ours.grad, ref.grad, **TIGHT)


# --------------------------------------------------------------------------------------------------------------
# DPO family


def _preference_batch(seed: int, pairs: int = 3, seq: int = 12) -> dict[str, torch.Tensor]:
    """[chosen..., rejected...] rows: a prompt, a completion, right padding (pad id 0)."""
    gen = _gen(seed)
    rows = 2 * pairs
    prompt_len = torch.randint(2, 5, (rows,), generator=gen)
    total_len = torch.randint(7, seq + 1, (rows,), generator=gen)
    pos = torch.arange(seq)
    attention = (pos < total_len[:, None]).long()
    completion = ((pos >= prompt_len[:, None]) & (pos < total_len[:, None])).long()
    input_ids = torch.randint(1, VOCAB, (rows, seq), generator=gen) * attention
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def _our_sequence_logps(model, batch, average: bool) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return sequence_logprobs(
        logits[:, :-1], batch["input_ids"][:, 1:], batch["completion_mask"][:, 1:], average=average
    )


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_matches_trl_dpo_trainer(trl_env, loss_type):
    from trl import DPOConfig, DPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    beta = 0.3
    policy, ref = tiny_llama(10, vocab_size=VOCAB), tiny_llama(11, vocab_size=VOCAB)
    batch = _preference_batch(12)

    # TRL: its own fused-LM-head forward of both models and its own loss/metrics code
    trl_policy, trl_ref = tiny_llama(10, vocab_size=VOCAB), tiny_llama(11, vocab_size=VOCAB)
    add_fused_lm_head(trl_policy, outputs=("log_probs", "entropy", "mean_logits", "is_top1"))
    add_fused_lm_head(trl_ref)
    args = DPOConfig(output_dir=trl_env["dir"], report_to="none", use_cpu=True)  # before the Accelerator
    trainer = _bare_trainer(
        DPOTrainer,
        model=trl_policy,
        ref_model=trl_ref,
        args=args,
        accelerator=trl_env["accelerator"](),
        aux_loss_enabled=False,
        ld_alpha=None,
        precompute_ref_logps=False,
        f_divergence_type="reverse_kl",
        loss_types=[loss_type],
        loss_weights=[1.0],
        beta=beta,
        label_smoothing=0.0,
        use_weighting=False,
    )
    trl_loss = trainer._compute_loss(trl_policy, dict(batch), return_outputs=False)
    trl_loss.backward()
    trl_grads = _grads(trl_policy)

    # ours: plain logits -> sequence log-probs -> dpo_loss (IPO on length-averaged log-probs)
    average = loss_type == "ipo"
    chosen, rejected = _our_sequence_logps(policy, batch, average).chunk(2)
    with torch.no_grad():
        ref_chosen, ref_rejected = _our_sequence_logps(ref, batch, average).chunk(2)
    loss, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=beta, loss_type=loss_type)
    loss.backward()

    torch.testing.assert_close(loss, trl_loss, **MODEL)
    _assert_grads_close(_grads(policy), trl_grads, rel=1e-4)
    if loss_type != "ipo":  # TRL logs IPO rewards from summed log-probs; ours saw averaged ones
        logged = trainer._metrics["eval"]
        for name in (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/accuracies",
            "rewards/margins",
            "logps/chosen",
            "logps/rejected",
        ):
            assert metrics[name].item() == pytest.approx(logged[name][-1], rel=2e-5, abs=2e-6), name
    # the share of pairs whose implicit reward favours the chosen answer, on a batch with wins and losses
    wins = ((chosen - ref_chosen) > (rejected - ref_rejected)).tolist()
    assert metrics["rewards/accuracies"].item() == pytest.approx(sum(wins) / len(wins))
    assert 0 < sum(wins) < len(wins)  # a batch where the metric can tell things apart


def _trl_cpo_losses(loss_type, chosen, rejected, *, beta, label_smoothing=0.0, gamma=0.0):
    from trl.experimental.cpo import CPOTrainer

    trainer = _bare_trainer(
        CPOTrainer,
        loss_type=loss_type,
        beta=beta,
        label_smoothing=label_smoothing,
        simpo_gamma=gamma,
        alpha=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    losses, chosen_rewards, rejected_rewards = trainer.cpo_loss(chosen, rejected)
    return losses, chosen_rewards, rejected_rewards


def _random_logps(seed: int, pairs: int = 16, scale: float = 20.0) -> list[torch.Tensor]:
    gen = _gen(seed)
    return [-(torch.rand(pairs, generator=gen, **F64) * scale + 0.01) for _ in range(4)]


def test_dpo_label_smoothing_matches_trl_cpo_sigmoid():
    """TRL 1.16's DPO trainer dropped cDPO smoothing from "sigmoid"; its CPO trainer keeps the same formula.

    CPO's logits are ``logp(y_w) - logp(y_l)``; fed the policy/reference log-ratios they are DPO's margin.
    """
    pytest.importorskip("trl")
    pc, pr, rc, rr = _random_logps(20)
    beta, eps = 0.2, 0.15
    trl_losses, _, _ = _trl_cpo_losses("sigmoid", pc - rc, pr - rr, beta=beta, label_smoothing=eps)
    loss, _ = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    torch.testing.assert_close(loss, trl_losses.mean(), **TIGHT)


@pytest.mark.parametrize(("loss_type", "eps"), [("sigmoid", 0.0), ("sigmoid", 0.1), ("ipo", 0.0), ("hinge", 0.0)])
def test_dpo_loss_hand_reference(loss_type, eps):
    pc, pr, rc, rr = _random_logps(21)
    beta = 0.25
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=eps)
    per_pair, rewards_w, rewards_l = [], [], []
    for a, b, c, d in zip(pc.tolist(), pr.tolist(), rc.tolist(), rr.tolist()):
        h = (a - c) - (b - d)
        if loss_type == "sigmoid":
            sig_pos, sig_neg = 1 / (1 + math.exp(-beta * h)), 1 / (1 + math.exp(beta * h))
            per_pair.append(-(1 - eps) * math.log(sig_pos) - eps * math.log(sig_neg))
        elif loss_type == "ipo":
            per_pair.append((h - 1 / (2 * beta)) ** 2)
        else:
            per_pair.append(max(0.0, 1 - beta * h))
        rewards_w.append(beta * (a - c))
        rewards_l.append(beta * (b - d))
    assert loss.item() == pytest.approx(statistics.fmean(per_pair), rel=1e-10)
    assert metrics["rewards/chosen"].item() == pytest.approx(statistics.fmean(rewards_w), rel=1e-10)
    assert metrics["rewards/margins"].item() == pytest.approx(
        statistics.fmean(w - lo for w, lo in zip(rewards_w, rewards_l)), rel=1e-10, abs=1e-12
    )
    assert metrics["rewards/accuracies"].item() == pytest.approx(
        sum(w > lo for w, lo in zip(rewards_w, rewards_l)) / len(rewards_w)
    )


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_simpo_loss_matches_trl_cpo_simpo_and_hand_reference(eps):
    pytest.importorskip("trl")
    gen = _gen(22)
    chosen = -(torch.rand(16, generator=gen, **F64) * 3 + 0.05)  # length-averaged log-probs
    rejected = -(torch.rand(16, generator=gen, **F64) * 3 + 0.05)
    beta, gamma = 2.0, 0.8
    trl_losses, trl_cw, trl_rw = _trl_cpo_losses("simpo", chosen, rejected, beta=beta, label_smoothing=eps, gamma=gamma)
    loss, metrics = simpo_loss(chosen, rejected, beta=beta, gamma=gamma, label_smoothing=eps)
    torch.testing.assert_close(loss, trl_losses.mean(), **TIGHT)
    torch.testing.assert_close(metrics["rewards/chosen"], trl_cw.mean(), **TIGHT)
    torch.testing.assert_close(metrics["rewards/rejected"], trl_rw.mean(), **TIGHT)

    def log_sigmoid(x: float) -> float:
        return -math.log1p(math.exp(-x))

    expected = statistics.fmean(
        -(1 - eps) * log_sigmoid(beta * w - beta * r - gamma) - eps * log_sigmoid(-(beta * w - beta * r - gamma))
        for w, r in zip(chosen.tolist(), rejected.tolist())
    )
    assert loss.item() == pytest.approx(expected, rel=1e-10)


def test_orpo_loss_matches_trl_odds_ratio_loss_and_hand_reference():
    pytest.importorskip("trl")
    from trl.experimental.orpo import ORPOTrainer

    gen = _gen(23)
    chosen = -(torch.rand(16, generator=gen, **F64) * 2.5 + 1e-3)
    rejected = -(torch.rand(16, generator=gen, **F64) * 2.5 + 1e-3)
    chosen[0] = -1e-4  # near-certain sequence: the log1mexp branch for x > -log 2
    nll = torch.tensor(1.7, **F64)
    beta = 0.1

    # TRL's odds_ratio_loss upcasts with .float(), i.e. works in float32: compare there
    c32, r32, nll32 = chosen.float(), rejected.float(), nll.float()
    trainer = _bare_trainer(ORPOTrainer, beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, cw, rw, log_odds_ratio, log_odds_chosen = trainer.odds_ratio_loss(c32, r32)
    trl_loss = nll32 - losses.mean()  # how ORPOTrainer.get_batch_loss_metrics combines them
    loss32, metrics = orpo_loss(nll32, c32, r32, beta=beta)
    f32 = dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(loss32, trl_loss, **f32)
    torch.testing.assert_close(metrics["log_odds_ratio"], log_odds_ratio, **f32)
    torch.testing.assert_close(metrics["log_odds_chosen"], log_odds_chosen, **f32)
    torch.testing.assert_close(metrics["rewards/chosen"], cw.mean(), **f32)
    torch.testing.assert_close(metrics["rewards/rejected"], rw.mean(), **f32)

    loss, _ = orpo_loss(nll, chosen, rejected, beta=beta)  # float64 against the textbook odds
    terms = []
    for w, r in zip(chosen.tolist(), rejected.tolist()):
        pw, pl = math.exp(w), math.exp(r)
        log_or = math.log(pw / (1 - pw)) - math.log(pl / (1 - pl))
        terms.append(math.log(1 / (1 + math.exp(-log_or))))
    assert loss.item() == pytest.approx(1.7 - beta * statistics.fmean(terms), rel=1e-9)


# --------------------------------------------------------------------------------------------------------------
# reward model


@pytest.mark.parametrize(("use_margin", "center"), [(False, None), (True, None), (True, 0.01)])
def test_reward_loss_matches_trl_reward_trainer(trl_env, use_margin, center):
    from trl import RewardConfig, RewardTrainer

    batch = _preference_batch(30, pairs=4)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    margin = torch.tensor([0.5, 0.0, 1.5, 0.25]) if use_margin else None

    trl_model = tiny_llama(31, classifier=True, vocab_size=VOCAB)
    args = RewardConfig(  # before the Accelerator
        output_dir=trl_env["dir"], report_to="none", use_cpu=True, center_rewards_coefficient=center
    )
    trainer = _bare_trainer(
        RewardTrainer,
        model=trl_model,
        accelerator=trl_env["accelerator"](),
        args=args,
    )
    trl_inputs = dict(inputs, **({"margin": margin} if use_margin else {}))
    trl_loss = trainer.compute_loss(trl_model, trl_inputs)
    trl_loss.backward()
    trl_grads = _grads(trl_model)

    model = tiny_llama(31, classifier=True, vocab_size=VOCAB)
    chosen, rejected = model(**inputs).logits.chunk(2)  # (pairs, 1) each: a scalar head
    loss, metrics = reward_loss(chosen, rejected, margin=margin, center_coeff=center)
    loss.backward()

    torch.testing.assert_close(loss, trl_loss, rtol=1e-6, atol=1e-7)
    _assert_grads_close(_grads(model), trl_grads, rel=1e-5)
    logged = trainer._metrics["eval"]
    for ours_name, trl_name in [
        ("accuracy", "accuracy"),
        ("margin", "margin"),
        ("mean_reward", "mean_reward"),
        ("min_reward", "min_reward"),
        ("max_reward", "max_reward"),
    ]:
        assert metrics[ours_name].item() == pytest.approx(logged[trl_name][-1], rel=1e-6, abs=1e-7), ours_name


def test_reward_loss_hand_reference_and_ties():
    w_list, l_list, m_list = [1.0, 0.5, -0.2, 2.0], [0.0, 0.5, 0.3, -1.0], [0.2, 0.0, 0.1, 1.0]
    chosen, rejected, margin = (torch.tensor(v, **F64) for v in (w_list, l_list, m_list))
    loss, metrics = reward_loss(chosen, rejected, margin=margin, center_coeff=0.05)
    bt = statistics.fmean(math.log1p(math.exp(-(w - r - m))) for w, r, m in zip(w_list, l_list, m_list))
    center = statistics.fmean((w + r) ** 2 for w, r in zip(w_list, l_list))
    assert loss.item() == pytest.approx(bt + 0.05 * center, rel=1e-12)
    assert pairwise_accuracy(chosen, rejected).item() == 0.5  # the tie at 0.5 counts as wrong
    assert metrics["accuracy"].item() == 0.5


# --------------------------------------------------------------------------------------------------------------
# GRPO


@pytest.mark.parametrize("scale", ["std", "none"])
def test_group_advantages_hand_reference(scale):
    gen = _gen(40)
    rewards = torch.rand(12, generator=gen, **F64)
    rewards[4:8] = 1.0  # a group where every completion scores the same: advantage 0, not NaN
    got = group_advantages(rewards, group_size=4, scale=scale)
    expected = []
    for g in range(3):
        group = rewards[4 * g : 4 * g + 4].tolist()
        mean, std = statistics.fmean(group), statistics.stdev(group)
        expected += [(r - mean) / (std + 1e-4) if scale == "std" else r - mean for r in group]
    torch.testing.assert_close(got, torch.tensor(expected, **F64), **TIGHT)
    assert torch.equal(group_advantages(rewards[:3], group_size=1), torch.zeros(3, **F64))


def _grpo_batch(seed: int, rows: int = 6, prompt: int = 4, completion: int = 7):
    gen = _gen(seed)
    prompt_mask = torch.ones(rows, prompt, dtype=torch.long)
    prompt_mask[1, :2] = prompt_mask[4, :1] = 0  # left-padded prompts
    completion_mask = _right_padded_mask(gen, rows, completion, min_len=2)
    prompt_ids = torch.randint(1, VOCAB, (rows, prompt), generator=gen) * prompt_mask
    completion_ids = torch.randint(1, VOCAB, (rows, completion), generator=gen) * completion_mask
    advantages = group_advantages(torch.rand(rows, generator=gen), group_size=3)
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": advantages,
    }, gen


@pytest.mark.parametrize(
    ("loss_type", "beta", "kl_correction"),
    [("grpo", 0.04, False), ("bnpo", 0.0, False), ("dapo", 0.1, True), ("dr_grpo", 0.04, False)],
)
def test_grpo_loss_matches_trl_grpo_trainer(trl_env, loss_type, beta, kl_correction):
    from trl import GRPOConfig, GRPOTrainer
    from trl.trainer.utils import add_fused_lm_head

    batch, gen = _grpo_batch(41)
    mask = batch["completion_mask"]
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], dim=1)
    attention = torch.cat([batch["prompt_mask"], mask], dim=1)
    prompt_len, completion_len, max_completion_length = batch["prompt_ids"].size(1), mask.size(1), 9
    eps_low, eps_high = 0.2, 0.28

    model = tiny_llama(42, vocab_size=VOCAB)
    logits = model(input_ids=input_ids, attention_mask=attention).logits
    logps = token_logprobs(logits[:, prompt_len - 1 : -1], batch["completion_ids"]) * mask
    # old and reference policies a noisy step away, so both clip sides fire and the KL is non-zero
    old_logps = (logps.detach() + 0.3 * torch.randn(logps.shape, generator=gen)) * mask
    ref_logps = (logps.detach() + 0.2 * torch.randn(logps.shape, generator=gen)) * mask
    num_items = mask.sum() * 2  # as if another micro-batch of the same size were accumulated (dapo only)

    trl_model = tiny_llama(42, vocab_size=VOCAB)
    add_fused_lm_head(trl_model, outputs=("log_probs", "entropy"))
    args = GRPOConfig(
        output_dir=trl_env["dir"], report_to="none", use_cpu=True, use_bias_correction_kl=kl_correction
    )  # before the Accelerator
    trainer = _bare_trainer(
        GRPOTrainer,
        model=trl_model,
        accelerator=trl_env["accelerator"](),
        args=args,
        loss_type=loss_type,
        beta=beta,
        epsilon_low=eps_low,
        epsilon_high=eps_high,
        max_completion_length=max_completion_length,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        use_vllm=False,
        aux_loss_enabled=False,
        _entropy_bonus_enabled=False,
        current_gradient_accumulation_steps=1,
    )
    trl_inputs = dict(batch, old_per_token_logps=old_logps, ref_per_token_logps=ref_logps, num_items_in_batch=num_items)
    trl_loss = trainer._compute_loss(trl_model, trl_inputs)
    trl_loss.backward()
    trl_grads = _grads(trl_model)

    loss, metrics = grpo_loss(
        logps,
        old_logps,
        ref_logps,
        batch["advantages"],
        mask,
        clip_eps_low=eps_low,
        clip_eps_high=eps_high,
        beta=beta,
        kl_ratio_correction=kl_correction,
        loss_type=loss_type,
        max_completion_length=max_completion_length,
        num_items_in_batch=num_items if loss_type == "dapo" else None,
    )
    loss.backward()
    torch.testing.assert_close(loss, trl_loss, **MODEL)
    _assert_grads_close(_grads(model), trl_grads, rel=1e-4)

    logged = trainer._metrics["eval"]
    for ours_name, trl_name in [
        ("clip_ratio/low", "clip_ratio/low_mean"),
        ("clip_ratio/high", "clip_ratio/high_mean"),
        ("clip_ratio/region", "clip_ratio/region_mean"),
    ] + ([("kl", "kl")] if beta else []):
        assert metrics[ours_name].item() == pytest.approx(logged[trl_name][-1], rel=1e-4, abs=1e-6), ours_name
    assert metrics["clip_ratio/low"].item() > 0 and metrics["clip_ratio/high"].item() > 0
    assert completion_len < max_completion_length


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo"])
def test_grpo_loss_hand_reference(loss_type):
    gen = _gen(43)
    rows, cols, eps_low, eps_high, beta, budget = 4, 5, 0.2, 0.3, 0.05, 8
    mask = _right_padded_mask(gen, rows, cols)
    logps = -torch.rand(rows, cols, generator=gen, **F64) * 3
    old = logps + 0.4 * torch.randn(rows, cols, generator=gen, **F64)
    ref = logps + 0.3 * torch.randn(rows, cols, generator=gen, **F64)
    adv = torch.randn(rows, generator=gen, **F64)
    loss, metrics = grpo_loss(
        logps,
        old,
        ref,
        adv,
        mask,
        clip_eps_low=eps_low,
        clip_eps_high=eps_high,
        beta=beta,
        loss_type=loss_type,
        max_completion_length=budget,
    )

    per_seq_means, token_terms, kls = [], [], []
    for i in range(rows):
        terms = []
        for t in range(int(mask[i].sum())):
            rho = math.exp(logps[i, t].item() - old[i, t].item())
            a = adv[i].item()
            surrogate = -min(rho * a, min(max(rho, 1 - eps_low), 1 + eps_high) * a)
            x = ref[i, t].item() - logps[i, t].item()
            kl = math.exp(x) - x - 1
            terms.append(surrogate + beta * kl)
            kls.append(kl)
        per_seq_means.append(statistics.fmean(terms))
        token_terms += terms
    expected = {
        "grpo": statistics.fmean(per_seq_means),
        "bnpo": statistics.fmean(token_terms),
        "dr_grpo": sum(token_terms) / (rows * budget),
    }[loss_type]
    assert loss.item() == pytest.approx(expected, rel=1e-10)
    assert metrics["kl"].item() == pytest.approx(statistics.fmean(kls), rel=1e-10)


def test_grpo_on_policy_gradient_is_advantage_weighted_score():
    """With old_logps=None the ratio is 1, so d loss / d logp_t = -A_i / |y_i| (grpo reduction)."""
    gen = _gen(44)
    mask = _right_padded_mask(gen, 3, 6)
    logps = (-torch.rand(3, 6, generator=gen, **F64)).requires_grad_()
    adv = torch.tensor([1.5, -0.5, 0.25], **F64)
    loss, _ = grpo_loss(logps, None, None, adv, mask)
    loss.backward()
    lengths = mask.sum(-1, keepdim=True).to(torch.float64)
    torch.testing.assert_close(logps.grad, -adv[:, None] / lengths * mask / 3, **TIGHT)
    torch.testing.assert_close(loss, -adv.mean(), **TIGHT)


# --------------------------------------------------------------------------------------------------------------
# PPO


def test_gae_hand_reference():
    gen = _gen(50)
    rows, cols, gamma, lam = 4, 7, 0.97, 0.9
    mask = _right_padded_mask(gen, rows, cols)
    rewards = torch.randn(rows, cols, generator=gen, **F64)
    values = torch.randn(rows, cols, generator=gen, **F64)
    advantages, returns = gae(rewards, values, mask, gamma, lam)
    for i in range(rows):
        n = int(mask[i].sum())
        r, v = rewards[i, :n].tolist(), values[i, :n].tolist()
        expected = [0.0] * n
        for t in range(n):  # forward definition: A_t = sum_l (gamma lam)^l delta_{t+l}
            for k in range(t, n):
                next_v = v[k + 1] if k + 1 < n else 0.0
                expected[t] += (gamma * lam) ** (k - t) * (r[k] + gamma * next_v - v[k])
        torch.testing.assert_close(advantages[i, :n], torch.tensor(expected, **F64), **TIGHT)
        torch.testing.assert_close(returns[i, :n], torch.tensor(expected, **F64) + values[i, :n], **TIGHT)
        assert advantages[i, n:].abs().sum() == 0 and returns[i, n:].abs().sum() == 0


def test_kl_penalized_rewards_hand_reference():
    gen = _gen(51)
    rows, cols, kl_coef = 3, 6, 0.05
    mask = _right_padded_mask(gen, rows, cols)
    mask[2] = 0  # an empty completion gets no reward at all
    logps = -torch.rand(rows, cols, generator=gen, **F64)
    ref = -torch.rand(rows, cols, generator=gen, **F64)
    score = torch.tensor([2.0, -1.0, 3.0], **F64)
    got = kl_penalized_rewards(score, logps, ref, mask, kl_coef)
    for i in range(rows):
        n = int(mask[i].sum())
        for t in range(cols):
            expected = 0.0
            if t < n:
                expected = -kl_coef * (logps[i, t].item() - ref[i, t].item()) + (score[i].item() if t == n - 1 else 0.0)
            assert got[i, t].item() == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_ppo_policy_and_value_loss_hand_reference():
    gen = _gen(52)
    rows, cols, clip, clip_v = 3, 5, 0.2, 0.3
    mask = _right_padded_mask(gen, rows, cols)
    logps = -torch.rand(rows, cols, generator=gen, **F64)
    old = logps + 0.4 * torch.randn(rows, cols, generator=gen, **F64)
    adv = torch.randn(rows, cols, generator=gen, **F64)
    values = torch.randn(rows, cols, generator=gen, **F64)
    old_values = values + 0.5 * torch.randn(rows, cols, generator=gen, **F64)
    returns = torch.randn(rows, cols, generator=gen, **F64)

    pg, pg_metrics = ppo_policy_loss(logps, old, adv, mask, clip)
    vf, vf_metrics = ppo_value_loss(values, old_values, returns, mask, clip_v)
    pg_terms, clipped_pg, vf_terms, clipped_vf = [], [], [], []
    for i, t in zip(*torch.nonzero(mask, as_tuple=True)):
        rho = math.exp(logps[i, t].item() - old[i, t].item())
        a = adv[i, t].item()
        unclipped, clipped = -a * rho, -a * min(max(rho, 1 - clip), 1 + clip)
        pg_terms.append(max(unclipped, clipped))
        clipped_pg.append(clipped > unclipped)
        v, v_old, ret = values[i, t].item(), old_values[i, t].item(), returns[i, t].item()
        v_clip = v_old + min(max(v - v_old, -clip_v), clip_v)
        vf_terms.append(0.5 * max((v - ret) ** 2, (v_clip - ret) ** 2))
        clipped_vf.append((v_clip - ret) ** 2 > (v - ret) ** 2)
    assert pg.item() == pytest.approx(statistics.fmean(pg_terms), rel=1e-10)
    assert vf.item() == pytest.approx(statistics.fmean(vf_terms), rel=1e-10)
    assert pg_metrics["policy/clipfrac"].item() == pytest.approx(statistics.fmean(clipped_pg))
    assert vf_metrics["value/clipfrac"].item() == pytest.approx(statistics.fmean(clipped_vf))
    assert 0 < sum(clipped_pg) < len(clipped_pg)  # the case clips some tokens but not all


def test_masked_whiten_hand_reference():
    gen = _gen(53)
    mask = _right_padded_mask(gen, 3, 6, min_len=2)
    x = torch.randn(3, 6, generator=gen, **F64) * 4 + 2
    kept = x[mask.bool()].tolist()
    mean, std = statistics.fmean(kept), statistics.stdev(kept)
    whitened = masked_whiten(x, mask, eps=0.0)
    torch.testing.assert_close(whitened[mask.bool()], torch.tensor([(v - mean) / std for v in kept], **F64), **TIGHT)
    torch.testing.assert_close(
        masked_whiten(x, mask, shift_mean=False, eps=0.0)[mask.bool()],
        torch.tensor([(v - mean) / std + mean for v in kept], **F64),
        **TIGHT,
    )


def test_ppo_rejects_masks_with_holes():
    mask = torch.tensor([[1, 0, 1, 0]])
    with pytest.raises(ValueError, match="right-padded"):
        gae(torch.zeros(1, 4), torch.zeros(1, 4), mask, 1.0, 0.95)


# --------------------------------------------------------------------------------------------------------------
# distillation


@pytest.mark.parametrize(("kind", "beta"), [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5), ("jsd", 0.2)])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_distill_loss_matches_trl_gkd_generalized_jsd(kind, beta, temperature):
    pytest.importorskip("trl")
    from trl.experimental.gkd import GKDTrainer

    gen = _gen(60)
    student = torch.randn(3, 6, VOCAB, generator=gen, **F64) * 2
    teacher = torch.randn(3, 6, VOCAB, generator=gen, **F64) * 2
    mask = _right_padded_mask(gen, 3, 6)
    labels = torch.where(mask.bool(), 1, -100)  # TRL marks ignored positions with -100
    theirs = GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature)
    ours, metrics = distill_loss(
        student, teacher, mask, kind=kind, beta=beta if kind == "jsd" else 0.5, temperature=temperature
    )
    torch.testing.assert_close(ours, theirs, **TIGHT)
    assert not metrics["distill/divergence"].requires_grad
    # a global token count (gradient accumulation) as the divisor, as TRL's num_items_in_batch
    global_count = int(mask.sum()) * 3
    theirs = GKDTrainer.generalized_jsd_loss(
        student, teacher, labels=labels, beta=beta, temperature=temperature, num_items_in_batch=global_count
    )
    ours, _ = distill_loss(
        student,
        teacher,
        mask,
        kind=kind,
        beta=beta if kind == "jsd" else 0.5,
        temperature=temperature,
        num_items_in_batch=global_count,
    )
    torch.testing.assert_close(ours, theirs, **TIGHT)


@pytest.mark.parametrize(("kind", "beta"), [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.3)])
def test_distill_loss_matches_trl_distillation_trainer_kernel(kind, beta):
    """TRL's DistillationTrainer projects hidden states through the LM head in tiles; with an identity head the
    hidden states are the logits, so its kernel scores the same divergence (it computes in float32)."""
    pytest.importorskip("trl")
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    gen = _gen(62)
    student = torch.randn(3, 6, VOCAB, generator=gen, **F64) * 2
    teacher = torch.randn(3, 6, VOCAB, generator=gen, **F64) * 2
    mask = _right_padded_mask(gen, 3, 6)
    identity = torch.eye(VOCAB, **F64)
    theirs, _, _ = _chunked_divergence_loss(student, teacher, identity, identity, mask, beta, temperature=1.5)
    ours, _ = distill_loss(student, teacher, mask, kind=kind, beta=beta if kind == "jsd" else 0.5, temperature=1.5)
    torch.testing.assert_close(ours.float(), theirs, rtol=2e-6, atol=1e-7)


@pytest.mark.parametrize("kind", ["forward_kl", "reverse_kl", "jsd"])
def test_distill_loss_hand_reference(kind):
    gen = _gen(61)
    student = torch.randn(2, 4, 6, generator=gen, **F64)
    teacher = torch.randn(2, 4, 6, generator=gen, **F64)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    beta, temperature = 0.3, 1.5

    def softmax(row):
        exps = [math.exp(v / temperature) for v in row]
        return [e / sum(exps) for e in exps]

    def kl(p, q):
        return sum(a * math.log(a / b) for a, b in zip(p, q))

    per_token = []
    for i, t in zip(*torch.nonzero(mask, as_tuple=True)):
        s, tt = softmax(student[i, t].tolist()), softmax(teacher[i, t].tolist())
        if kind == "forward_kl":
            per_token.append(kl(tt, s))
        elif kind == "reverse_kl":
            per_token.append(kl(s, tt))
        else:
            m = [beta * a + (1 - beta) * b for a, b in zip(tt, s)]
            per_token.append(beta * kl(tt, m) + (1 - beta) * kl(s, m))
    loss, _ = distill_loss(student, teacher, mask, kind=kind, beta=beta, temperature=temperature)
    assert loss.item() == pytest.approx(statistics.fmean(per_token), rel=1e-10)


# --------------------------------------------------------------------------------------------------------------
# every objective: gradients flow, are finite, and metrics are detached scalars


def _objective_cases():
    gen = _gen(70)
    rows, cols = 4, 5
    mask = _right_padded_mask(gen, rows, cols)

    def leaf(*shape, scale=1.0):
        return (-torch.rand(*shape, generator=gen) * scale - 0.01).requires_grad_()

    pc, pr, rc, rr = leaf(rows, scale=10), leaf(rows, scale=10), leaf(rows, scale=10), leaf(rows, scale=10)
    yield "dpo", lambda: dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.1), [pc, pr]
    yield "ipo", lambda: dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.1, loss_type="ipo"), [pc, pr]
    yield "hinge", lambda: dpo_loss(pc, pr, rc.detach(), rr.detach(), beta=0.1, loss_type="hinge"), [pc, pr]
    ac, ar = leaf(rows), leaf(rows)
    yield "simpo", lambda: simpo_loss(ac, ar, beta=2.0, gamma=0.5), [ac, ar]
    nll = torch.tensor(2.0, requires_grad=True)
    yield "orpo", lambda: orpo_loss(nll, ac, ar, beta=0.1), [nll, ac, ar]
    wc, wr = torch.randn(rows, 1, generator=gen).requires_grad_(), torch.randn(rows, 1, generator=gen).requires_grad_()
    yield "reward", lambda: reward_loss(wc, wr, center_coeff=0.01), [wc, wr]
    logps = leaf(rows, cols)
    old = logps.detach() + 0.2 * torch.randn(rows, cols, generator=gen)
    adv = group_advantages(torch.rand(rows, generator=gen), group_size=2)
    for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
        yield (
            loss_type,
            lambda lt=loss_type: grpo_loss(
                logps, old, old, adv, mask, beta=0.04, loss_type=lt, max_completion_length=8
            ),
            [logps],
        )
    values = torch.randn(rows, cols, generator=gen).requires_grad_()
    advantages, returns = gae(torch.randn(rows, cols, generator=gen), values.detach(), mask, 1.0, 0.95)
    yield "ppo_policy", lambda: ppo_policy_loss(logps, old, masked_whiten(advantages, mask), mask, 0.2), [logps]
    yield "ppo_value", lambda: ppo_value_loss(values, values.detach() + 0.1, returns, mask, 0.2), [values]
    student = torch.randn(rows, cols, 11, generator=gen).requires_grad_()
    teacher = torch.randn(rows, cols, 11, generator=gen)
    for kind in ("forward_kl", "reverse_kl", "jsd"):
        yield kind, lambda k=kind: distill_loss(student, teacher, mask, kind=k, temperature=2.0), [student]


@pytest.mark.parametrize(
    ("name", "objective", "leaves"), list(_objective_cases()), ids=lambda v: v if isinstance(v, str) else None
)
def test_objective_backprops_finite_gradients(name, objective, leaves):
    for t in leaves:
        t.grad = None
    loss, metrics = objective()
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    for t in leaves:
        assert t.grad is not None and torch.isfinite(t.grad).all(), name
    assert any(t.grad.abs().sum() > 0 for t in leaves), name
    assert metrics, name
    for key, value in metrics.items():
        assert isinstance(value, torch.Tensor) and value.dim() == 0 and not value.requires_grad, (name, key)


def test_bad_arguments_name_what_was_expected():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="loss_type must be one of"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="kto")
    with pytest.raises(ValueError, match="label_smoothing applies to the 'sigmoid' loss only"):
        dpo_loss(x, x, x, x, beta=0.1, loss_type="ipo", label_smoothing=0.1)
    with pytest.raises(ValueError, match="need one shape"):
        dpo_loss(x, x, x, torch.zeros(2), beta=0.1)
    with pytest.raises(ValueError, match="needs ref_logps"):
        grpo_loss(torch.zeros(2, 3), None, None, torch.zeros(2), torch.ones(2, 3), beta=0.1)
    with pytest.raises(ValueError, match="max_completion_length"):
        grpo_loss(torch.zeros(2, 3), None, None, torch.zeros(2), torch.ones(2, 3), loss_type="dr_grpo")
    with pytest.raises(ValueError, match="divisible by group_size=4"):
        group_advantages(torch.zeros(6), group_size=4)
    with pytest.raises(ValueError, match="0 < beta < 1"):
        distill_loss(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2), kind="jsd", beta=1.0)
    with pytest.raises(ValueError, match="already aligned"):
        token_logprobs(torch.zeros(2, 5, 7), torch.zeros(2, 4, dtype=torch.long))
    assert masked_mean(torch.ones(2, 3), torch.zeros(2, 3)).item() == 0.0  # empty mask: 0, not NaN
