"""`schedscope sidecar` as a user runs it, and the torch-free import promise."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading

import pytest

from schedscope.engine.emitter import Emitter
from schedscope.telemetry import schema as s
from schedscope.telemetry.ingest import Ingest

TORCH_FREE = [
    "schedscope.telemetry",
    "schedscope.telemetry.schema",
    "schedscope.telemetry.ingest",
    "schedscope.telemetry.engines",
    "schedscope.telemetry.sidecar",
    "schedscope.engine.emitter",
    "schedscope.cli.cmd_sidecar",
]


def test_sidecar_side_imports_no_torch():
    code = (
        "import sys\n"
        f"for m in {TORCH_FREE!r}: __import__(m)\n"
        "bad = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
        "print(bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def sidecar_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "schedscope", "sidecar", *args]


class Lines:
    """Reads a pipe on a thread so the test can wait for a line without blocking forever."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._t = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._t.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line)

    def text(self) -> str:
        return "".join(self.lines)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_sidecar_command_summarises_and_exits_cleanly(ipc_endpoint, wait_until, sig, tmp_path):
    env = {**os.environ, s.ENV_ENDPOINT: ipc_endpoint}  # endpoint from the environment
    proc = subprocess.Popen(
        sidecar_cmd(
            "--queue-size",
            "100",
            "--max-message-bytes",
            "65536",
            "--out-dir",
            str(tmp_path),
            "--prometheus-port",
            "0",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    out, err = Lines(proc.stdout), Lines(proc.stderr)
    em = None
    try:
        assert wait_until(lambda: "listening on" in err.text() or proc.poll() is not None)
        assert proc.poll() is None, err.text()
        em = Emitter(s.EngineInfo(model="m"), ipc_endpoint, flush_interval_s=0.0)

        def summarised() -> bool:
            em.emit(s.BatchLaunched(1, 1, s.MODE_DECODE, ["a"], 1))
            em.end_step()
            return "BatchLaunched=" in out.text()

        assert wait_until(summarised, interval=0.05)
        proc.send_signal(sig)
        assert proc.wait(timeout=10) == 0
    finally:
        if em is not None:
            em.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert wait_until(lambda: "stopped:" in err.text())
    assert "Traceback" not in err.text()
    assert "engines 1" in err.text()


@pytest.mark.parametrize(
    ("endpoint", "code", "message"),
    [
        ("localhost:5557", 2, "invalid endpoint"),
        ("ipc:///nonexistent-dir/x/y.sock", 1, "cannot bind"),
        # The settings layer validates tcp://HOST:PORT before binding (issue 9): a usage error.
        ("tcp://not a host:x", 2, "invalid endpoint"),
    ],
    ids=["no-scheme", "missing-dir", "bad-tcp"],
)
def test_bad_endpoint_is_a_one_line_error(endpoint, code, message):
    proc = subprocess.run(
        sidecar_cmd("--endpoint", endpoint), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == code
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr


@pytest.mark.parametrize("transport", ["ipc", "tcp"])
def test_endpoint_in_use_is_a_one_line_error(transport, ipc_endpoint, tcp_port):
    endpoint = ipc_endpoint if transport == "ipc" else f"tcp://127.0.0.1:{tcp_port}"
    with Ingest(endpoint):
        proc = subprocess.run(
            sidecar_cmd("--endpoint", endpoint, "--no-summary"),
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "in use" in lines[0], proc.stderr
