"""Choosing the next token for every row of a batch: greedy, temperature, top-p, per-request seeds, logprobs.

Each request draws its randomness from its own ``torch.Generator``, one vocabulary-sized draw per token, so a
seeded request produces the same tokens whatever else shares its batch. Sampling uses the exponential race
(``argmax(p / q)``, ``q ~ Exp(1)``), which picks token ``i`` with probability ``p_i`` and needs no cumulative
search, so rows with different temperatures and top-p values are handled in one batched pass.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tuneforge.errors import TuneforgeError


class RequestError(TuneforgeError):
    """A generation request the engine cannot run as asked (bad parameters, a prompt that does not fit)."""


@dataclass(frozen=True)
class SamplingParams:
    """How one request samples; ``temperature`` 0 is greedy decoding."""

    max_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # None: none; 0: the chosen token's; k: and the k most likely alternatives

    def check(self, vocab_size: int) -> None:
        """Raise :class:`RequestError` naming the first field that is out of range."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise RequestError(f"max_tokens: {self.max_tokens!r} is not allowed (expected an integer ≥ 1)")
        if not self.temperature >= 0:
            raise RequestError(f"temperature: {self.temperature!r} is not allowed (expected a number ≥ 0)")
        if not 0 < self.top_p <= 1:
            raise RequestError(f"top_p: {self.top_p!r} is not allowed (expected a number in (0, 1])")
        if self.logprobs is not None and not 0 <= self.logprobs <= vocab_size:
            raise RequestError(f"logprobs: {self.logprobs!r} is not allowed (expected 0 … {vocab_size})")
        if self.seed is not None and not (isinstance(self.seed, int) and -(2**63) <= self.seed < 2**64):
            raise RequestError(f"seed: {self.seed!r} is not allowed (expected an integer in [-2**63, 2**64))")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise RequestError(f"stop_token_ids: {bad} are not token ids of this model (expected 0 … {vocab_size - 1})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class Choice:
    """The token chosen for one row, with its log-probability and alternatives when they were asked for."""

    token_id: int
    logprob: float | None = None
    top_logprobs: list[tuple[int, float]] | None = None


def make_generator(seed: int | None) -> torch.Generator:
    """A request's own random stream: seeded when asked, else seeded from the process's entropy."""
    g = torch.Generator()
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def choose(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[Choice]:
    """The next token of every row of ``logits`` ``[B, V]`` (fp32), each row by its own parameters and generator."""
    greedy = [p.greedy for p in params]
    if all(greedy):
        tokens = logits.argmax(-1)  # the common serving case: one op, no per-row work
    else:
        tokens = _sample(logits, params, generators, greedy)
    want = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not want:
        return [Choice(t) for t in tokens.tolist()]
    return _with_logprobs(logits, tokens, params, want)


def _sample(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator], greedy: list[bool]
) -> torch.Tensor:
    rows = [i for i, g in enumerate(greedy) if not g]
    idx = torch.tensor(rows)
    temperature = torch.tensor([params[i].temperature for i in rows], dtype=logits.dtype).unsqueeze(1)
    probs = torch.softmax(logits.index_select(0, idx) / temperature, dim=-1)
    top_p = [params[i].top_p for i in rows]
    if min(top_p) < 1:
        probs = _top_p_filter(probs, torch.tensor(top_p, dtype=probs.dtype).unsqueeze(1))
    # One draw per row from the row's own generator: what a row samples never depends on its neighbours.
    noise = torch.stack([torch.empty(probs.shape[1]).exponential_(generator=generators[i]) for i in rows])
    sampled = (probs / noise).argmax(-1)
    tokens = logits.argmax(-1)
    tokens[idx] = sampled
    return tokens


def _top_p_filter(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero every token outside the smallest set whose probability reaches ``top_p`` (the top token always stays)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    before = sorted_p.cumsum(-1) - sorted_p  # mass strictly above each token
    sorted_p = sorted_p.masked_fill(before >= top_p, 0.0)
    return torch.zeros_like(probs).scatter_(-1, order, sorted_p)


def _with_logprobs(
    logits: torch.Tensor, tokens: torch.Tensor, params: list[SamplingParams], want: list[int]
) -> list[Choice]:
    """Log-probabilities of the model's distribution (before temperature and top-p), as OpenAI reports them."""
    idx = torch.tensor(want)
    logp = torch.log_softmax(logits.index_select(0, idx), dim=-1)
    chosen = logp.gather(1, tokens.index_select(0, idx).unsqueeze(1)).squeeze(1).tolist()
    k = max(params[i].logprobs or 0 for i in want)
    top_vals, top_ids = logp.topk(k, dim=-1) if k else (None, None)
    top_vals = top_vals.tolist() if top_vals is not None else None
    top_ids = top_ids.tolist() if top_ids is not None else None
    out = [Choice(t) for t in tokens.tolist()]
    for j, i in enumerate(want):
        n = params[i].logprobs or 0
        top = list(zip(top_ids[j][:n], top_vals[j][:n])) if n and top_ids and top_vals else None
        out[i] = Choice(out[i].token_id, chosen[j], top)
    return out
