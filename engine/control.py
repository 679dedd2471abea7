"""The engine's control plane: pause/continue, fully-idle guards, cache flush, weight updates,
KV offload, idle handling, profiler and internal state, around the core Scheduler.

Every method here runs on the scheduler thread (the runner executes control commands between
steps), so none of it races a batch. Each seed semantic lives in one function:
- seed 000: ``pause_generation`` itself emits Paused, zeroes gen_throughput and flushes KV
  events and the emitter, because the paused loop never reaches the idle hook;
- seed 004: ``is_fully_idle`` (no batch, no waiting request, no offload in flight, nothing
  staged) guards ``flush_cache``, weight updates outside a pause and ``release_memory``;
- seed 003: entering idle runs the memory check (``IdleTracker``); the idle loop sleeps on the
  inbox socket (``EngineRunner``).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch

from schedscope import __version__
from schedscope.engine.config import EngineConfig, get_model_config
from schedscope.engine.control_errors import (
    AlreadyPausedError,
    ControlError,
    NotIdleError,
    NotPausedError,
)
from schedscope.engine.emitter import AnyEmitter, Emitter, NullEmitter
from schedscope.engine.idle import IdleTracker, PoolSnapshot, check_memory
from schedscope.engine.inbox import Inbox
from schedscope.engine.internal_state import SAFE_KNOBS, parse_knobs
from schedscope.engine.offload import KvOffloader, evicted_pages
from schedscope.engine.profiler import EngineProfiler, ProfileResult
from schedscope.engine.radix_cache import Node
from schedscope.engine.request import FINISH_ABORT, FINISH_LENGTH, Req, ReqStatus, RequestOutput
from schedscope.engine.runner import GenerateInput, Sink, TokenUpdate
from schedscope.engine.sampling import SamplingParams
from schedscope.engine.scheduler import Scheduler
from schedscope.engine.weights import WeightSource, apply_tensors, check_tensors, describe
from schedscope.engine.weights import load_tensors as load_weight_tensors
from schedscope.telemetry.schema import (
    PAUSE_ABORT,
    PAUSE_MODES,
    PAUSE_RETRACT,
    AllBlocksCleared,
    CacheFlush,
    IdleEnd,
    KvBlockEventT,
    KvEvents,
    MemoryCheck,
    Paused,
    ReqRetracted,
    Resumed,
    WeightsUpdateBegin,
    WeightsUpdateEnd,
)

log = logging.getLogger("schedscope.engine")
_now_ns: Callable[[], int] = time.monotonic_ns

HEARTBEAT_POLL_S = 1.0  # idle wake-up: heartbeats only (work wakes the loop at once)
CUDA_OFFLOAD_POLL_S = 0.002  # a CUDA event cannot wake the loop: poll it while in flight


class ControlledEngine:
    """A Scheduler plus everything an operator does to it. Scheduler-thread only, except the
    attributes the runner reads at construction (tokenizer, model_name, ...)."""

    def __init__(
        self,
        scheduler: Scheduler,
        *,
        inbox: Inbox | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.cfg: EngineConfig = scheduler.cfg
        self.emitter: AnyEmitter = scheduler.emitter
        self.inbox = inbox if inbox is not None else Inbox()  # (an empty Inbox is falsy)
        self.tokenizer = scheduler.tokenizer
        self.model_name = scheduler.model_cfg.name
        self.context_length = self.cfg.context_length
        self.device = scheduler.runner.device
        self.paused: str | None = None
        self.profiler = EngineProfiler(self.emitter)
        self.offloader: KvOffloader | None = None
        self._announced_connects = 0  # emitter connects already answered with a KV re-sync
        if self.cfg.enable_kv_offload and scheduler.tree is not None:
            self.offloader = KvOffloader(
                self._read_slots,
                page_size=self.cfg.page_size,
                capacity_pages=self.cfg.kv_offload_pages,
                device=self.device,
                notify=self.inbox.wake,
            )
            scheduler.tree.on_evict = self._on_evict
        self.idle = IdleTracker(self.emitter, self.pool_snapshot, self._flush_kv_events)
        self._sinks: dict[str, Sink] = {}
        self._abort_msgs: dict[str, str] = {}
        self._arrivals = 0
        self.iterations = 0  # loop turns of serve(): an idle engine makes ~1 per second
        self.step_failures = 0  # steps / inbox items that raised: their requests were aborted
        self.weight_version = 0

    @classmethod
    def create(
        cls,
        cfg: EngineConfig,
        *,
        endpoint: str | None = None,
        telemetry: bool = True,
        emitter: AnyEmitter | None = None,
    ) -> ControlledEngine:
        """Build the model, the scheduler and the emitter from a config."""
        model_cfg = get_model_config(cfg.model, cfg.model_path)
        if emitter is None:
            if telemetry:
                from schedscope.engine.engine import engine_info  # engine.py imports this module

                info = engine_info(cfg, model_cfg)
                emitter = Emitter(info, endpoint or cfg.telemetry_endpoint, engine_id=cfg.engine_id)
            else:
                emitter = NullEmitter()
        return cls(Scheduler(cfg, model_cfg, emitter))

    # -- requests -------------------------------------------------------------------------------

    def check_prompt(self, input_ids: list[int], params: SamplingParams) -> None:
        """Refuse what can never run (thread-safe: reads only immutable config)."""
        if not input_ids:
            raise ControlError("empty prompt")
        vocab = self.scheduler.model_cfg.vocab_size
        bad = [t for t in input_ids if not 0 <= t < vocab]
        if bad:
            raise ControlError(f"input_ids out of the vocabulary [0, {vocab}): {bad[:3]}")
        total = len(input_ids) + params.max_new_tokens
        if total > self.context_length:
            raise ControlError(
                f"prompt ({len(input_ids)} tokens) + max_new_tokens ({params.max_new_tokens}) = "
                f"{total} exceeds the context length {self.context_length}"
            )
        if total > self.cfg.max_total_tokens:
            raise ControlError(
                f"request needs {total} KV slots; the pool has {self.cfg.max_total_tokens}"
            )

    def add_request(self, inp: GenerateInput, sink: Sink) -> None:
        sched = self.scheduler
        if inp.rid in sched.reqs:
            sink(_error_update(inp, f"duplicate request id {inp.rid!r}"))
            return
        try:
            self.check_prompt(inp.input_ids, inp.params)
        except ControlError as exc:
            sink(_error_update(inp, str(exc)))
            return
        self._sinks[inp.rid] = sink
        params = inp.params
        if params.seed is None:  # reproducible runs: engine seed + arrival order
            params = dataclasses.replace(params, seed=self.cfg.seed * 1_000_003 + self._arrivals)
        self._arrivals += 1
        req = Req(
            rid=inp.rid,
            prompt_ids=list(inp.input_ids),
            sampling=params,
            queued_ns=_now_ns(),
            traceparent=inp.traceparent,
            tracestate=inp.tracestate,
            on_output=self._on_output,
        )
        self.admit(req)

    def admit(self, req: Req) -> None:
        """Every new request comes in here: the idle span closes the moment work arrives."""
        self.idle.update(False)
        self.scheduler.add_request(req)

    def abort_request(self, rid: str, reason: str = "aborted by client") -> None:
        sched = self.scheduler
        req = sched.reqs.get(rid)
        if req is None:
            return
        self._abort_msgs[rid] = reason
        if self.paused is not None and req.status is not ReqStatus.WAITING:
            # Paused: no result will come to honour abort_requested, so finish it now.
            sched.sync_inflight()
            if not req.finished:
                self._finish_now(req, reason)
        else:
            sched.abort(rid, reason)

    def _on_output(self, out: RequestOutput) -> None:
        sink = self._sinks.get(out.rid)
        if sink is None:
            return
        reason = None
        if out.finished:
            self._sinks.pop(out.rid, None)
            msg = self._abort_msgs.pop(out.rid, "aborted")
            reason = _finish_reason(out, msg)
        sink(
            TokenUpdate(
                rid=out.rid,
                output_ids=list(out.output_ids),
                prompt_tokens=out.prompt_tokens,
                cached_tokens=out.cached_tokens,
                finished=out.finished,
                finish_reason=reason,
            )
        )

    # -- the loop -------------------------------------------------------------------------------

    def run_once(self) -> bool:
        """One loop iteration; False when there was nothing to run (the runner then sleeps)."""
        sched = self.scheduler
        self._poll_offload()
        self._resync_kv_if_new_sidecar()
        if self.paused is None and sched.has_work():
            did = sched.step()
            if did:
                self.profiler.on_step()
            return did
        if self.paused is None:
            self.idle.update(self.is_fully_idle())
        self._flush_kv_events()  # KV changes made by commands (a reset...) go out now
        self.emitter.end_step()  # and heartbeats while quiet
        return False

    def sleep_timeout_s(self) -> float:
        if self.offloader is not None and self.offloader.in_flight and self.device.type == "cuda":
            return CUDA_OFFLOAD_POLL_S
        return HEARTBEAT_POLL_S

    def serve(self, stop: threading.Event, handle: Callable[[Any], None]) -> None:
        """The scheduler thread's loop: take the inbox, run a step, else sleep on the inbox.

        ``handle`` executes one inbox item (a request, an abort, a command). Returns when
        ``stop`` is set; exceptions propagate to the thread's owner, which reports them.
        """
        while not stop.is_set():
            self.iterations += 1
            for item in self.inbox.drain():
                try:
                    handle(item)
                except Exception:  # one bad item must not end the loop for everyone
                    self.step_failures += 1
                    log.exception("inbox item %r failed", type(item).__name__)
            if stop.is_set():
                break
            try:
                ran = self.run_once()
            except Exception as exc:
                # NOTE: the loop survives one step's failure: the requests of that step end
                # as aborted with the error as reason, everyone else keeps being served.
                self._fail_step(exc)
                ran = True
            if not ran:
                # NOTE: nothing ran (idle, paused, or blocked): sleep on the inbox socket
                # instead of spinning (seed 003's IdleSleeper). Any submit, abort or command
                # wakes it at once; the timeout only paces heartbeats (and CUDA offload polls).
                self.inbox.wait(self.sleep_timeout_s())

    def run_until_idle(self, max_steps: int = 10_000) -> None:
        """In-process helper (tests, scripts): step until fully idle or paused."""
        for _ in range(max_steps):
            for item in self.inbox.drain():
                raise ControlError(f"run_until_idle used with a live inbox ({item!r})")
            if not self.run_once():
                if self.paused is not None or self.is_fully_idle():
                    return
                time.sleep(0.001)  # an offload still copying
        raise ControlError(f"not idle after {max_steps} steps")

    # -- fully idle (seed 004) ------------------------------------------------------------------

    def busy_reason(self, for_health_check: bool = False) -> str | None:
        """Why the engine is not fully idle, or None when it is."""
        sched = self.scheduler
        if sched.running or sched.chunked_req is not None or sched.inflight is not None:
            n = len(sched.running) + (sched.chunked_req is not None)
            return f"{n} request(s) running"
        if sched.waiting:
            return f"{len(sched.waiting)} request(s) waiting"
        if for_health_check:
            return None
        if self.offloader is not None and self.offloader.in_flight:
            return f"KV offload in flight ({self.offloader.in_flight} page(s) copying to CPU)"
        if len(self.inbox):
            return f"{len(self.inbox)} request(s) staged in the inbox"
        return None

    def is_fully_idle(self, for_health_check: bool = False) -> bool:
        return self.busy_reason(for_health_check) is None

    def _require_idle(self, action: str) -> None:
        reason = self.busy_reason()
        if reason is not None:
            raise NotIdleError(f"cannot {action}: engine is not fully idle ({reason})")

    # -- pause / continue (seed 000) ------------------------------------------------------------

    def pause_generation(self, mode: str = PAUSE_ABORT, reason: str = "") -> None:
        if mode not in PAUSE_MODES:
            raise ControlError(f"unknown pause mode {mode!r}; use one of {', '.join(PAUSE_MODES)}")
        if self.paused is not None:
            raise AlreadyPausedError(
                f"generation is already paused (mode {self.paused}); call continue_generation"
            )
        sched = self.scheduler
        sched.sync_inflight()  # results of a batch already computed still go out
        if self.idle.idle:
            self.idle.idle = False  # a pause span replaces the idle span
            if self.emitter.enabled:
                self.emitter.emit(IdleEnd(ts=_now_ns()))
        self.paused = mode
        sched.paused = mode
        if self.emitter.enabled:
            self.emitter.emit(Paused(ts=_now_ns(), mode=mode, reason=reason))
        if mode == PAUSE_ABORT:
            for req in list(sched.reqs.values()):
                self._finish_now(req, "generation paused (abort)")
        elif mode == PAUSE_RETRACT:
            self._retract_all()
        self._on_pause()

    def _on_pause(self) -> None:
        """Seed 000: what the idle hook would have done, done here because a paused loop
        never reaches it."""
        sched = self.scheduler
        sched.last_gen_throughput = 0.0
        sched.reset_throughput_window()
        self._flush_kv_events()
        self.emitter.flush()

    def continue_generation(self) -> None:
        if self.paused is None:
            raise NotPausedError("generation is not paused")
        self.paused = None
        self.scheduler.paused = None
        self.scheduler.reset_throughput_window()  # the pause is not decode time
        if self.emitter.enabled:
            self.emitter.emit(Resumed(ts=_now_ns()))
            self.emitter.flush()

    def _fail_step(self, exc: Exception) -> None:
        self.step_failures += 1
        log.exception("scheduler step failed; aborting the requests it ran")
        sched = self.scheduler
        victims = list(sched.running)
        if sched.chunked_req is not None:
            victims.append(sched.chunked_req)
        if sched.inflight is not None:
            victims.extend(sched.inflight[0].reqs)
            sched.inflight = None
        reason = f"error: {type(exc).__name__}: {exc}"[:500]
        for req in dict.fromkeys(victims):  # unique, in order
            if not req.finished:
                self._finish_now(req, reason)

    def _finish_now(self, req: Req, reason: str) -> None:
        sched = self.scheduler
        if req.status is ReqStatus.WAITING and req in sched.waiting:
            sched.waiting.remove(req)
        self._abort_msgs[req.rid] = reason
        sched.finish(req, FINISH_ABORT, reason)

    def _retract_all(self) -> None:
        sched = self.scheduler
        for req in list(sched.running):
            sched.retract(req)
        chunked = sched.chunked_req
        if chunked is not None:  # a prompt half prefilled: back to the queue, from scratch
            freed = chunked.kv_len
            sched._release_kv(chunked)
            sched.chunked_req = None
            chunked.status = ReqStatus.WAITING
            chunked.fill_len = len(chunked.prompt_ids) + len(chunked.output_ids)
            chunked.retractions += 1
            sched.waiting.appendleft(chunked)
            if self.emitter.enabled:
                self.emitter.emit(
                    ReqRetracted(_now_ns(), chunked.rid, len(chunked.output_ids), freed)
                )

    # -- cache, memory, weights -----------------------------------------------------------------

    def flush_cache(self) -> None:
        start = _now_ns()
        reason = self.busy_reason()
        if reason is not None:
            if self.emitter.enabled:
                self.emitter.emit(CacheFlush(ts=_now_ns(), ok=False, reason=reason, start_ts=start))
                self.emitter.flush()
            raise NotIdleError(f"cannot flush the cache: engine is not fully idle ({reason})")
        self._reset_caches()
        if self.emitter.enabled:
            self.emitter.emit(CacheFlush(ts=_now_ns(), ok=True, start_ts=start))
            self.emitter.flush()

    def _reset_caches(self) -> None:
        sched = self.scheduler
        events: list[KvBlockEventT] = []
        if sched.tree is not None:
            sched.tree.reset()  # records AllBlocksCleared
        if self.offloader is not None:
            events += self.offloader.clear()
        self._flush_kv_events(events)

    def release_memory(self) -> None:
        """Drop every cache and give cached device memory back (SGLang's
        release_memory_occupation, minus the weights)."""
        self._require_idle("release memory")
        self._reset_caches()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        self.emitter.flush()

    def update_weights(self, source: WeightSource) -> str:
        """Load weights from a safetensors file/folder or a dict of tensors. Only while paused
        or fully idle; everything is validated before anything is copied."""
        what = describe(source)
        if self.emitter.enabled:
            self.emitter.emit(WeightsUpdateBegin(ts=_now_ns(), source=what))
        try:
            if self.paused is None:
                reason = self.busy_reason()
                if reason is not None:
                    raise NotIdleError(
                        f"cannot update weights: engine is neither paused nor fully idle "
                        f"({reason}); pause_generation first"
                    )
            self.scheduler.sync_inflight()
            model = self.scheduler.runner.model
            tensors = load_weight_tensors(source)
            check_tensors(model, tensors)
            n = apply_tensors(model, tensors)
        except ControlError as exc:
            self._weights_end(False, str(exc))
            raise
        self.weight_version += 1
        msg = f"updated {n} tensors from {what} (weight version {self.weight_version})"
        # Cached KV was computed with the old weights: drop it when nothing holds it.
        if self.is_fully_idle():
            self._reset_caches()
            msg += "; KV cache flushed"
        else:
            msg += "; KV cache kept (requests hold it)"
        self._weights_end(True, msg)
        return msg

    def _weights_end(self, ok: bool, message: str) -> None:
        if self.emitter.enabled:
            self.emitter.emit(WeightsUpdateEnd(ts=_now_ns(), ok=ok, message=message))
            self.emitter.flush()

    # -- KV offload -----------------------------------------------------------------------------

    def _read_slots(self, slots: torch.Tensor) -> torch.Tensor:
        idx = slots.to(self.device)
        kv = self.scheduler.pool.kv_caches
        return torch.stack([torch.stack((k[idx], v[idx])) for k, v in kv])

    def _on_evict(self, node: Node) -> None:
        """Radix-cache hook, called before an evicted node's slots go back to the pool."""
        assert self.offloader is not None
        self.offloader.offload(evicted_pages(node, self.cfg.page_size))

    def _poll_offload(self) -> None:
        if self.offloader is None or not self.offloader.in_flight:
            return
        events = self.offloader.poll()
        if events and self.emitter.enabled:
            self.emitter.emit(KvEvents(_now_ns(), self.scheduler.forward_ct or None, events))

    def _resync_kv_if_new_sidecar(self) -> None:
        """KV re-sync after a sidecar (re)start: the new sidecar's relay and its consumers know
        nothing of the cache, and no replay buffer survived. So when the emitter connects
        again, announce the whole cache: AllBlocksCleared, then every block of both tiers."""
        connects = getattr(self.emitter, "connects", 0)
        if connects <= self._announced_connects:
            return
        first = self._announced_connects == 0
        self._announced_connects = connects
        tree = self.scheduler.tree
        if tree is None or not self.emitter.enabled:
            return
        snapshot = tree.announce_all()
        if self.offloader is not None:
            snapshot += self.offloader.announce_all()
        if first and not snapshot:
            return  # a sidecar there from the start has nothing to catch up on
        tree.take_events()  # superseded by the snapshot
        events: list[KvBlockEventT] = [AllBlocksCleared(), *snapshot]
        self.emitter.emit(KvEvents(_now_ns(), self.scheduler.forward_ct or None, events))

    def _flush_kv_events(self, extra: list[KvBlockEventT] | None = None) -> None:
        """Emit every pending KV event now (GPU tier, finished offloads, ``extra``)."""
        if not self.emitter.enabled:
            return
        events: list[KvBlockEventT] = []
        if self.scheduler.tree is not None:
            events += self.scheduler.tree.take_events()
        if self.offloader is not None:
            events += self.offloader.poll()
        events += extra or []
        if events:
            self.emitter.emit(KvEvents(_now_ns(), self.scheduler.forward_ct or None, events))

    # -- memory check (seed 003) ----------------------------------------------------------------

    def pool_snapshot(self) -> PoolSnapshot:
        """Slot accounting, each term counted from its own owner (so a lost slot shows)."""
        sched = self.scheduler
        in_use = sum(r.kv_len - r.prefix_len for r in sched.reqs.values() if r.row is not None)
        return PoolSnapshot(
            pool_size=sched.pool.size,
            free_slots=sched.pool.available,
            cached_slots=sched.tree.total_size if sched.tree is not None else 0,
            in_use_slots=in_use,
            req_table_used=sched.req_pool.used,
        )

    def check_memory(self) -> MemoryCheck:
        """On demand; expects an empty request table only when fully idle."""
        return check_memory(self.pool_snapshot(), expect_empty=self.is_fully_idle())

    # -- profiler -------------------------------------------------------------------------------

    def start_profile(
        self,
        output_dir: str | None = None,
        num_steps: int | None = None,
        activities: list[str] | None = None,
    ) -> str:
        return self.profiler.start(output_dir, num_steps, activities)

    def stop_profile(self) -> ProfileResult:
        return self.profiler.stop()

    # -- internal state -------------------------------------------------------------------------

    def get_internal_state(self) -> dict[str, Any]:
        sched = self.scheduler
        snap = self.pool_snapshot()
        state: dict[str, Any] = {knob: getattr(self.cfg, knob) for knob in SAFE_KNOBS}
        state.update(
            forward_ct=sched.forward_ct,
            running_batch_size=len(sched.running),
            waiting_queue_size=len(sched.waiting),
            paused=self.paused,
            is_fully_idle=self.is_fully_idle(),
            busy_reason=self.busy_reason(),
            enable_overlap=self.cfg.enable_overlap,
            page_size=self.cfg.page_size,
            max_total_num_tokens=sched.pool.size,
            last_gen_throughput=sched.last_gen_throughput,
            token_usage=sched.token_usage(),
            new_token_ratio=sched.new_token_ratio,
            free_slots=snap.free_slots,
            cached_slots=snap.cached_slots,
            in_use_slots=snap.in_use_slots,
            offload_in_flight=self.offloader.in_flight if self.offloader else 0,
            cpu_tier_pages=len(self.offloader.tier) if self.offloader else 0,
            offloaded_pages_total=self.offloader.offloaded_pages if self.offloader else 0,
            memory_leaks_found=self.idle.leaks_found,
            profile_in_progress=self.profiler.in_progress,
            weight_version=self.weight_version,
        )
        return state

    def set_internal_state(self, changes: Mapping[str, Any]) -> dict[str, Any]:
        """Change safe knobs; every key is checked before any is applied."""
        rows = self.scheduler.req_pool.num_rows - 1  # one row is the chunked prefill's
        for key, value in parse_knobs(changes, max_running_rows=rows).items():
            setattr(self.cfg, key, value)
        return self.get_internal_state()

    # -- info -----------------------------------------------------------------------------------

    def model_info(self) -> dict[str, Any]:
        m = self.scheduler.model_cfg
        return {
            "model_path": self.cfg.model_path or m.name,
            "tokenizer_path": "byte-level",
            "is_generation": True,
            "preferred_sampling_params": None,
            "weight_version": str(self.weight_version),
            "has_image_understanding": False,
            "has_audio_understanding": False,
            "model_type": "llama",
            "architectures": ["LlamaForCausalLM"],
            "vocab_size": m.vocab_size,
            "num_hidden_layers": m.num_hidden_layers,
            "hidden_size": m.hidden_size,
        }

    def server_info(self) -> dict[str, Any]:
        info: dict[str, Any] = dict(self.cfg.summary())
        info.update(
            served_model_name=self.model_name,
            model_path=self.cfg.model_path or self.model_name,
            device=str(self.device),
            context_length=self.context_length,
            max_total_num_tokens=self.scheduler.pool.size,
            engine="schedscope-reference",
            schedscope_version=__version__,
            telemetry=self.emitter.enabled,
            engine_id=getattr(self.emitter, "engine_id", ""),
        )
        return info

    def fail_clients(self, message: str) -> None:
        """Tell every request still waiting on a sink that the engine is gone."""
        for rid, sink in list(self._sinks.items()):
            req = self.scheduler.reqs.get(rid)
            sink(
                TokenUpdate(
                    rid=rid,
                    output_ids=list(req.output_ids) if req else [],
                    prompt_tokens=len(req.prompt_ids) if req else 0,
                    finished=True,
                    finish_reason={"type": "abort", "message": message},
                    error=message,
                    error_code=503,
                )
            )
        self._sinks.clear()

    def close(self) -> None:
        """Release what the control plane owns (not the emitter: its owner closes it)."""
        if self.profiler.in_progress:
            self.profiler.stop()
        if self.offloader is not None:
            self.offloader.close()
        self.inbox.close()

    def shutdown(self, failure: str | None = None) -> None:
        """Stop on the scheduler thread: clients get an error, telemetry says goodbye."""
        self.fail_clients(f"engine stopped: {failure}" if failure else "engine stopped")
        self.close()
        self.emitter.close("error" if failure else "shutdown")


def _finish_reason(out: RequestOutput, abort_message: str) -> dict[str, Any]:
    """SGLang's meta_info.finish_reason objects."""
    if out.finish_reason == FINISH_ABORT:
        return {"type": "abort", "message": abort_message}
    if out.finish_reason == FINISH_LENGTH:
        return {"type": "length", "length": out.completion_tokens}
    return {"type": "stop", "matched": out.output_ids[-1] if out.output_ids else None}


def _error_update(inp: GenerateInput, message: str) -> TokenUpdate:
    return TokenUpdate(
        rid=inp.rid,
        output_ids=[],
        prompt_tokens=len(inp.input_ids),
        finished=True,
        finish_reason={"type": "abort", "message": message},
        error=message,
    )
