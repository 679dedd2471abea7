"""Shared fixtures: unique ZMQ endpoints and free TCP ports on loopback."""

from __future__ import annotations

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
