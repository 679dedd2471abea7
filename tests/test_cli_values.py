"""Every bad value a user can pass ends in one `error:` line and exit 2, before any process
starts: no traceback, nothing on stdout. The matrix runs the real CLI entry point (``run``)
in-process; a few cases also run as a real subprocess."""

from __future__ import annotations

import json
import os
import socket
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from schedscope.cli.main import run


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


COMMANDS = ("demo", "sidecar", "record", "replay")


def _hf_dir(root: Path, name: str, config: object | None, weights: bytes | None) -> str:
    d = root / name
    d.mkdir()
    if config is not None:
        text = config if isinstance(config, str) else json.dumps(config)
        (d / "config.json").write_text(text, encoding="utf-8")
    if weights is not None:
        (d / "model.safetensors").write_bytes(weights)
    return str(d)


GOOD_CONFIG = {
    "vocab_size": 300, "hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
    "num_attention_heads": 2,
}  # fmt: skip


def _st(header: object, data: bytes = b"") -> bytes:
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + data


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    good_header = {"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}
    return {
        "no-config": _hf_dir(root, "a", None, _st(good_header, b"\0" * 4)),
        "config-not-json": _hf_dir(root, "b", "{nope", _st(good_header, b"\0" * 4)),
        "config-lacks-key": _hf_dir(
            root, "c", {k: v for k, v in GOOD_CONFIG.items() if k != "hidden_size"}, None
        ),
        "config-not-object": _hf_dir(root, "d", "[1, 2]", None),
        "no-weights": _hf_dir(root, "e", GOOD_CONFIG, None),
        "garbage-weights": _hf_dir(root, "f", GOOD_CONFIG, b"garbage"),
        "empty-weights": _hf_dir(root, "g", GOOD_CONFIG, b""),
        "header-not-json": _hf_dir(root, "h", GOOD_CONFIG, struct.pack("<Q", 4) + b"{x!}"),
        "offsets-past-end": _hf_dir(root, "i", GOOD_CONFIG, _st(good_header, b"\0")),
        "header-huge": _hf_dir(root, "j", GOOD_CONFIG, struct.pack("<Q", 2**60) + b"{}"),
        "missing-tensors": _hf_dir(root, "k", GOOD_CONFIG, _st(good_header, b"\0" * 4)),
        "not-a-folder": str(root / "absent"),
    }


# (args, env) pairs; "{model:X}" is replaced by the model dir X above.
CASES: list[tuple[list[str], dict[str, str]]] = [
    (["demo", "--model", "foo"], {}),
    (["demo", "--model", ""], {}),
    (["demo", "--device", "cuda"], {}),
    (["demo", "--device", "tpu"], {}),
    (["engine", "serve", "--device", "cuda"], {}),
    (["engine", "serve", "--device", "gpu"], {}),
    (["engine", "serve", "--model", "foo"], {}),
    (["engine", "serve", "--log-level", "loud"], {}),
    (["engine", "serve", "--host", "no host"], {}),
    (["engine", "serve", "--endpoint", "http://x"], {}),
    (["engine", "serve", "--host", "0.0.0.0"], {}),  # off loopback without an admin token
]
for _p in ("0", "-1", "65536", "abc", ""):
    CASES.append((["engine", "serve", "--port", _p], {}))
for _k in ("--max-total-tokens", "--max-running-requests", "--page-size"):
    for _v in ("0", "-5", "x"):
        CASES.append((["engine", "serve", _k, _v], {}))
for _name in ("no-config", "config-not-json", "config-lacks-key", "config-not-object",
              "no-weights", "garbage-weights", "empty-weights", "header-not-json",
              "offsets-past-end", "header-huge", "missing-tensors", "not-a-folder"):  # fmt: skip
    CASES.append(
        (["engine", "serve", "--port", "{port}", "--model-path", f"{{model:{_name}}}"], {})
    )
for _flag in ("--requests", "--concurrency", "--max-new-tokens"):
    for _v in ("0", "-3", "many", "1.5"):
        CASES.append((["demo", _flag, _v], {}))
for _v in ("0", "-1", "nan", "inf", "soon"):
    CASES.append((["demo", "--duration", _v], {}))
for _cmd in ("demo", "sidecar"):
    for _p in ("-1", "65536", "http", "1.5"):
        CASES.append(([_cmd, "--prometheus-port", _p], {}))
    CASES.append(([_cmd], {"SCHEDSCOPE_PROMETHEUS_PORT": "99999"}))
    CASES.append(([_cmd, "--otlp-endpoint", "localhost:4317"], {}))
    CASES.append(([_cmd], {"OTEL_EXPORTER_OTLP_ENDPOINT": "not a url"}))
    CASES.append(([_cmd, "--otlp-protocol", "udp"], {}))
    CASES.append(([_cmd, "--record-max-bytes", "12"], {}))
    CASES.append(([_cmd, "--kv-relay-hash-style", "md5"], {}))
    CASES.append(([_cmd, "--kv-relay-config", "{bad"], {}))
    CASES.append(([_cmd, "--kv-relay-buffer-steps", "-1"], {}))
    CASES.append(([_cmd, "--log-level", "loud"], {}))
    CASES.append(([_cmd, "--config", "/nonexistent/schedscope.toml"], {}))
for _v in ("0", "-7", "lots"):
    CASES.append((["sidecar", "--queue-size", _v], {}))
    CASES.append((["record", "--queue-size", _v], {}))
for _e in ("udp://x:1", "tcp://host", "tcp://*:99999", "ipc://", "ipc:///" + "x" * 200):
    CASES.append((["sidecar", "--endpoint", _e], {}))
    CASES.append((["record", "--endpoint", _e], {}))
CASES.append((["sidecar", "--kv-ingest-endpoint", "tcp://*:5557"], {}))
CASES.append((["sidecar", "--max-message-bytes", "10"], {}))
CASES.append((["sidecar", "--duration", "-1"], {}))
CASES.append((["record", "--duration", "0"], {}))
CASES.append((["replay", "/nonexistent.ssrec"], {}))
CASES.append((["replay", "/nonexistent.ssrec", "--speed", "0"], {}))
CASES.append((["demo", "--no-such-flag"], {}))
CASES.append((["nosuchcommand"], {}))


def _ids() -> list[str]:
    return [" ".join(a) + "".join(f" {k}={v}" for k, v in e.items()) for a, e in CASES]


def test_matrix_size():
    # The issue asks for the matrix's size in the note; keep it from shrinking by accident.
    assert len(CASES) >= 100, len(CASES)


@pytest.mark.parametrize(("args", "env"), CASES, ids=_ids())
def test_bad_value_is_one_line_exit_2(args, env, model_dirs, capsys, monkeypatch):
    for k in list(os.environ):
        if k.startswith(("SCHEDSCOPE_", "OTEL_")):
            monkeypatch.delenv(k)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    argv = []
    for a in args:
        if a.startswith("{model:"):
            a = model_dirs[a[len("{model:") : -1]]
        elif a == "{port}":
            a = str(_free_port())
        argv.append(a)
    code = run(argv)
    out, err = capsys.readouterr()
    lines = [ln for ln in err.splitlines() if ln.strip() and ln != "loading torch..."]
    assert code == 2, (code, err)
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and out == ""


@pytest.mark.parametrize(
    "args",
    [
        ["demo", "--model", "foo"],
        ["engine", "serve", "--port", "0"],
        ["sidecar", "--queue-size", "0"],
    ],
    ids=" ".join,
)
def test_bad_value_in_a_real_process(args):
    proc = subprocess.run(
        [sys.executable, "-m", "schedscope", *args], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


@pytest.mark.parametrize("cmd", [[], *([c] for c in COMMANDS), ["engine", "serve"]], ids=str)
@pytest.mark.parametrize("flag", ["-V", "--version"])
def test_version_on_every_command(cmd, flag, capsys):
    from schedscope import __version__

    assert run([*cmd, flag]) == 0
    assert capsys.readouterr().out == f"schedscope {__version__}\n"


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_shows_env_vars_and_defaults(cmd, capsys, monkeypatch):
    from schedscope.cli.options import COMMAND_DEFAULTS, COMMAND_OPTIONS, OPTIONS

    monkeypatch.setenv("COLUMNS", "400")  # one line per option, whatever the terminal
    assert run([cmd, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    shown = [k for k in COMMAND_OPTIONS[cmd] if f"--{k.replace('_', '-')} " in text]
    assert len(shown) >= 4, text
    for key in shown:
        assert f"$SCHEDSCOPE_{key.upper()}" in text, key
    for key in ("log_level", "out_dir" if cmd in ("demo", "replay") else "log_level"):
        default = COMMAND_DEFAULTS[cmd].get(key, OPTIONS[key].default)
        if default is not None:
            assert f"default: {default}" in text, key


def test_sidecar_banner_says_where_otlp_goes(monkeypatch):
    from schedscope.cli.cmd_sidecar import _otlp_lines
    from schedscope.cli.common import load_settings

    for k in list(os.environ):
        if k.startswith(("SCHEDSCOPE_", "OTEL_")):
            monkeypatch.delenv(k)
    off = load_settings("sidecar", {}, None, environ={})
    assert _otlp_lines(off) == [
        "OTLP export off (set --otlp-endpoint or $OTEL_EXPORTER_OTLP_ENDPOINT)"
    ]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://collector:4317")
    on = load_settings("sidecar", {}, None)
    assert _otlp_lines(on) == [
        "OTLP traces to http://collector:4317 (grpc)",
        "OTLP metrics to http://collector:4317 (grpc)",
    ]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_has_no_bool_placeholder(cmd, capsys):
    assert run([cmd, "--help"]) == 0
    # (typer itself gives its own --help line a <bool>; every option of ours has none)
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "--help" not in ln]
    assert not [ln for ln in lines if "<bool>" in ln]
