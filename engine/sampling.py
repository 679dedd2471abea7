"""Sampling parameters and the sampler: greedy, or temperature/top-p/top-k with one seeded
generator per request, so a request's tokens do not depend on what it was batched with."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

MAX_INT = 2**31 - 1
MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed overflows past 2**64 - 1; keep int64
# Below ~1e-5 logits / temperature overflows float32 to inf and softmax yields NaN.
MIN_TEMPERATURE = 1e-5
MAX_TEMPERATURE = 100.0


def _finite(value: float, name: str) -> float:
    try:
        f = float(value)
    except OverflowError:  # an int too large for a float
        raise ValueError(f"{name} is out of range, got {value}") from None
    if not math.isfinite(f):
        raise ValueError(f"{name} must be a finite number, got {value}")
    return f


@dataclass
class SamplingParams:
    """SGLang's sampling_params, the subset the reference engine implements."""

    max_new_tokens: int = 16
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    top_k: int = -1  # -1: off
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)
    seed: int | None = None  # None: derived from the engine seed and the submission order

    def validate(self) -> None:
        # Every number comes from a client: check finiteness and range here, where it enters,
        # so the sampler never sees NaN probabilities and manual_seed never overflows.
        if not 1 <= self.max_new_tokens <= MAX_INT:
            raise ValueError(f"max_new_tokens must be in [1, {MAX_INT}], got {self.max_new_tokens}")
        temp = _finite(self.temperature, "temperature")
        if temp != 0 and not MIN_TEMPERATURE <= temp <= MAX_TEMPERATURE:
            raise ValueError(
                f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                f"got {self.temperature}"
            )
        if not 0 < _finite(self.top_p, "top_p") <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or not -1 <= self.top_k <= MAX_INT:
            raise ValueError(f"top_k must be -1 or in [1, {MAX_INT}], got {self.top_k}")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, {MAX_SEED}], got {self.seed}")
        if any(not 0 <= t <= MAX_INT for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids must be in [0, {MAX_INT}]")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> torch.Tensor:
    """Next token per row of ``logits`` [B, V]; stays on the device (no host sync)."""
    next_ids = torch.argmax(logits, dim=-1)
    for i, p in enumerate(params):
        if p.greedy:
            continue
        row = logits[i].float() / p.temperature
        if p.top_k > 0:
            kth = torch.topk(row, min(p.top_k, row.numel())).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.top_p < 1.0:
            sorted_p, order = torch.sort(probs, descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
            drop = (torch.cumsum(sorted_p, dim=-1) - sorted_p) > p.top_p
            sorted_p = sorted_p.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
        next_ids[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return next_ids
