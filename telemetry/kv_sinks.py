"""The contract between the telemetry layer's KV batching and KV consumers (relay, files, ...).

The telemetry layer coalesces each engine's KV events into KvBatch objects (by count and by a
short time window) and hands every batch to each registered sink. Opening an idle or a pause
span flushes all pending batches at once (DESIGN §5).

A sink's ``publish`` is called on the processing thread and must never block: a sink that
talks to a slow peer queues (bounded) and counts what it drops.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import msgspec

from schedscope.telemetry.schema import KvBlockEventT


class KvBatch(msgspec.Struct, gc=False):
    """KV events of one engine, in order, ready for consumers."""

    engine_id: str
    dp_rank: int | None
    ts: float  # wall-clock seconds when the batch was closed (the wire format's ts)
    events: list[KvBlockEventT]
    first_forward_iter: int | None = None
    last_forward_iter: int | None = None


@runtime_checkable
class KvSink(Protocol):
    name: str

    def publish(self, batch: KvBatch) -> None:
        """Take one batch. Never blocks; drops are counted by the sink."""

    def close(self) -> None:
        """Release sockets/files. Idempotent."""


class ListKvSink:
    """Collects batches in memory (bounded): for tests, the demo summary and replays."""

    name = "list"

    def __init__(self, max_batches: int = 100_000) -> None:
        self.max_batches = max_batches
        self.batches: list[KvBatch] = []
        self.dropped = 0

    def publish(self, batch: KvBatch) -> None:
        if len(self.batches) >= self.max_batches:
            self.dropped += 1
            return
        self.batches.append(batch)

    def close(self) -> None:
        pass
