"""Shared helpers for the engine tests: a recording emitter and small engine factories."""

from __future__ import annotations

from schedscope.engine.config import EngineConfig
from schedscope.engine.engine import Engine
from schedscope.telemetry.schema import Event, KvEvents


class RecordingEmitter:
    """In-memory test double of Emitter: keeps every event, counts steps and flushes."""

    enabled = True
    engine_id = "test-engine"

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.steps = 0
        self.flushes = 0

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def end_step(self) -> None:
        self.steps += 1

    def flush(self) -> None:
        self.flushes += 1

    def close(self, reason: str = "shutdown") -> None:
        pass

    def of(self, cls: type) -> list:
        return [e for e in self.events if isinstance(e, cls)]

    def kv_events(self) -> list:
        """Every KV block event, in order, across the KvEvents batches."""
        return [k for e in self.of(KvEvents) for k in e.events]


def tiny_engine(emitter=None, **overrides) -> Engine:
    cfg = EngineConfig(model="tiny", device="cpu", max_total_tokens=2048, max_running_requests=16)
    return Engine(cfg, emitter=emitter, **overrides)


def prompts(n: int, length: int = 24, shared: str = "") -> list[str]:
    """Distinct prompts of roughly ``length`` bytes, optionally behind a shared prefix."""
    return [shared + (f"request {i}: " + "abcdefghij" * length)[:length] for i in range(n)]
