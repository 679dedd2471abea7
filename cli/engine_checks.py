"""Checks the engine commands (`demo`, `engine serve`) run before starting anything.

Everything a user passes is validated here, up front, so a bad value is one ``error:`` line
and exit 2 instead of a traceback from deep inside torch, safetensors or a child process.
This module imports neither torch nor safetensors: the sidecar image has neither.
"""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

from schedscope.cli.settings import CliError

# What the reference engine needs beyond the base install (the `engine` extra).
ENGINE_MODULES = ("torch", "safetensors", "numpy")
SERVER_MODULES = ("fastapi", "uvicorn")
INSTALL_HINT = "pip install 'schedscope[engine]'"

_HF_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
)  # fmt: skip
_MAX_HEADER = 100 * 1024**2  # safetensors' own limit on the JSON header


def _missing(modules: tuple[str, ...]) -> list[str]:
    out = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            out.append(name)
    return out


def require_engine(command: str, *, server: bool = False) -> None:
    """One line naming the extra to install when the engine's dependencies are absent."""
    missing = _missing(ENGINE_MODULES + (SERVER_MODULES if server else ()))
    if missing:
        raise CliError(
            f"{command} needs the reference engine ({', '.join(missing)} not installed): "
            f"{INSTALL_HINT}"
        )


def check_model(command: str, model: str, model_path: str | None = None) -> None:
    """--model must name a known config unless --model-path gives a readable HF folder."""
    from schedscope.engine.config import MODEL_CONFIGS

    if model_path:
        check_model_path(command, model_path)
        return
    if model not in MODEL_CONFIGS:
        known = ", ".join(sorted(MODEL_CONFIGS))
        raise CliError(f"{command}: --model {model!r}: expected one of {known} (or --model-path)")


def check_model_path(command: str, model_path: str) -> None:
    """config.json with the keys the engine reads, and safetensors files whose headers parse.
    (Whether every tensor the model needs is there is only known once the model is built;
    the engine raises a ValueError for that, which the command turns into one line.)"""
    where = f"{command}: --model-path {model_path!r}"
    path = Path(model_path)
    if not path.is_dir():
        raise CliError(f"{where}: not a folder")
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CliError(f"{where}: no config.json") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise CliError(f"{where}: config.json unreadable: {exc}") from None
    if not isinstance(cfg, dict):
        raise CliError(f"{where}: config.json is not a JSON object")
    lacking = [k for k in _HF_KEYS if not isinstance(cfg.get(k), int) or cfg[k] < 1]
    if lacking:
        raise CliError(f"{where}: config.json lacks positive integer {', '.join(lacking)}")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CliError(f"{where}: no *.safetensors files")
    for file in files:
        why = _safetensors_problem(file)
        if why:
            raise CliError(f"{where}: {file.name}: not a valid safetensors file ({why})")


def _safetensors_problem(file: Path) -> str | None:
    """The format: u64 little-endian header length, a JSON header, then the data; every
    tensor's data_offsets must lie inside the data. Checked without loading anything."""
    try:
        size = file.stat().st_size
        with file.open("rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                return "shorter than its 8-byte header length"
            (n,) = struct.unpack("<Q", raw)
            if n > min(_MAX_HEADER, size - 8):
                return "header length past the end of the file"
            header = json.loads(f.read(n))
    except OSError as exc:
        return exc.strerror or str(exc)
    except (UnicodeDecodeError, ValueError):
        return "header is not JSON"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    data = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offs = info.get("data_offsets") if isinstance(info, dict) else None
        if (
            not isinstance(offs, list)
            or len(offs) != 2
            or not all(isinstance(o, int) for o in offs)
            or not 0 <= offs[0] <= offs[1] <= data
        ):
            return f"tensor {name!r} has bad data_offsets"
    return None


def check_device(command: str, device: str) -> None:
    """--device cuda on a build or machine without CUDA: say so now, not from torch later."""
    if device != "cuda":
        return
    import torch  # only the engine commands get here, and they need torch anyway

    if not torch.cuda.is_available():
        why = "this torch build has no CUDA" if torch.version.cuda is None else "no GPU visible"
        raise CliError(f"{command}: --device cuda: {why}; use --device cpu or auto")
