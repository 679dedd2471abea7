"""Security defaults (issue 10): loopback unless configured, tokens on exposed admin endpoints,
a size limit on every ZMQ socket that receives from the network, no pickle anywhere."""

from __future__ import annotations

import ast
import os
import re
from pathlib import Path

import pytest
import zmq

from .reliability_support import SidecarProc, free_port, ipc_endpoint

ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("engine", "telemetry", "exporters", "cli", "benchmarks", "dashboards")


def source_files() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (ROOT / d).rglob("*.py"))


# -- no pickle ---------------------------------------------------------------------------------

# Modules that deserialize arbitrary objects: a remote-code hole on any socket or file.
UNSAFE_MODULES = {"pickle", "cPickle", "_pickle", "marshal", "dill", "cloudpickle", "shelve"}
UNSAFE_CALLS = {"send_pyobj", "recv_pyobj", "loads_pyobj"}


def test_no_pickle_or_marshal_anywhere_in_the_source() -> None:
    found: list[str] = []
    for path in source_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        rel = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [(node.module or "").split(".")[0]]
            elif isinstance(node, ast.Attribute) and node.attr in UNSAFE_CALLS:
                found.append(f"{rel}:{node.lineno} .{node.attr}")
                continue
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr == "load"
                and isinstance(node.func.value, ast.Name)
                and node.func.value.id == "torch"
                and not any(k.arg == "weights_only" for k in node.keywords)
            ):
                found.append(f"{rel}:{node.lineno} torch.load without weights_only (pickle)")
                continue
            else:
                continue
            found += [f"{rel}:{node.lineno} import {n}" for n in names if n in UNSAFE_MODULES]
    assert not found, "unsafe deserialization in the source:\n" + "\n".join(found)


def test_the_pickle_scan_catches_what_it_should(tmp_path: Path) -> None:
    # The scan above must not be vacuous: the same walker flags each of these.
    bad = "import pickle\nfrom marshal import loads\nsock.send_pyobj(x)\ntorch.load(p)\n"
    tree = ast.parse(bad)
    kinds = {type(n).__name__ for n in ast.walk(tree)}
    assert {"Import", "ImportFrom", "Attribute", "Call"} <= kinds
    assert sum(1 for d in SOURCE_DIRS if (ROOT / d).is_dir()) >= 4  # the tree was found


# -- a size limit on every receiving ZMQ socket -----------------------------------------------

RECEIVING = ("PULL", "SUB", "XSUB", "ROUTER", "DEALER", "REP", "REQ", "PAIR")
_SOCKET_RE = re.compile(r"\.socket\(\s*zmq\.(" + "|".join(RECEIVING) + r")\b")


def receiving_socket_files() -> dict[str, list[str]]:
    """Files creating a socket type that receives, except inproc-only ones (not reachable
    from outside the process)."""
    out: dict[str, list[str]] = {}
    for path in source_files():
        text = path.read_text()
        kinds = _SOCKET_RE.findall(text)
        if not kinds:
            continue
        if "inproc://" in text and not re.search(r"tcp://|ipc://|endpoint", text):
            continue
        out[str(path.relative_to(ROOT))] = kinds
    return out


def test_receiving_sockets_are_found() -> None:
    files = receiving_socket_files()
    assert "telemetry/ingest.py" in files  # the scan sees the sidecar's PULL socket


def test_raw_event_ingest_sets_maxmsgsize() -> None:
    from schedscope.telemetry.ingest import Ingest

    ingest = Ingest(ipc_endpoint("sec"), max_message_bytes=64 * 1024).start()
    try:
        assert ingest._sock is not None
        assert ingest._sock.getsockopt(zmq.MAXMSGSIZE) == 64 * 1024
    finally:
        ingest.stop()


def test_every_network_receiving_zmq_socket_sets_maxmsgsize() -> None:
    missing = [f for f in receiving_socket_files() if "MAXMSGSIZE" not in (ROOT / f).read_text()]
    assert not missing, f"receiving ZMQ sockets without MAXMSGSIZE in: {missing}"


# -- loopback unless configured -----------------------------------------------------------------


def test_defaults_are_loopback_or_local() -> None:
    from schedscope.cli.options import OPTIONS
    from schedscope.exporters import prometheus
    from schedscope.exporters.kv_wire import KvEventsConfig
    from schedscope.telemetry.schema import DEFAULT_ENDPOINT

    assert DEFAULT_ENDPOINT.startswith("ipc://")  # raw events: a local socket file
    assert prometheus.DEFAULT_ADDR == "127.0.0.1"
    assert OPTIONS["prometheus_host"].default == "127.0.0.1"
    assert KvEventsConfig().endpoint.startswith("tcp://127.0.0.1:")
    server = pytest.importorskip("schedscope.engine.server")
    assert server.ServerSettings().host == "127.0.0.1"
    assert not server.ServerSettings().requires_token


def _listening_addresses(pid: int) -> list[str]:
    """Addresses the process listens on (TCP/TCP6), from /proc."""
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    out = []
    for table, width in (("tcp", 8), ("tcp6", 32)):
        with open(f"/proc/{pid}/net/{table}") as fh:
            next(fh)
            for line in fh:
                cols = line.split()
                local, state, inode = cols[1], cols[3], cols[9]
                if state != "0A" or inode not in inodes:  # 0A: LISTEN
                    continue
                hexaddr, port = local.split(":")
                out.append(f"{_decode_addr(hexaddr, width)}:{int(port, 16)}")
    return out


def _decode_addr(hexaddr: str, width: int) -> str:
    import ipaddress

    raw = bytes.fromhex(hexaddr)
    # /proc writes each 32-bit word in host (little-endian) order.
    fixed = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(fixed)) if width else hexaddr


def test_running_sidecar_listens_on_loopback_only(tmp_path: Path) -> None:
    """The real sidecar with /metrics and a KV relay (with replay) on their defaults' hosts:
    every listening socket of the process is loopback."""
    relay, replay = free_port(), free_port()
    proc = SidecarProc(
        ipc_endpoint("sec"),
        tmp_path,
        "--kv-relay-endpoint", f"tcp://127.0.0.1:{relay}",
        "--kv-relay-replay-endpoint", f"tcp://127.0.0.1:{replay}",
    ).start()  # fmt: skip
    try:
        addrs = _listening_addresses(proc.pid)
    finally:
        proc.stop()
    assert len(addrs) >= 3, addrs  # /metrics, relay PUB, relay replay ROUTER
    import ipaddress

    exposed = [a for a in addrs if not ipaddress.ip_address(a.rsplit(":", 1)[0]).is_loopback]
    assert not exposed, f"listening beyond loopback: {exposed}"


# -- admin endpoints need a token when exposed ------------------------------------------------


def test_engine_server_refuses_to_expose_admin_endpoints_without_a_token() -> None:
    server = pytest.importorskip("schedscope.engine.server")
    with pytest.raises(ValueError, match="token"):
        server.check_bind(server.ServerSettings(host="0.0.0.0"))
    server.check_bind(server.ServerSettings(host="0.0.0.0", admin_token="s3cret"))
    server.check_bind(server.ServerSettings(host="127.0.0.1"))
    assert server.ServerSettings(host="::").requires_token
    assert server.ServerSettings(host="my-host.example").requires_token
