"""Re-exports the real-process harness in benchmarks/harness.py for the fault tests, so the
tests and the benchmark suite drive the sidecar the same way."""

from __future__ import annotations

import sys
from pathlib import Path

_BENCH = str(Path(__file__).resolve().parents[1] / "benchmarks")
if _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

from harness import (  # noqa: E402
    OtlpHttpReceiver,
    SidecarProc,
    StepLoop,
    free_port,
    ipc_endpoint,
    metric_samples,
    metric_value,
    prom,
    rss_mib,
    wait_for,
)

__all__ = [
    "OtlpHttpReceiver",
    "SidecarProc",
    "StepLoop",
    "free_port",
    "ipc_endpoint",
    "metric_samples",
    "metric_value",
    "prom",
    "rss_mib",
    "wait_for",
]
