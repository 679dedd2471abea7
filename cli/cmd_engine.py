"""`schedscope engine serve`: the reference engine behind SGLang's native HTTP API.

The scheduler runs on its own thread; uvicorn serves the API on the main thread. Loopback by
default; on any other address the admin endpoints need a token, and the server refuses to
start without one.
"""

from __future__ import annotations

import errno
import logging
import socket
from typing import Optional

import typer

from schedscope.cli.engine_checks import check_device, check_model, require_engine
from schedscope.cli.settings import CliError, parse_host, parse_zmq_endpoint

engine_app = typer.Typer(
    help="Run the reference engine (torch) and its HTTP API.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def register(app: typer.Typer) -> None:
    app.add_typer(engine_app, name="engine")


def _check_port_free(host: str, port: int) -> None:
    """One clear line instead of uvicorn's log + exit when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            why = "already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise CliError(
                f"schedscope engine serve: cannot listen on {host}:{port}: {why}"
            ) from None


@engine_app.command("serve")
def serve(
    host: str = typer.Option(
        "127.0.0.1", "--host", help="Address to listen on (loopback by default)."
    ),
    port: int = typer.Option(
        30000, "--port", min=1, max=65535, help="HTTP port (SGLang's default)."
    ),
    model: str = typer.Option("tiny", "--model", help="Model config name (tiny, qwen2.5-0.5b)."),
    model_path: Optional[str] = typer.Option(
        None, "--model-path", help="Local HF folder (config.json + *.safetensors); never downloads."
    ),
    device: str = typer.Option("auto", "--device", help="auto, cpu or cuda."),
    enable_overlap: bool = typer.Option(False, "--enable-overlap", help="Overlap scheduling."),
    max_total_tokens: int = typer.Option(4096, "--max-total-tokens", min=16, help="KV pool slots."),
    max_running_requests: int = typer.Option(32, "--max-running-requests", min=1),
    page_size: int = typer.Option(1, "--page-size", min=1),
    endpoint: Optional[str] = typer.Option(
        None, "--endpoint", envvar="SCHEDSCOPE_ENDPOINT", help="Telemetry endpoint (raw events)."
    ),
    no_telemetry: bool = typer.Option(False, "--no-telemetry", help="Emit no raw events."),
    admin_token: Optional[str] = typer.Option(
        None,
        "--admin-token",
        envvar="SCHEDSCOPE_ADMIN_TOKEN",
        help="Bearer token for admin endpoints (required off loopback).",
        show_default=False,
    ),
    log_level: str = typer.Option("warning", "--log-level", help="debug, info, warning, error."),
) -> None:
    """Serve the reference engine: POST /generate, /pause_generation, /flush_cache, ..."""
    require_engine("schedscope engine serve", server=True)
    try:
        parse_host(host)
        if endpoint:
            parse_zmq_endpoint(endpoint)
    except ValueError as exc:
        raise CliError(f"schedscope engine serve: {exc}") from None
    if device not in ("auto", "cpu", "cuda"):
        raise CliError("schedscope engine serve: --device: expected one of auto, cpu, cuda")
    if log_level not in ("debug", "info", "warning", "error"):
        raise CliError("schedscope engine serve: --log-level: expected debug, info, warning, error")
    check_model("schedscope engine serve", model, model_path)
    check_device("schedscope engine serve", device)
    logging.basicConfig(level=log_level.upper(), format="%(levelname)s %(name)s: %(message)s")

    from schedscope.engine.server import ServerSettings, check_bind

    settings = ServerSettings(host=host, port=port, admin_token=admin_token or None)
    try:
        check_bind(settings)
    except ValueError as exc:
        raise CliError(f"schedscope engine serve: {exc}") from None
    _check_port_free(host, port)

    # Imported here: torch is only paid for by commands that run the engine.
    from schedscope.engine.config import EngineConfig
    from schedscope.engine.control import ControlledEngine
    from schedscope.engine.runner import EngineRunner
    from schedscope.engine.server import serve as serve_http

    cfg = EngineConfig(
        model=model,
        model_path=model_path,
        device=device,
        enable_overlap=enable_overlap,
        max_total_tokens=max_total_tokens,
        max_running_requests=max_running_requests,
        page_size=page_size,
    )
    try:
        engine = ControlledEngine.create(cfg, endpoint=endpoint, telemetry=not no_telemetry)
    except (ValueError, KeyError, OSError, RuntimeError) as exc:
        # A checkpoint that lacks a tensor, or one whose shapes do not fit the config, is only
        # known once the model is built (SafetensorError is a subclass of Exception only).
        raise CliError(f"schedscope engine serve: {exc}") from None
    except Exception as exc:
        if type(exc).__name__ != "SafetensorError":
            raise
        raise CliError(f"schedscope engine serve: --model-path: {exc}") from None
    runner = EngineRunner(engine).start()
    typer.echo(
        f"schedscope engine: model {engine.model_name} on {engine.device}, "
        f"http://{host}:{port} (admin token {'required' if settings.requires_token else 'off: loopback'})",
        err=True,
    )
    serve_http(runner, settings)
