"""The settings layer: flags > env > config file > defaults, and one-line errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from schedscope.cli.common import load_settings
from schedscope.cli.settings import CliError


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_flag_over_env_over_file_over_default(tmp_path: Path) -> None:
    cfg = _write(
        tmp_path / "s.toml",
        "prometheus_port = 9001\nrequests = 5\n[demo]\nconcurrency = 3\nmax-new-tokens = 7\n",
    )
    env = {"SCHEDSCOPE_PROMETHEUS_PORT": "9002", "SCHEDSCOPE_CONCURRENCY": "4"}
    flags = {"prometheus_port": 9003}
    s = load_settings("demo", flags, cfg, environ=env)
    assert s.prometheus_port == 9003 and s.sources["prometheus_port"] == "--prometheus-port"
    assert s.concurrency == 4 and s.sources["concurrency"] == "$SCHEDSCOPE_CONCURRENCY"
    assert s.requests == 5 and s.max_new_tokens == 7  # file: top level and [demo] table
    assert s.model == "tiny" and s.sources["model"] == "default"
    # Without the flag the env wins; without both, the file.
    assert load_settings("demo", {}, cfg, environ=env).prometheus_port == 9002
    assert load_settings("demo", {}, cfg, environ={}).prometheus_port == 9001


def test_standard_otel_variables(tmp_path: Path) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SERVICE_NAME": "x"}
    s = load_settings("sidecar", {}, None, environ=env)
    assert s.otlp_endpoint == "http://collector:4318" and s.service_name == "x"
    env["SCHEDSCOPE_OTLP_ENDPOINT"] = "http://mine:4317"  # ours wins over the standard one
    assert load_settings("sidecar", {}, None, environ=env).otlp_endpoint == "http://mine:4317"


def test_config_file_from_env_and_shared_keys(tmp_path: Path) -> None:
    # A key of another command at the top level is fine (one file for every command).
    cfg = _write(tmp_path / "c.toml", 'requests = 9\nendpoint = "tcp://127.0.0.1:5999"\n')
    s = load_settings("record", {}, None, environ={"SCHEDSCOPE_CONFIG": str(cfg)})
    assert s.endpoint == "tcp://127.0.0.1:5999"


@pytest.mark.parametrize(
    ("command", "flags", "env", "needle"),
    [
        (
            "sidecar",
            {"endpoint": "udp://x"},
            {},
            "invalid endpoint 'udp://x' (--endpoint): expected ipc://",
        ),
        ("record", {"endpoint": "tcp://host:99999"}, {}, "invalid endpoint"),
        (
            "demo",
            {},
            {"SCHEDSCOPE_PROMETHEUS_PORT": "70000"},
            "(--prometheus-port, from $SCHEDSCOPE_PROMETHEUS_PORT)",
        ),
        (
            "demo",
            {"requests": 0},
            {},
            "invalid requests 0 (--requests): expected a positive integer",
        ),
        ("demo", {"device": "tpu"}, {}, "expected one of auto, cpu, cuda"),
        ("sidecar", {}, {"OTEL_EXPORTER_OTLP_ENDPOINT": "collector"}, "expected a URL"),
        ("sidecar", {"kv_ingest_endpoint": "tcp://*:5557"}, {}, "invalid kv ingest endpoint"),
    ],
)
def test_bad_values_are_one_clear_line(command: str, flags: dict, env: dict, needle: str) -> None:
    with pytest.raises(CliError) as info:
        load_settings(command, flags, None, environ=env)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert info.value.code == 2


def test_bad_config_files(tmp_path: Path) -> None:
    with pytest.raises(CliError, match="no such file"):
        load_settings("demo", {}, tmp_path / "missing.toml", environ={})
    with pytest.raises(CliError, match="not valid TOML"):
        load_settings("demo", {}, _write(tmp_path / "a.toml", "x = ["), environ={})
    with pytest.raises(CliError, match="unknown key 'prometheus_prot'"):
        load_settings("demo", {}, _write(tmp_path / "b.toml", "prometheus_prot = 1"), environ={})
    with pytest.raises(CliError, match=r"unknown key 'out' in \[demo\]"):
        load_settings("demo", {}, _write(tmp_path / "c.toml", '[demo]\nout = "x"'), environ={})
    with pytest.raises(CliError, match=r"from .*d.toml key 'concurrency'"):
        load_settings("demo", {}, _write(tmp_path / "d.toml", "concurrency = -1"), environ={})


def test_unwritable_out_dir(tmp_path: Path) -> None:
    blocker = _write(tmp_path / "file", "")
    with pytest.raises(CliError, match="is not a directory"):
        load_settings("demo", {"out_dir": str(blocker / "sub")}, None, environ={})


def _cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "schedscope", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["demo", "--bogus"], "No such option: --bogus"),
        (["record", "--endpoint", "http://x"], "invalid endpoint 'http://x'"),
        (["replay", "/nonexistent/rec.ssrec"], "no such file"),
        (["record", "--out", "/proc/1/nope/x.ssrec", "--duration", "1"], "--out"),
        (["nosuchcommand"], "No such command"),
    ],
)
def test_cli_bad_input_exits_nonzero_with_one_line(args: list[str], needle: str, capsys) -> None:
    from schedscope.cli.main import run

    assert run(args) == 2  # in-process: an exception here would be the traceback
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err


def test_the_installed_command_prints_one_line_too() -> None:
    r = _cli("record", "--endpoint", "http://x")
    assert r.returncode == 2
    assert r.stderr.startswith("error: invalid endpoint") and r.stderr.count("\n") == 1


@pytest.mark.parametrize("command", ["demo", "sidecar", "record", "replay"])
def test_every_catalog_option_is_a_flag_of_its_command(command: str) -> None:
    """The options catalog and the typer signatures must not drift apart."""
    import importlib
    import inspect

    from schedscope.cli.options import COMMAND_OPTIONS

    fn = getattr(importlib.import_module(f"schedscope.cli.cmd_{command}"), command)
    params = set(inspect.signature(fn).parameters)
    if "bind" in params:  # the sidecar's --bind/--connect is the `connect` option
        params.add("connect")
    # record/replay keep no relay/recording flags they cannot use; everything else is a flag.
    unused = {"replay": {"record", "record_max_bytes"}}.get(command, set())
    assert set(COMMAND_OPTIONS[command]) - unused <= params


@pytest.mark.parametrize("command", ["demo", "sidecar", "record", "replay", "engine"])
def test_help_renders(command: str, capsys) -> None:
    from schedscope.cli.main import run

    assert run([command, "--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def test_the_cli_and_the_sidecar_side_import_no_torch() -> None:
    """`schedscope sidecar/record/replay` start fast: only the engine commands pay for torch."""
    code = (
        "import sys\n"
        "from schedscope.cli.main import _register\n"
        "_register()\n"
        "import schedscope.cli.sidecar_app, schedscope.telemetry.recording, schedscope.cli.demo_report\n"
        "sys.exit(1 if 'torch' in sys.modules else 0)\n"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0


@pytest.mark.parametrize("command", ["demo", "replay"])
def test_default_out_dir_is_parsed_like_a_given_one(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`schedscope demo` with no options (the README's first command) used the default
    out_dir as a bare string and crashed; defaults go through the option's parser."""
    monkeypatch.chdir(tmp_path)
    s = load_settings(command, {}, None, environ={})
    given = load_settings(command, {"out_dir": "elsewhere"}, None, environ={})
    assert isinstance(s.out_dir, Path) and type(s.out_dir) is type(given.out_dir)
