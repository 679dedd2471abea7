"""torch profiler under the engine's control: N steps (or until stopped) into a directory.

Seed 003's profiler mixin, reduced to what an operator uses: start (output_dir, num_steps,
activities), the scheduler calls ``on_step`` after each forward, stop writes a Chrome trace.
A second start while one runs is a clear error, not a restart.
"""

from __future__ import annotations

import os
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from schedscope.engine.control_errors import (
    ControlError,
    ProfileInProgressError,
    ProfileNotRunningError,
)
from schedscope.engine.emitter import AnyEmitter
from schedscope.telemetry.schema import ProfileBegin, ProfileEnd

ENV_PROFILER_DIR = "SCHEDSCOPE_TORCH_PROFILER_DIR"
_ACTIVITIES = {"CPU": ProfilerActivity.CPU, "GPU": ProfilerActivity.CUDA}

_now_ns: Callable[[], int] = time.monotonic_ns


@dataclass
class ProfileResult:
    path: str
    steps: int


class EngineProfiler:
    def __init__(self, emitter: AnyEmitter) -> None:
        self.emitter = emitter
        self._prof: profile | None = None
        self._output_dir = ""
        self._profile_id = ""
        self._target_steps: int | None = None
        self._steps = 0
        self.last_result: ProfileResult | None = None

    @property
    def in_progress(self) -> bool:
        return self._prof is not None

    def start(
        self,
        output_dir: str | None = None,
        num_steps: int | None = None,
        activities: list[str] | None = None,
    ) -> str:
        """Start profiling; returns the profile id. ``num_steps`` None: until ``stop``."""
        if self._prof is not None:
            raise ProfileInProgressError(
                "profiling is already in progress; call stop_profile first"
            )
        if num_steps is not None and num_steps < 1:
            raise ControlError(f"num_steps must be >= 1, got {num_steps}")
        wanted = activities or ["CPU", "GPU"]
        unknown = [a for a in wanted if a not in _ACTIVITIES]
        if unknown:
            raise ControlError(f"unknown profiler activities {unknown}; use CPU and/or GPU")
        acts = [_ACTIVITIES[a] for a in wanted]
        # GPU is asked for by default; on a machine without CUDA it is silently CPU only.
        if not torch.cuda.is_available():
            acts = [a for a in acts if a is not ProfilerActivity.CUDA]
        if not acts:
            raise ControlError("no profiler activity available on this device (GPU only asked)")
        out = output_dir or os.environ.get(ENV_PROFILER_DIR) or tempfile.gettempdir()
        try:
            Path(out).mkdir(parents=True, exist_ok=True)
            if not os.access(out, os.W_OK):
                raise PermissionError(f"{out!r} is not writable")
        except (OSError, ValueError) as exc:  # a bad path is the caller's error, not a crash
            raise ControlError(f"output_dir {out!r} is not usable: {exc}") from None
        self._output_dir = out
        self._profile_id = f"{int(time.time())}-{uuid.uuid4().hex[:8]}"
        self._target_steps = num_steps
        self._steps = 0
        prof = profile(activities=acts, record_shapes=False, with_stack=False)
        prof.start()
        self._prof = prof
        if self.emitter.enabled:
            self.emitter.emit(ProfileBegin(ts=_now_ns(), output_dir=out, num_steps=num_steps))
        return self._profile_id

    def on_step(self) -> None:
        """After each forward: stops by itself once ``num_steps`` have run."""
        if self._prof is None:
            return
        self._steps += 1
        self._prof.step()
        if self._target_steps is not None and self._steps >= self._target_steps:
            self.stop()

    def stop(self) -> ProfileResult:
        if self._prof is None:
            raise ProfileNotRunningError("no profiling in progress; call start_profile first")
        prof, self._prof = self._prof, None
        path = str(Path(self._output_dir) / f"{self._profile_id}.trace.json")
        ok = True
        try:
            prof.stop()
            prof.export_chrome_trace(path)
        except Exception as exc:  # a failed export must not take the scheduler down
            ok, path = False, f"export failed: {exc}"
        result = ProfileResult(path=path, steps=self._steps)
        self.last_result = result
        if self.emitter.enabled:
            self.emitter.emit(ProfileEnd(ts=_now_ns(), ok=ok, path=path))
        return result
