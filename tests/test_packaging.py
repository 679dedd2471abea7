"""The torch-free install: the sidecar side works without the `engine` extra, and the engine
commands say in one line what to install. torch & co. are hidden by a failing finder on
sys.meta_path in a child interpreter (the same as a `pip install schedscope` without extras)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
ENGINE_ONLY = ("torch", "safetensors", "numpy", "fastapi", "uvicorn")

_BLOCKED = f"""
import runpy, sys
class _NoEngineExtra:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {ENGINE_ONLY!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
        return None
sys.meta_path.insert(0, _NoEngineExtra())
"""


def run_blocked(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", _BLOCKED + code],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def run_cli_blocked(*args: str) -> subprocess.CompletedProcess[str]:
    return run_blocked(
        f"sys.argv = ['schedscope', *{list(args)!r}]\n"
        "runpy.run_module('schedscope', run_name='__main__')\n"
    )


def test_blocker_really_blocks_torch():
    proc = run_blocked("import torch\n")
    assert proc.returncode != 0 and "No module named 'torch'" in proc.stderr


def test_telemetry_and_exporters_import_without_engine_extra():
    proc = run_blocked(
        "import schedscope.telemetry, schedscope.telemetry.sidecar, schedscope.exporters\n"
        "import schedscope.dashboards, schedscope.cli.sidecar_app, schedscope.engine.emitter\n"
        "print('ok')\n"
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ok"


@pytest.mark.parametrize("args", [["--help"], ["sidecar", "--help"], ["replay", "--help"],
                                  ["record", "--help"], ["demo", "--help"], ["-V"]])  # fmt: skip
def test_sidecar_side_cli_works_without_engine_extra(args):
    proc = run_cli_blocked(*args)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stdout.strip()


def test_replay_runs_without_engine_extra(tmp_path):
    missing = tmp_path / "none.ssrec"
    proc = run_cli_blocked("replay", str(missing), "--out-dir", str(tmp_path / "o"))
    # A real run of the command path (argument checking, settings), torch never needed.
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "schedscope[engine]" not in proc.stderr


@pytest.mark.parametrize(
    "args", [["demo"], ["demo", "--requests", "1"], ["engine", "serve"]], ids=" ".join
)
def test_engine_commands_say_what_to_install(args):
    proc = run_cli_blocked(*args)
    assert proc.returncode == 2
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and "pip install 'schedscope[engine]'" in lines[0]


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _names(reqs: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].strip().lower() for r in reqs}


def test_base_dependencies_carry_no_engine_packages():
    project = _pyproject()["project"]
    assert not _names(project["dependencies"]) & set(ENGINE_ONLY)
    assert set(ENGINE_ONLY) <= _names(project["optional-dependencies"]["engine"])


def test_dev_extra_includes_engine_so_quick_start_still_runs_the_demo():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert "schedscope[engine]" in extras["dev"]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    # torch pinned first (the CPU wheel), then the dev extra, in that order.
    assert ci.index("pip install -q torch==2.13.0") < ci.index("pip install -q -e '.[dev]'")
