"""One settings layer for every `schedscope` command.

Each option has one definition here (an ``Option``: key, parser, default, env vars, help) and
is resolved from, in order of precedence:

1. the command-line flag (``--prometheus-port 9464``),
2. the environment (``SCHEDSCOPE_PROMETHEUS_PORT``; a few options also read the standard
   ``OTEL_*`` variables, e.g. ``OTEL_EXPORTER_OTLP_ENDPOINT``),
3. the config file (``--config FILE`` or ``$SCHEDSCOPE_CONFIG``, TOML),
4. the option's default (which may differ per command).

Config file (TOML). Top-level keys apply to every command that has the option; a table named
after a command applies to that command only and wins over top-level keys. Keys are the option
names with ``_`` or ``-``::

    endpoint = "ipc:///tmp/schedscope-events.sock"
    prometheus_port = 9464

    [demo]
    requests = 64
    out_dir = "./demo-out"

A bad value, from wherever it came, is one line naming the option, where the value came from
and what is allowed; the CLI prints it and exits with status 2 (no traceback).
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CONFIG_ENV = "SCHEDSCOPE_CONFIG"
EXIT_USAGE = 2  # bad flag / env / config value: the same status click uses for usage errors


class CliError(Exception):
    """A user-facing failure: printed as one line, exits with ``code``, no traceback."""

    def __init__(self, message: str, code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.code = code


# ---------------------------------------------------------------------------------------------
# Parsers: take a str (env, flag) or a TOML value; return the typed value or raise ValueError
# whose text says what is allowed.
# ---------------------------------------------------------------------------------------------

Parser = Callable[[Any], Any]

_HOST_RE = re.compile(r"^(\*|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\])$")


def parse_port(value: Any, *, allow_zero: bool = False) -> int:
    allowed = "a TCP port 1-65535" + (" (0 = pick a free port)" if allow_zero else "")
    port = _to_int(value, allowed)
    if not ((allow_zero and port == 0) or 1 <= port <= 65535):
        raise ValueError(f"expected {allowed}")
    return port


def parse_optional_port(value: Any) -> int | None:
    """A port, 0 for a free one, or ``off`` to disable the server."""
    if isinstance(value, str) and value.strip().lower() in ("off", "none", "disabled", ""):
        return None
    try:
        return parse_port(value, allow_zero=True)
    except ValueError:
        raise ValueError("expected a TCP port 1-65535, 0 to pick a free port, or 'off'") from None


def parse_zmq_endpoint(value: Any, *, bind: bool = True) -> str:
    """``ipc://PATH`` or ``tcp://HOST:PORT`` (``*`` as host only where we bind)."""
    allowed = "expected ipc://PATH or tcp://HOST:PORT" + (" (HOST may be *)" if bind else "")
    if not isinstance(value, str):
        raise ValueError(allowed)
    text = value.strip()
    if text.startswith("ipc://"):
        path = text[len("ipc://") :]
        if not path:
            raise ValueError(allowed)
        # sun_path is 108 bytes on Linux: a longer path fails deep inside libzmq.
        if len(path.encode()) > 107:
            raise ValueError("ipc path too long (max 107 bytes); use a shorter path under /tmp")
        return text
    if text.startswith("tcp://"):
        hostport = text[len("tcp://") :]
        host, sep, port = hostport.rpartition(":")
        if not sep or not host or not _HOST_RE.match(host) or (host == "*" and not bind):
            raise ValueError(allowed)
        parse_port(port)
        return text
    raise ValueError(allowed)


def parse_connect_endpoint(value: Any) -> str:
    return parse_zmq_endpoint(value, bind=False)


def parse_url(value: Any) -> str:
    allowed = "expected a URL like http://HOST:PORT"
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s:]+(:\d+)?(/\S*)?$", value):
        raise ValueError(allowed)
    port = re.match(r"^https?://[^/\s:]+:(\d+)", value)
    if port:
        parse_port(port.group(1))
    return value


def parse_host(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expected a host name or IP address")
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOST_RE.match(value) or value == "*":
            raise ValueError("expected a host name or IP address") from None
    return value


def parse_positive_int(value: Any) -> int:
    n = _to_int(value, "a positive integer")
    if n < 1:
        raise ValueError("expected a positive integer")
    return n


def parse_non_negative_int(value: Any) -> int:
    n = _to_int(value, "an integer >= 0")
    if n < 0:
        raise ValueError("expected an integer >= 0")
    return n


def parse_positive_float(value: Any) -> float:
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ValueError("expected a positive number") from None
    if not x > 0 or x == float("inf"):
        raise ValueError("expected a positive number")
    return x


def parse_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ValueError("expected true or false")


def parse_size(value: Any) -> int:
    """Bytes, with an optional K/M/G suffix (powers of 1024)."""
    allowed = "expected a size in bytes like 512M or 2G"
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([kKmMgG]?)[iI]?[bB]?\s*", str(value))
        if not m:
            raise ValueError(allowed)
        n = int(m.group(1)) * {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}[m.group(2).lower()]
    if n < 1024:
        raise ValueError("expected a size of at least 1K")
    return n


def choice(*allowed: str) -> Parser:
    def parse(value: Any) -> str:
        text = str(value).strip().lower()
        if text not in allowed:
            raise ValueError("expected one of " + ", ".join(allowed))
        return text

    return parse


def parse_otlp_protocol(value: Any) -> str:
    """OTEL_EXPORTER_OTLP_PROTOCOL's values; http/json gets its own line (no SDK exporter)."""
    text = str(value).strip().lower()
    if text == "http/json":
        from schedscope.exporters.otlp import HTTP_JSON_UNSUPPORTED

        raise ValueError(HTTP_JSON_UNSUPPORTED)
    if text not in ("grpc", "http/protobuf"):
        raise ValueError("expected one of grpc, http/protobuf")
    return text


def parse_json_object(value: Any) -> dict[str, Any]:
    """A JSON object (SGLang's --kv-events-config style); a TOML table is taken as is."""
    if isinstance(value, dict):
        return value
    try:
        obj = json.loads(str(value))
    except json.JSONDecodeError:
        raise ValueError('expected a JSON object like \'{"endpoint": "tcp://..."}\'') from None
    if not isinstance(obj, dict):
        raise ValueError("expected a JSON object")
    return obj


def parse_str(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError("expected a non-empty string")
    return value


def parse_writable_dir(value: Any) -> Path:
    """A directory that exists and is writable, or can be created (nothing is created here)."""
    path = Path(str(value)).expanduser()
    _check_creatable(path, want_dir=True)
    return path


def parse_writable_file(value: Any) -> Path:
    path = Path(str(value)).expanduser()
    _check_creatable(path, want_dir=False)
    return path


def parse_readable_file(value: Any) -> Path:
    path = Path(str(value)).expanduser()
    if not path.is_file():
        raise ValueError("no such file" if not path.exists() else "not a regular file")
    if not os.access(path, os.R_OK):
        raise ValueError("file is not readable")
    return path


def _check_creatable(path: Path, *, want_dir: bool) -> None:
    if path.exists():
        if want_dir and not path.is_dir():
            raise ValueError("exists and is not a directory")
        if not want_dir and path.is_dir():
            raise ValueError("is a directory; expected a file path")
        if not os.access(path, os.W_OK):
            raise ValueError("not writable")
        return
    # Walk up to the nearest existing ancestor: it must be a writable directory.
    parent = path.parent
    while not parent.exists():
        if parent == parent.parent:
            break
        parent = parent.parent
    if not parent.is_dir():
        raise ValueError(f"cannot create it: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"cannot create it: {parent} is not writable")


def _to_int(value: Any, allowed: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected {allowed}")
    if isinstance(value, int):
        return value
    try:
        return int(str(value).strip())
    except ValueError:
        raise ValueError(f"expected {allowed}") from None


# ---------------------------------------------------------------------------------------------
# Options and resolution
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Option:
    key: str  # attribute name and config-file key; the flag is --key-with-dashes
    parse: Parser
    default: Any = None
    help: str = ""
    extra_env: tuple[str, ...] = ()  # standard variables read after SCHEDSCOPE_<KEY>

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")

    @property
    def env(self) -> tuple[str, ...]:
        return ("SCHEDSCOPE_" + self.key.upper(), *self.extra_env)


@dataclass
class Settings:
    """Resolved values (attribute access) plus where each came from."""

    command: str
    values: dict[str, Any]
    sources: dict[str, str] = field(default_factory=dict)
    config_path: Path | None = None

    def __getattr__(self, key: str) -> Any:
        try:
            return self.__dict__["values"][key]
        except KeyError:
            raise AttributeError(key) from None

    def as_dict(self) -> dict[str, Any]:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.values.items()}


def resolve(
    command: str,
    options: Iterable[Option],
    flags: Mapping[str, Any],
    *,
    config: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    known_keys: Iterable[str] = (),
) -> Settings:
    """Resolve every option of ``command``: flags > env > config file > defaults.

    ``flags`` maps option keys to the flag values (``None`` = not given). ``defaults`` overrides
    an option's default for this command. ``known_keys`` are keys of other commands that may
    appear at the top level of a shared config file. Raises CliError on the first bad value.
    """
    env = os.environ if environ is None else environ
    opts = {o.key: o for o in options}
    config_path, file_values = _load_config(command, opts, config, env, set(known_keys))
    out = Settings(command, {}, {}, config_path)
    for key, opt in opts.items():
        raw, source = _pick(opt, flags.get(key), env, file_values, config_path)
        if source == "default":
            value = (defaults or {}).get(key, opt.default)
            if isinstance(value, str):  # the same parser as a string from env or file
                try:
                    value = opt.parse(value)
                except ValueError as exc:
                    raise CliError(_bad_value(command, opt, value, source, str(exc))) from None
        else:
            try:
                value = opt.parse(raw)
            except ValueError as exc:
                raise CliError(_bad_value(command, opt, raw, source, str(exc))) from None
        out.values[key] = value
        out.sources[key] = source
    return out


def _pick(
    opt: Option,
    flag_value: Any,
    env: Mapping[str, str],
    file_values: Mapping[str, Any],
    config_path: Path | None,
) -> tuple[Any, str]:
    if flag_value is not None:
        return flag_value, opt.flag
    for name in opt.env:
        if env.get(name, "") != "":
            return env[name], "$" + name
    if opt.key in file_values:
        return file_values[opt.key], f"{config_path} key {opt.key!r}"
    return None, "default"


def _bad_value(command: str, opt: Option, raw: Any, source: str, allowed: str) -> str:
    # e.g. "invalid prometheus port '70000' (from $SCHEDSCOPE_PROMETHEUS_PORT): expected ..."
    name = opt.key.replace("_", " ")
    where = opt.flag if source == opt.flag else f"{opt.flag}, from {source}"
    return f"invalid {name} {raw!r} ({where}): {allowed}"


def _load_config(
    command: str,
    opts: Mapping[str, Option],
    config: str | Path | None,
    env: Mapping[str, str],
    known_keys: set[str],
) -> tuple[Path | None, dict[str, Any]]:
    source = "--config"
    if config is None and env.get(CONFIG_ENV):
        config, source = env[CONFIG_ENV], "$" + CONFIG_ENV
    if config is None:
        return None, {}
    path = Path(config).expanduser()
    prefix = f"config file {str(path)!r} ({source})"
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10: the same parser as a package, when installed
        try:
            import tomli as tomllib
        except ImportError:
            raise CliError(
                f"{prefix}: reading TOML on Python 3.10 needs 'pip install tomli'"
            ) from None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"{prefix}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise CliError(f"{prefix}: cannot read it ({exc.__class__.__name__})") from None
    except tomllib.TOMLDecodeError as exc:
        raise CliError(f"{prefix}: not valid TOML ({exc})") from None
    values: dict[str, Any] = {}
    tables = {
        k: v for k, v in data.items() if isinstance(v, dict) and k.replace("-", "_") not in opts
    }
    # Top level: shared by every command; keys of other commands are allowed and ignored here.
    for key, value in data.items():
        if key in tables:
            if key != command and key not in known_keys:
                raise CliError(f"{prefix}: unknown table [{key}]")
            continue
        norm = key.replace("-", "_")
        if norm in opts:
            values[norm] = value
        elif norm not in known_keys:
            raise CliError(f"{prefix}: unknown key {key!r}")
    # [command] table: only this command's options.
    for key, value in tables.get(command, {}).items():
        norm = key.replace("-", "_")
        if norm not in opts:
            allowed = ", ".join(sorted(opts))
            raise CliError(f"{prefix}: unknown key {key!r} in [{command}] (allowed: {allowed})")
        values[norm] = value
    return path, values
