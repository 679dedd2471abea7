"""The in-process API of the reference engine.

Two ways to drive it:
- single-threaded: ``submit()`` then ``step()`` / ``run_until_idle()`` / ``generate()``;
- serving: ``start()`` runs the scheduler loop on its own thread; any thread may ``submit()``,
  ``abort()`` or ``call()`` (run a function on the scheduler thread, e.g. an admin command).

Everything that reaches the scheduler goes through one thread-safe inbox, drained at the top of
each loop iteration, so scheduler state is only ever touched by one thread. The control plane
(``engine.control``, engine/control.py: pause, idle spans, memory check, cache flush, weights,
KV offload, profiler) drives each loop iteration; the idle loop blocks on the inbox's socket.
Its commands are also methods here (``pause_generation``...), safe from any thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any, TypeVar

from schedscope.engine.config import EngineConfig, ModelConfig, get_model_config
from schedscope.engine.control import ControlledEngine
from schedscope.engine.control_errors import ControlError
from schedscope.engine.emitter import AnyEmitter, Emitter, NullEmitter
from schedscope.engine.inbox import Inbox
from schedscope.engine.request import GenerationResult, OutputCallback, Req
from schedscope.engine.sampling import SamplingParams
from schedscope.engine.scheduler import Scheduler
from schedscope.engine.tokenizer import ByteTokenizer
from schedscope.telemetry.schema import EngineInfo

log = logging.getLogger("schedscope.engine")
T = TypeVar("T")
Command = Callable[[Scheduler], None]


def engine_info(cfg: EngineConfig, model_cfg: ModelConfig | None = None) -> EngineInfo:
    """The labels this engine's telemetry carries (for callers that build their own Emitter)."""
    model_cfg = model_cfg or get_model_config(cfg.model, cfg.model_path)
    return EngineInfo(
        model=model_cfg.name,
        engine_type="unified",
        tp_rank=cfg.tp_rank,
        pp_rank=cfg.pp_rank,
        dp_rank=cfg.dp_rank,
        page_size=cfg.page_size,
        max_total_tokens=cfg.max_total_tokens,
        max_running_requests=cfg.max_running_requests,
        config=cfg.summary(),
    )


class Engine:
    def __init__(
        self,
        config: EngineConfig | None = None,
        emitter: AnyEmitter | None = None,
        **overrides: Any,
    ) -> None:
        cfg = (config or EngineConfig()).replace(**overrides)
        if cfg.page_size < 1 or cfg.max_total_tokens < cfg.page_size:
            raise ValueError("page_size must be >= 1 and max_total_tokens >= page_size")
        self.config = cfg
        self.model_config = get_model_config(cfg.model, cfg.model_path)
        self._owns_emitter = emitter is None
        if emitter is None:
            info = engine_info(cfg, self.model_config)
            emitter = (
                Emitter(info, cfg.telemetry_endpoint, engine_id=cfg.engine_id)
                if cfg.telemetry_endpoint
                else NullEmitter()
            )
        self.emitter = emitter
        self.tokenizer = ByteTokenizer()
        self.scheduler = Scheduler(cfg, self.model_config, emitter)
        self.scheduler.on_finish.append(self._on_finish)
        # Commands for the scheduler thread; the idle loop sleeps on this inbox's socket.
        self.inbox = Inbox()
        self.control = ControlledEngine(self.scheduler, inbox=self.inbox)
        self._submitted = itertools.count()  # thread-safe in CPython; orders default seeds
        self._results: dict[str, GenerationResult] = {}
        self._keep: set[str] = set()
        self._waiters: dict[str, threading.Event] = {}
        self._lock = threading.Lock()  # guards _results/_keep/_waiters across threads
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._closed = False
        self._calls: set[Future] = set()  # failed, not left hanging, if the loop dies
        self.failure: str | None = None  # why the scheduler thread died, if it did

    # -- requests (any thread) --------------------------------------------------------------

    def submit(
        self,
        prompt: str | Sequence[int],
        sampling: SamplingParams | None = None,
        rid: str | None = None,
        traceparent: str | None = None,
        on_output: OutputCallback | None = None,
        keep_result: bool = True,
    ) -> str:
        """Queue one request; returns its rid. Invalid input raises ValueError here, in the
        caller's thread. ``on_output`` runs on the scheduler thread with each new token and at
        the end. With ``keep_result`` the final GenerationResult waits for ``pop_result``."""
        if self._closed:
            raise RuntimeError("engine is closed")
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        sampling = sampling or SamplingParams()
        sampling.validate()
        self._validate(ids, sampling)
        n = next(self._submitted)
        if sampling.seed is None:  # reproducible runs: engine seed + submission order
            sampling = dataclasses.replace(sampling, seed=self.config.seed * 1_000_003 + n)
        rid = rid or uuid.uuid4().hex
        req = Req(rid, ids, sampling, time.monotonic_ns(), traceparent, on_output)
        if keep_result:
            with self._lock:
                self._keep.add(rid)
        self.inbox.put(lambda s: self.control.admit(req))
        return rid

    def _validate(self, ids: list[int], sampling: SamplingParams) -> None:
        cfg, vocab = self.config, self.model_config.vocab_size
        if not ids:
            raise ValueError("empty prompt")
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab})")
        total = len(ids) + sampling.max_new_tokens
        limit = min(cfg.context_length, cfg.max_total_tokens)
        if total > limit:
            raise ValueError(
                f"prompt ({len(ids)} tokens) + max_new_tokens ({sampling.max_new_tokens}) = "
                f"{total} exceeds the limit of {limit} (context_length / max_total_tokens)"
            )

    def abort(self, rid: str, reason: str = "aborted by client") -> None:
        self.inbox.put(lambda s: self.control.abort_request(rid, reason))

    def call(self, fn: Callable[[Scheduler], T]) -> Future[T]:
        """Run ``fn(scheduler)`` on the scheduler thread, between steps (admin commands)."""
        fut: Future[T] = Future()
        if self.failure is not None:
            fut.set_exception(ControlError(f"engine is not running ({self.failure})"))
            return fut

        def command(s: Scheduler) -> None:
            self._calls.discard(fut)
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn(s))
                except BaseException as exc:
                    fut.set_exception(exc)

        self._calls.add(fut)
        self.inbox.put(command)
        return fut

    def control_call(self, fn: Callable[[ControlledEngine], T], timeout: float = 60.0) -> T:
        """Run a control-plane command: on the scheduler thread when it runs, else here."""
        if self._thread is None:
            self._drain_inbox()
            return fn(self.control)
        return self.call(lambda s: fn(self.control)).result(timeout)

    # -- control plane (any thread; refusals raise ControlError subclasses) -------------------

    def pause_generation(self, mode: str = "abort", reason: str = "") -> None:
        self.control_call(lambda c: c.pause_generation(mode, reason))

    def continue_generation(self) -> None:
        self.control_call(lambda c: c.continue_generation())

    def is_fully_idle(self, for_health_check: bool = False) -> bool:
        return self.control_call(lambda c: c.is_fully_idle(for_health_check))

    def flush_cache(self) -> None:
        self.control_call(lambda c: c.flush_cache())

    def update_weights(self, source: Any) -> str:
        return self.control_call(lambda c: c.update_weights(source))

    def start_profile(
        self, output_dir: str | None = None, num_steps: int | None = None, activities=None
    ) -> str:
        return self.control_call(lambda c: c.start_profile(output_dir, num_steps, activities))

    def stop_profile(self) -> Any:
        return self.control_call(lambda c: c.stop_profile())

    def get_internal_state(self) -> dict[str, Any]:
        return self.control_call(lambda c: c.get_internal_state())

    def set_internal_state(self, changes: dict[str, Any]) -> dict[str, Any]:
        return self.control_call(lambda c: c.set_internal_state(changes))

    def pop_result(self, rid: str) -> GenerationResult | None:
        with self._lock:
            return self._results.pop(rid, None)

    def _on_finish(self, result: GenerationResult, req: Req) -> None:
        with self._lock:
            if req.rid in self._keep:
                self._keep.discard(req.rid)
                self._results[req.rid] = result
            waiter = self._waiters.pop(req.rid, None)
        if waiter is not None:
            waiter.set()

    # -- driving it from the caller's thread ------------------------------------------------

    def step(self) -> bool:
        """One scheduler iteration (inbox, then at most one batch); whether work was done."""
        self._check_not_threaded()
        self._drain_inbox()
        return self.control.run_once()

    def run_until_idle(self, max_steps: int | None = None) -> int:
        """Step until nothing waits or runs; returns the number of steps taken."""
        self._check_not_threaded()
        steps = 0
        while max_steps is None or steps < max_steps:
            self._drain_inbox()
            if not self.scheduler.has_work() or self.control.paused is not None:
                break
            self.control.run_once()
            steps += 1
        return steps

    def generate(
        self,
        prompts: Sequence[str | Sequence[int]],
        sampling: SamplingParams | Sequence[SamplingParams] | None = None,
        timeout: float | None = None,
    ) -> list[GenerationResult]:
        """Submit all, wait for all, results in prompt order (works with or without start())."""
        params = (
            list(sampling)
            if isinstance(sampling, Sequence)
            else [sampling or SamplingParams()] * len(prompts)
        )
        waiters = []
        rids = []
        for prompt, sp in zip(prompts, params, strict=True):
            rid = uuid.uuid4().hex
            event = threading.Event()
            with self._lock:
                self._waiters[rid] = event
            rids.append(self.submit(prompt, sp, rid=rid))
            waiters.append(event)
        if self._thread is None:
            self.run_until_idle()
        deadline = None if timeout is None else time.monotonic() + timeout
        for event in waiters:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not event.wait(left):
                raise TimeoutError("generate timed out")
        return [self.pop_result(rid) for rid in rids]  # type: ignore[misc]

    def _drain_inbox(self) -> int:
        commands = self.inbox.drain()
        for command in commands:
            command(self.scheduler)
        return len(commands)

    def _check_not_threaded(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the scheduler runs on its own thread (start()); use submit/call")

    # -- the scheduler thread ---------------------------------------------------------------

    def start(self) -> Engine:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._loop, name="schedscope-scheduler", daemon=True
            )
            self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._stop.set()
            self.inbox.wake()
            self._thread.join(timeout)
            self._thread = None

    @property
    def iterations(self) -> int:
        """Loop turns of the scheduler thread (an idle engine makes about one per second)."""
        return self.control.iterations

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def _loop(self) -> None:
        try:
            self.control.serve(self._stop, lambda command: command(self.scheduler))
        except Exception as exc:  # report why the thread died instead of vanishing
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("scheduler thread crashed")
            self._stop.set()
            self.control.fail_clients(f"engine stopped: {self.failure}")
        finally:
            for fut in list(self._calls):
                if fut.set_running_or_notify_cancel():
                    fut.set_exception(ControlError(f"engine stopped ({self.failure or 'stop'})"))
            self._calls.clear()

    # -- lifecycle --------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        self.stop()
        self._closed = True
        self.control.close()
        self.emitter.flush()
        if self._owns_emitter:
            self.emitter.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
