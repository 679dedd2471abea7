"""Small helpers shared by the cmd_* modules: settings resolution, logging, signals."""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from rich.console import Console

from schedscope.cli.options import ALL_KEYS, COMMAND_DEFAULTS, options_for
from schedscope.cli.settings import CliError, Settings, resolve

console = Console(stderr=True, highlight=False, soft_wrap=True)


def load_settings(
    command: str,
    flags: Mapping[str, Any],
    config: str | Path | None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """flags > env > config file > per-command defaults; CliError on a bad value."""
    settings = resolve(
        command,
        options_for(command),
        flags,
        config=config,
        environ=environ,
        defaults=COMMAND_DEFAULTS.get(command),
        known_keys=ALL_KEYS,
    )
    level = settings.values.get("log_level") or "warning"
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    return settings


def make_out_dir(path: Path, command: str) -> Path:
    """Create the output folder; one clear line if that is impossible."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CliError(f"cannot create --out-dir {str(path)!r}: {exc.strerror}") from None
    return path


def on_stop_signals(stop: Callable[[], None]) -> Callable[[], None]:
    """Call ``stop`` on SIGINT/SIGTERM (main thread only); returns a function restoring the
    previous handlers. A second Ctrl-C during shutdown falls through to Python's default."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = {}

    def handler(signum: int, _frame: Any) -> None:
        signal.signal(
            signum, signal.default_int_handler if signum == signal.SIGINT else previous[signum]
        )
        stop()

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, handler)

    def restore() -> None:
        for sig, prev in previous.items():
            signal.signal(sig, prev)

    return restore
