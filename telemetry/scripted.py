"""Drive a sidecar handler with scripted raw events, without sockets: for tests, benchmarks and
replays. Times are given in milliseconds since the script's start on the engine's clock; the
engine's hello anchors that clock at ``wall0_ns``, so wall time = wall0_ns + ms * 1e6."""

from __future__ import annotations

from collections.abc import Callable

from schedscope.telemetry.engines import EngineRegistry, Observation
from schedscope.telemetry.ingest import Received
from schedscope.telemetry.schema import DecodedFrame, EngineHello, EngineInfo, Event

Handler = Callable[[Received, Observation], None]

MONO0_NS = 1_000_000_000_000  # engine monotonic clock at ms 0
WALL0_NS = 1_700_000_000_000_000_000  # wall clock at ms 0


class ScriptedEngine:
    def __init__(
        self,
        handler: Handler,
        *,
        engine_id: str = "engine-a",
        info: EngineInfo | None = None,
        registry: EngineRegistry | None = None,
        mono0_ns: int = MONO0_NS,
        wall0_ns: int = WALL0_NS,
    ) -> None:
        self.handler = handler
        self.engine_id = engine_id
        self.info = info or EngineInfo(model="test-model", hostname="host-a", pid=42)
        self.registry = registry if registry is not None else EngineRegistry()
        self.mono0_ns = mono0_ns
        self.wall0_ns = wall0_ns
        self.seq = 0

    def ts(self, ms: float) -> int:
        """Engine monotonic ns at ``ms`` into the script."""
        return self.mono0_ns + round(ms * 1_000_000)

    def wall(self, ms: float) -> int:
        return self.wall0_ns + round(ms * 1_000_000)

    def hello(self, ms: float = 0.0) -> Observation:
        return self.send(EngineHello(self.ts(ms), self.wall(ms), self.info))

    def send(self, *events: Event, recv_ms: float | None = None) -> Observation:
        """One message carrying ``events``; received at ``recv_ms`` (default: the last event's
        time, i.e. no transport delay)."""
        frame = DecodedFrame(self.engine_id, self.seq, list(events))
        self.seq += 1
        if recv_ms is None:
            recv_ns = (events[-1].ts - self.mono0_ns + self.wall0_ns) if events else self.wall0_ns
        else:
            recv_ns = self.wall(recv_ms)
        obs = self.registry.observe(frame)
        self.handler(Received(frame, recv_ns), obs)
        return obs

    def lose(self, n: int = 1) -> None:
        """The next n messages never arrive (they still consume seq)."""
        self.seq += n
