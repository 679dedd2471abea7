"""The catalog of every CLI option: one ``Option`` each, shared by the commands that take it.

Commands pick options from here (``SIDECAR_OPTIONS``, ``DEMO_OPTIONS``...), declare the typer
flags with ``flag(key)`` (default ``None`` so the settings layer can tell "not given" from a
value) and resolve them with ``settings.resolve``. The README's CLI reference follows this file.
"""

from __future__ import annotations

from typing import Any

import typer

from schedscope.cli.settings import (
    Option,
    choice,
    parse_bool,
    parse_connect_endpoint,
    parse_json_object,
    parse_optional_port,
    parse_otlp_protocol,
    parse_positive_float,
    parse_positive_int,
    parse_size,
    parse_str,
    parse_url,
    parse_writable_dir,
    parse_writable_file,
    parse_zmq_endpoint,
)
from schedscope.telemetry.schema import DEFAULT_ENDPOINT  # the engine's emitter's default

DEFAULT_PROMETHEUS_PORT = 9464  # the OpenTelemetry Prometheus exporter's customary port


def _o(key: str, parse: Any, default: Any = None, help: str = "", env: tuple[str, ...] = ()):
    return Option(key, parse, default, help, env)


OPTIONS: dict[str, Option] = {
    o.key: o
    for o in [
        # -- raw-event input --------------------------------------------------------------
        _o("endpoint", parse_zmq_endpoint, DEFAULT_ENDPOINT,
           "Raw-event endpoint engines send to: ipc://PATH or tcp://HOST:PORT."),
        _o("connect", parse_bool, False,
           "Connect to an engine that binds, instead of binding the endpoint."),
        _o("queue_size", parse_positive_int, 10_000,
           "Frames buffered between the receiving thread and processing (drops counted)."),
        _o("max_message_bytes", parse_size, 16 * 1024**2,
           "Largest raw-event frame accepted (bigger ones are refused and counted)."),
        # -- Prometheus -------------------------------------------------------------------
        _o("prometheus_host", parse_str, "127.0.0.1",
           "Address /metrics binds to (loopback by default; 0.0.0.0 to be scraped remotely).",
           ("OTEL_EXPORTER_PROMETHEUS_HOST",)),
        _o("prometheus_port", parse_optional_port, DEFAULT_PROMETHEUS_PORT,
           "Port of /metrics; 0 picks a free port, 'off' disables the server.",
           ("OTEL_EXPORTER_PROMETHEUS_PORT",)),
        # -- OTLP -------------------------------------------------------------------------
        _o("otlp_endpoint", parse_url, None,
           "OTLP collector/Jaeger/Tempo URL (e.g. http://localhost:4317). Off when unset.",
           ("OTEL_EXPORTER_OTLP_ENDPOINT",)),
        _o("otlp_protocol", parse_otlp_protocol, None,
           "OTLP protocol; default: http/protobuf for port 4318, grpc otherwise.",
           ("OTEL_EXPORTER_OTLP_PROTOCOL",)),
        _o("service_name", parse_str, None,
           "OTel service.name of the spans (default schedscope-sidecar).",
           ("OTEL_SERVICE_NAME",)),
        # -- files ------------------------------------------------------------------------
        _o("out_dir", parse_writable_dir, None,
           "Folder for the files below (created if missing)."),
        _o("otlp_json", parse_bool, None,
           "Write OTLP JSON lines (traces.jsonl, metrics.jsonl). Default: on without an OTLP endpoint."),
        _o("perfetto", parse_bool, True, "Write a Perfetto / Chrome trace timeline."),
        _o("snapshot", parse_bool, True, "Write a final metrics snapshot (Prometheus text)."),
        _o("record", parse_bool, False, "Record the raw event stream (replay it later)."),
        _o("record_max_bytes", parse_size, 256 * 1024**2,
           "Size cap of the recording; frames past it are counted, not written."),
        # -- KV events: relay (we publish) and ingest (we subscribe to SGLang/vLLM) ----------
        _o("kv_relay_endpoint", parse_zmq_endpoint, None,
           "Publish KV events in the SGLang/vLLM wire format here (e.g. tcp://*:5557)."),
        _o("kv_relay_replay_endpoint", parse_zmq_endpoint, None,
           "ROUTER endpoint serving replay of buffered KV batches (e.g. tcp://*:5558)."),
        _o("kv_relay_topic", str, "", "Topic frame of relayed KV batches."),
        _o("kv_relay_buffer_steps", parse_positive_int, 10_000, "KV batches kept for replay."),
        _o("kv_relay_hash_style", choice("sglang", "vllm", "vllm_bytes"), "sglang",
           "Block hash encoding of the relay: sglang (int64), vllm (uint64), vllm_bytes."),
        _o("kv_relay_config", parse_json_object, None,
           "SGLang KVEventsConfig JSON for the relay (endpoint, replay_endpoint, topic...)."),
        _o("kv_ingest_endpoint", parse_connect_endpoint, None,
           "Subscribe to a stock SGLang/vLLM engine's KV events (e.g. tcp://127.0.0.1:5557)."),
        _o("kv_ingest_replay_endpoint", parse_connect_endpoint, None,
           "The engine's KV replay endpoint, used to fill seq gaps."),
        _o("kv_ingest_topic", str, "", "Topic prefix to subscribe to."),
        _o("kv_ingest_config", parse_json_object, None,
           "The engine's --kv-events-config JSON, as you passed it to SGLang/vLLM."),
        # -- record / replay ----------------------------------------------------------------
        _o("out", parse_writable_file, "schedscope-events.ssrec", "Recording file to write."),
        _o("duration", parse_positive_float, None, "Stop after this many seconds."),
        _o("realtime", parse_bool, False,
           "Replay at the recorded pace instead of as fast as possible."),
        _o("speed", parse_positive_float, 1.0, "Pace factor for --realtime (2 = twice as fast)."),
        # -- demo -------------------------------------------------------------------------
        _o("requests", parse_positive_int, 32, "Requests in the demo workload."),
        _o("concurrency", parse_positive_int, 8, "Requests in flight at once."),
        _o("max_new_tokens", parse_positive_int, 24, "Tokens generated per request."),
        _o("model", parse_str, "tiny", "Model config name of the reference engine."),
        _o("device", choice("auto", "cpu", "cuda"), "auto", "Engine device (auto: CUDA if present)."),
        _o("seed", int, 0, "Workload seed."),
        # -- common -----------------------------------------------------------------------
        _o("log_level", choice("debug", "info", "warning", "error"), "warning", "Log level."),
    ]
}  # fmt: skip

_OUTPUTS = [
    "prometheus_host", "prometheus_port", "otlp_endpoint", "otlp_protocol", "service_name",
    "out_dir", "otlp_json", "perfetto", "snapshot", "record", "record_max_bytes",
    "kv_relay_endpoint", "kv_relay_replay_endpoint", "kv_relay_topic", "kv_relay_buffer_steps",
    "kv_relay_hash_style", "kv_relay_config", "log_level",
]  # fmt: skip
_INPUT = ["endpoint", "connect", "queue_size", "max_message_bytes"]
_KV_INGEST = [
    "kv_ingest_endpoint", "kv_ingest_replay_endpoint", "kv_ingest_topic", "kv_ingest_config",
]  # fmt: skip

COMMAND_OPTIONS: dict[str, list[str]] = {
    "sidecar": _INPUT + _KV_INGEST + _OUTPUTS + ["duration"],
    "record": [*_INPUT, "out", "duration", "record_max_bytes", "log_level"],
    "replay": [*_OUTPUTS, "realtime", "speed"],
    "demo": [
        *_OUTPUTS, "duration", "requests", "concurrency", "max_new_tokens", "model", "device",
        "seed",
    ],
}  # fmt: skip

# Defaults that differ per command.
COMMAND_DEFAULTS: dict[str, dict[str, Any]] = {
    "sidecar": {},
    "record": {},
    "replay": {"prometheus_port": None, "out_dir": "schedscope-replay"},
    "demo": {"prometheus_port": 0, "out_dir": "schedscope-out", "record": True, "duration": 50.0},
}

ALL_KEYS = frozenset(OPTIONS) | frozenset(COMMAND_OPTIONS)


def options_for(command: str) -> list[Option]:
    return [OPTIONS[k] for k in COMMAND_OPTIONS[command]]


def flag(key: str, *, short: str | None = None) -> Any:
    """The typer Option for ``key``: default None ("not given"), help naming the env vars."""
    opt = OPTIONS[key]
    env = ", ".join("$" + e for e in opt.env)
    names = [f"{opt.flag}/--no-{opt.flag[2:]}"] if opt.parse is parse_bool else [opt.flag]
    if short:
        names.append(short)
    # Parentheses, not [..]: typer's rich help takes square brackets for markup and drops them.
    # A --x/--no-x pair takes no value: no "<bool>" placeholder.
    metavar = "" if opt.parse is parse_bool else None
    return typer.Option(
        None, *names, help=f"{opt.help} (env: {env})", show_default=False, metavar=metavar
    )


CONFIG_FLAG_HELP = "TOML config file (keys = option names; see README). (env: $SCHEDSCOPE_CONFIG)"


def config_flag() -> Any:
    return typer.Option(None, "--config", help=CONFIG_FLAG_HELP, show_default=False)


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, int) and value >= 1024 and value % 1024 == 0:
        for unit, n in (("G", 1024**3), ("M", 1024**2), ("K", 1024)):
            if value % n == 0:
                return f"{value // n}{unit}"
    return str(value)


def with_defaults(command: str, func: Any) -> Any:
    """Write each option's default for ``command`` into its --help text. The typer defaults
    stay None ("not given", so env and config can win); only the help changes."""
    import inspect

    from typer.models import OptionInfo

    defaults = COMMAND_DEFAULTS.get(command, {})
    for name, param in inspect.signature(func).parameters.items():
        info = param.default
        if (
            not isinstance(info, OptionInfo)
            or name not in OPTIONS
            or "[default:" in (info.help or "")
        ):
            continue
        value = defaults.get(name, OPTIONS[name].default)
        if name == "prometheus_port" and value is None:
            value = "off"
        if value is None or value == "":
            continue
        info.help = (
            f"{info.help[:-1]}; default: {_show(value)})"
            if info.help.endswith(")")
            else f"{info.help} (default: {_show(value)})"
        )
    return func
