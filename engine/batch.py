"""ScheduleBatch: what one forward pass computes, and the identity its telemetry uses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from schedscope.engine.request import Req
from schedscope.telemetry.schema import MODE_DECODE, MODE_PREFILL


@dataclass(eq=False)
class ScheduleBatch:
    mode: str  # MODE_PREFILL or MODE_DECODE
    reqs: list[Req]
    # Per request: KV positions [starts[i], ends[i]) computed by this batch, and whether it
    # samples a token (False for a chunk that is not a prompt's last).
    starts: list[int]
    ends: list[int]
    samples: list[bool]
    # The value of forward_ct taken when run_batch launched it (seed 002). With overlap the
    # counter has moved on by the time results are processed: stats must read this instead.
    forward_iter: int | None = None
    # Prefill stats, fixed when the batch was formed
    new_seqs: int = 0
    cached_tokens: int = 0
    chunked_reqs: int = 0
    launched_ns: int = 0

    @classmethod
    def prefill(cls) -> ScheduleBatch:
        return cls(MODE_PREFILL, [], [], [], [])

    @classmethod
    def decode(cls, reqs: list[Req]) -> ScheduleBatch:
        starts = [r.kv_len - 1 for r in reqs]  # the slot each request just got
        return cls(MODE_DECODE, list(reqs), starts, [r.kv_len for r in reqs], [True] * len(reqs))

    def add(self, req: Req, start: int, end: int, samples: bool) -> None:
        self.reqs.append(req)
        self.starts.append(start)
        self.ends.append(end)
        self.samples.append(samples)

    @property
    def num_tokens(self) -> int:
        """Tokens this forward pass computes."""
        return sum(self.ends) - sum(self.starts)

    @property
    def num_kv_tokens(self) -> int:
        """Tokens held in KV by the batch's requests once it has run."""
        return sum(self.ends)

    def copy(self) -> ScheduleBatch:
        """Shallow copy for result processing (the overlap path); keeps forward_iter."""
        return dataclasses.replace(self)
