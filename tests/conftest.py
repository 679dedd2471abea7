"""Shared fixtures: unique ZMQ endpoints and free TCP ports on loopback."""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from pathlib import Path

import pytest


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ipc_endpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    # ipc paths must stay short (sun_path is 108 bytes), so use /tmp directly.
    path = Path("/tmp") / f"ss-{uuid.uuid4().hex[:12]}.sock"
    yield f"ipc://{path}"
    path.unlink(missing_ok=True)


@pytest.fixture
def tcp_port() -> int:
    return free_tcp_port()


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.005) -> bool:
    """Poll ``predicate`` until true. The timeout only bounds a hang; tests assert on state,
    never on how long it took."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


@pytest.fixture(name="wait_until")
def _wait_until_fixture():
    return wait_until


def sample_events(ts: int = 1_000) -> list:
    """One instance of every raw event type, with non-default values where it matters."""
    from schedscope.telemetry import schema as s

    info = s.EngineInfo(
        model="tiny-llama",
        engine_type="prefill",
        tp_rank=1,
        pp_rank=2,
        dp_rank=3,
        page_size=16,
        max_total_tokens=4096,
        max_running_requests=64,
        pid=4242,
        hostname="node-7",
        version="9.9",
        config={"chunked_prefill_size": 512, "ratio": 0.5, "flag": True, "name": "x", "n": None},
    )
    rids = [f"rid-{i}" for i in range(4)]
    return [
        s.EngineHello(ts, wall_ns=1_700_000_000_000_000_000, info=info),
        s.Heartbeat(ts + 1, wall_ns=1_700_000_000_000_000_001, info=info),
        s.EmitterStats(ts + 2, 5, 17, 100, 1),
        s.Shutdown(ts + 3, reason="sigterm"),
        s.ReqQueued(ts + 4, "rid-0", 128, 64, "00-" + "a" * 32 + "-" + "b" * 16 + "-01", "k=v"),
        s.ReqFirstToken(ts + 5, "rid-0", cached_tokens=32),
        s.ReqFinished(ts + 6, "rid-0", 128, 64, 32, "stop", True),
        s.ReqAborted(ts + 7, "rid-1", 3, "client disconnected"),
        s.ReqRetracted(ts + 8, "rid-2", 7, 135),
        s.BatchLaunched(ts + 9, forward_iter=12, mode=s.MODE_MIXED, rids=rids, num_tokens=300),
        s.BatchDone(
            ts + 10,
            forward_iter=12,
            mode=s.MODE_MIXED,
            prefill=s.PrefillStats(2, 256, 64, 4, 9, 0.25, 1),
            decode=s.DecodeStats(4, 1024, 4, 812.5, 0.3, 9, 1.75, True),
        ),
        s.Paused(ts + 11, s.PAUSE_RETRACT, "weight update"),
        s.Resumed(ts + 12),
        s.IdleBegin(ts + 13),
        s.IdleEnd(ts + 14),
        s.KvEvents(
            ts + 15,
            forward_iter=12,
            events=[
                s.BlockStored([-(2**63), 2**63 - 1], None, [1, 2, 3], 16, "CPU_PINNED", 7),
                s.BlockRemoved([42], None),
                s.AllBlocksCleared(),
            ],
        ),
        s.KvLoad(ts + 16, 3, 64, 100, 1000, 2, 0.1, 0.75, 1),
        s.MemoryCheck(ts + 17, False, 1000, 10, 20, 969, 1, "leak: 1 slot"),
        s.CacheFlush(ts + 18, False, "not idle: 2 running", ts),
        s.WeightsUpdateBegin(ts + 19, "/models/new"),
        s.WeightsUpdateEnd(ts + 20, True, "ok"),
        s.ProfileBegin(ts + 21, "/tmp/prof", 5),
        s.ProfileEnd(ts + 22, False, "/tmp/prof/trace.json"),
    ]


@pytest.fixture(name="sample_events")
def _sample_events_fixture():
    return sample_events()


def require_binary(name: str) -> str:
    """Path of an external tool; skip without it, but fail in CI (.ci/run installs it)."""
    path = shutil.which(name)
    if path:
        return path
    if os.environ.get("CI", "").lower() not in ("", "0", "false"):
        pytest.fail(f"{name} is not installed, and CI is set: .ci/run installs Debian's package")
    pytest.skip(f"{name} is not installed (apt-get install prometheus)")
