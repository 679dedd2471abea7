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


# -- the images and the Kubernetes manifest -------------------------------------------------


def _dockerfile(name: str) -> dict:
    """The instructions this test relies on: title label, EXPOSE, ENTRYPOINT, COPY sources."""
    import json
    import re

    text = (ROOT / name).read_text(encoding="utf-8")
    title = re.search(r'^LABEL org\.opencontainers\.image\.title="([^"]+)"', text, re.M)
    entry = re.search(r"^ENTRYPOINT (\[.*\])$", text, re.M)
    expose = [int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()]
    copies = re.findall(r"^COPY (\S+) ", text, re.M)
    assert title and entry, name
    return {
        "title": title.group(1),
        "entrypoint": json.loads(entry.group(1)),
        "expose": expose,
        "copies": copies,
        "text": text,
    }


def _manifest_containers() -> dict[str, dict]:
    import yaml

    pod = yaml.safe_load((ROOT / "docs" / "kubernetes.yaml").read_text(encoding="utf-8"))
    return {c["name"]: c for c in pod["spec"]["containers"]}


@pytest.mark.parametrize(
    ("container", "dockerfile", "command"),
    [
        ("schedscope-sidecar", "Dockerfile", ["schedscope", "sidecar"]),
        ("engine", "Dockerfile.engine", ["schedscope", "engine", "serve"]),
    ],
)
def test_manifest_matches_dockerfile(container, dockerfile, command):
    image = _dockerfile(dockerfile)
    c = _manifest_containers()[container]
    # The image name's last path part, without the tag, is the Dockerfile's title.
    assert c["image"].rsplit("/", 1)[-1].split(":")[0] == image["title"]
    assert c["command"] == image["entrypoint"] == command
    ports = [p["containerPort"] for p in c["ports"]]
    assert ports and set(ports) <= set(image["expose"])
    probe = c.get("readinessProbe", {}).get("httpGet", {}).get("port")
    assert probe is None or probe in ports
    # The port the container serves on is the one its arguments name.
    assert str(ports[0]) in c["args"]
    # Every folder the package maps is copied in (a missing one breaks `pip install .`).
    package_dirs = {
        d.split("/")[0] for d in _pyproject()["tool"]["setuptools"]["package-dir"].values()
    }
    assert package_dirs <= set(image["copies"])


def test_sidecar_image_has_no_engine_extra():
    text = _dockerfile("Dockerfile")["text"]
    assert "pip install ." in text and "[engine]" not in text and "torch==" not in text
    assert "[engine]" in _dockerfile("Dockerfile.engine")["text"]


def test_sidecar_image_builds():
    import shutil

    docker = shutil.which("docker") or shutil.which("podman")
    if docker is None:
        pytest.skip("no container tool (docker/podman) on this machine")
    info = subprocess.run([docker, "info"], capture_output=True, text=True, timeout=30)
    if info.returncode != 0:
        pytest.skip(f"{docker} has no daemon here: {info.stderr.strip().splitlines()[-1:]}")
    tag = "schedscope-sidecar:test"
    build = subprocess.run(
        [docker, "build", "-q", "-t", tag, str(ROOT)], capture_output=True, text=True, timeout=900
    )
    assert build.returncode == 0, build.stderr[-2000:]
    proc = subprocess.run(
        [docker, "run", "--rm", "--entrypoint", "python", tag, "-c", "import torch"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0 and "torch" in proc.stderr
