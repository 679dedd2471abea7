"""A request's state inside the scheduler, and what the API hands back for it."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from schedscope.engine.sampling import SamplingParams

if TYPE_CHECKING:
    import torch

    from schedscope.engine.radix_cache import Node

FINISH_LENGTH = "length"
FINISH_STOP = "stop"
FINISH_ABORT = "abort"


class ReqStatus(enum.Enum):
    WAITING = "waiting"  # in the waiting queue (new or retracted)
    PREFILLING = "prefilling"  # admitted, prompt being computed (maybe in chunks)
    RUNNING = "running"  # decoding
    FINISHED = "finished"


@dataclass
class RequestOutput:
    """Delivered to a request's ``on_output`` callback, on the scheduler thread, each time it
    gets new tokens and once when it finishes. ``new_token_ids`` is the delta."""

    rid: str
    new_token_ids: list[int]
    output_ids: list[int]  # all so far (the same list object as the request's: copy to keep)
    finished: bool
    finish_reason: str | None  # length / stop / abort
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int


@dataclass
class GenerationResult:
    rid: str
    prompt_ids: list[int]
    output_ids: list[int]
    text: str
    finish_reason: str  # length / stop / abort
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    e2e_latency_s: float
    ttft_s: float | None
    retractions: int


OutputCallback = Callable[[RequestOutput], Any]


@dataclass(eq=False)
class Req:
    rid: str
    prompt_ids: list[int]
    sampling: SamplingParams
    queued_ns: int
    traceparent: str | None = None
    on_output: OutputCallback | None = None
    generator: torch.Generator | None = None  # seeded per request (temperature sampling)
    output_ids: list[int] = field(default_factory=list)
    status: ReqStatus = ReqStatus.WAITING
    finish_reason: str | None = None
    abort_requested: str | None = None  # reason; honoured when its next result is processed
    tracestate: str | None = None  # W3C tracestate, travels with traceparent

    # KV state: tokens [0, prefix_len) are the radix cache's (locked through last_node),
    # [prefix_len, kv_len) are this request's own slots; both listed in its table row.
    row: int | None = None
    kv_len: int = 0
    prefix_len: int = 0
    last_node: Node | None = None
    fill_len: int = 0  # tokens to compute before the next sample (prompt + outputs on re-admit)

    # Where its latest sampled token lives in the future-token buffer (overlap: not yet read).
    future_slot: int = -1

    # Telemetry and results
    cached_tokens: int = 0
    retractions: int = 0
    first_token_ns: int | None = None
    finished_ns: int | None = None

    @property
    def seq_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def finished(self) -> bool:
        return self.status is ReqStatus.FINISHED

    def remaining_new_tokens(self) -> int:
        return self.sampling.max_new_tokens - len(self.output_ids)

    def check_finished(self, token: int, eos_token_id: int) -> str | None:
        """Finish reason after appending ``token``, or None to go on."""
        sp = self.sampling
        if not sp.ignore_eos and (token == eos_token_id or token in sp.stop_token_ids):
            return FINISH_STOP
        if len(self.output_ids) >= sp.max_new_tokens:
            return FINISH_LENGTH
        return None
