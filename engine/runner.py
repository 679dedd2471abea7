"""The scheduler thread, and the thread-safe doorway the HTTP server uses to reach it.

One thread owns the engine: it drains the inbox (new requests, aborts, control commands),
runs one scheduler step when there is work, and otherwise sleeps on the inbox socket. Control
commands are closures executed *on this thread* between steps, so they never race a batch; the
caller gets their result (or the ControlError they raised) through a Future.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from schedscope.engine.control_errors import ControlError
from schedscope.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from schedscope.engine.control import ControlledEngine

log = logging.getLogger("schedscope.engine")
T = TypeVar("T")


@dataclass
class GenerateInput:
    rid: str
    input_ids: list[int]
    params: SamplingParams
    traceparent: str | None = None
    tracestate: str | None = None
    stream: bool = False


@dataclass
class TokenUpdate:
    """Progress of one request, cumulative (what SGLang's stream frames carry)."""

    rid: str
    output_ids: list[int]
    prompt_tokens: int
    cached_tokens: int = 0
    finished: bool = False
    finish_reason: dict[str, Any] | None = None
    error: str | None = None
    error_code: int = 400  # HTTP status for ``error``: 400 bad request, 503 engine stopped


Sink = Callable[[TokenUpdate], None]


@dataclass
class _Submit:
    inp: GenerateInput
    sink: Sink


@dataclass
class _Abort:
    rid: str


@dataclass
class _Call:
    fn: Callable[[Any], Any]
    future: Future = field(default_factory=Future)


class EngineRunner:
    """Runs a ControlledEngine on its own thread; every public method is thread-safe."""

    def __init__(self, engine: ControlledEngine, *, name: str = "schedscope-scheduler") -> None:
        self.engine = engine
        self.inbox = engine.inbox
        self.tokenizer = engine.tokenizer
        self.model_name = engine.model_name
        self.context_length = engine.context_length
        self.started_wall = time.time()
        self.failure: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> EngineRunner:
        self._thread.start()
        return self

    @property
    def iterations(self) -> int:
        """Loop turns of the scheduler thread (an idle engine makes about one per second)."""
        return self.engine.iterations

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self._thread.is_alive():
            return
        self._stop.set()
        self.inbox.wake()
        self._thread.join(timeout_s)

    def __enter__(self) -> EngineRunner:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- doorway --------------------------------------------------------------------------------

    def submit(self, inp: GenerateInput, sink: Sink) -> None:
        self.inbox.put(_Submit(inp, sink))

    def abort(self, rid: str) -> None:
        self.inbox.put(_Abort(rid))

    def call_future(self, fn: Callable[[ControlledEngine], T]) -> Future[T]:
        if not self.alive:
            fut: Future[T] = Future()
            fut.set_exception(ControlError(f"engine is not running ({self.failure or 'stopped'})"))
            return fut
        item = _Call(fn)
        self.inbox.put(item)
        return item.future

    def call_sync(self, fn: Callable[[ControlledEngine], T], timeout_s: float = 30.0) -> T:
        return self.call_future(fn).result(timeout_s)

    async def call(self, fn: Callable[[ControlledEngine], T]) -> T:
        return await asyncio.wrap_future(self.call_future(fn))

    def check_prompt(self, input_ids: list[int], params: SamplingParams) -> None:
        self.engine.check_prompt(input_ids, params)

    def model_info(self) -> dict[str, Any]:
        return self.engine.model_info()

    def server_info(self) -> dict[str, Any]:
        return self.engine.server_info()

    # -- the scheduler thread -------------------------------------------------------------------

    def _main(self) -> None:
        eng = self.engine
        try:
            eng.serve(self._stop, self._handle)
        except Exception as exc:  # the thread must report why it died, not vanish
            self.failure = f"{type(exc).__name__}: {exc}"
            log.exception("scheduler thread crashed")
        finally:
            self._stop.set()
            why = f"engine stopped: {self.failure}" if self.failure else "engine stopped"
            for item in self.inbox.drain():  # nobody is left to serve these: say so
                if isinstance(item, _Call):
                    item.future.set_exception(ControlError(why))
                elif isinstance(item, _Submit):
                    item.sink(
                        TokenUpdate(item.inp.rid, [], len(item.inp.input_ids), finished=True,
                                    error=why, error_code=503)
                    )  # fmt: skip
            eng.shutdown(self.failure)

    def _handle(self, item: object) -> None:
        if isinstance(item, _Submit):
            self.engine.add_request(item.inp, item.sink)
        elif isinstance(item, _Abort):
            self.engine.abort_request(item.rid)
        elif isinstance(item, _Call):
            if not item.future.set_running_or_notify_cancel():
                return
            try:
                item.future.set_result(item.fn(self.engine))
            except Exception as exc:  # handed to the caller, who maps it to a response
                item.future.set_exception(exc)
