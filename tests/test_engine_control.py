"""The engine's control plane, in process: pause modes, fully-idle guards, memory check,
weights, internal state and profiler — each checked against the events the engine emits."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from schedscope.engine.config import EngineConfig
from schedscope.engine.control import ControlledEngine
from schedscope.engine.control_errors import (
    AlreadyPausedError,
    ControlError,
    NotIdleError,
    NotPausedError,
    ProfileInProgressError,
    StateKeyError,
    WeightsMismatchError,
)
from schedscope.engine.runner import GenerateInput, TokenUpdate
from schedscope.engine.sampling import SamplingParams
from schedscope.telemetry.schema import (
    MEDIUM_CPU,
    AllBlocksCleared,
    BlockStored,
    CacheFlush,
    IdleBegin,
    KvEvents,
    MemoryCheck,
    Paused,
    ProfileBegin,
    ProfileEnd,
    ReqAborted,
    ReqRetracted,
    Resumed,
    WeightsUpdateBegin,
    WeightsUpdateEnd,
)

from .engine_helpers import RecordingEmitter


def make_engine(**cfg) -> tuple[ControlledEngine, RecordingEmitter]:
    em = RecordingEmitter()
    base = dict(max_total_tokens=512, max_running_requests=8, decode_log_interval=2)
    base.update(cfg)
    return ControlledEngine.create(EngineConfig(**base), emitter=em), em


class Client:
    """Collects a request's updates the way the HTTP layer would."""

    def __init__(self) -> None:
        self.updates: dict[str, list[TokenUpdate]] = {}

    def submit(self, eng: ControlledEngine, rid: str, prompt: bytes, n: int = 12) -> None:
        params = SamplingParams(max_new_tokens=n, ignore_eos=True)
        eng.add_request(
            GenerateInput(rid, list(prompt), params),
            lambda u: self.updates.setdefault(u.rid, []).append(u),
        )

    def final(self, rid: str) -> TokenUpdate:
        last = self.updates[rid][-1]
        assert last.finished
        return last


def step(eng: ControlledEngine, n: int) -> None:
    for _ in range(n):
        eng.run_once()


def reference_tokens(prompts: dict[str, bytes], n: int = 12) -> dict[str, list[int]]:
    eng, _ = make_engine()
    client = Client()
    for rid, p in prompts.items():
        client.submit(eng, rid, p, n)
    eng.run_until_idle()
    return {rid: client.final(rid).output_ids for rid in prompts}


PROMPTS = {"a": b"the quick brown fox", "b": b"jumps over the lazy dog"}


@pytest.mark.parametrize("overlap", [False, True], ids=["normal", "overlap"])
def test_pause_abort_ends_every_request_and_does_the_idle_hook_itself(overlap):
    eng, em = make_engine(enable_overlap=overlap)
    client = Client()
    for rid, p in PROMPTS.items():
        client.submit(eng, rid, p)
    step(eng, 6)  # prefill + decodes: both running, gen_throughput measured
    assert len(eng.scheduler.running) == 2
    assert eng.scheduler.last_gen_throughput > 0
    flushes = em.flushes
    n_events = len(em.events)
    eng.pause_generation("abort")
    new = em.events[n_events:]
    # (overlap: the batch in flight is finished first, its BatchDone comes before Paused)
    at = next(i for i, e in enumerate(new) if isinstance(e, Paused))
    assert new[at].mode == "abort"
    assert sorted(e.rid for e in new[at:] if isinstance(e, ReqAborted)) == ["a", "b"]
    assert any(isinstance(e, KvEvents) for e in new)  # pending KV events went out
    assert em.flushes > flushes  # ... and the emitter itself was flushed
    assert eng.scheduler.last_gen_throughput == 0.0
    for rid in PROMPTS:
        assert client.final(rid).finish_reason["type"] == "abort"
    assert eng.check_memory().ok and eng.is_fully_idle()
    with pytest.raises(AlreadyPausedError, match="already paused"):
        eng.pause_generation("retract")
    eng.continue_generation()
    assert isinstance(em.events[-1], Resumed)
    with pytest.raises(NotPausedError, match="not paused"):
        eng.continue_generation()
    client.submit(eng, "c", b"after resume")
    eng.run_until_idle()
    assert client.final("c").finish_reason == {"type": "length", "length": 12}


@pytest.mark.parametrize("overlap", [False, True], ids=["normal", "overlap"])
def test_pause_retract_frees_kv_and_requests_finish_after_resume(overlap):
    want = reference_tokens(PROMPTS)
    eng, em = make_engine(enable_overlap=overlap)
    client = Client()
    for rid, p in PROMPTS.items():
        client.submit(eng, rid, p)
    step(eng, 5)
    eng.pause_generation("retract", reason="weights")
    assert sorted(e.rid for e in em.of(ReqRetracted)) == ["a", "b"]
    assert em.of(Paused)[0].reason == "weights"
    snap = eng.pool_snapshot()
    assert snap.in_use_slots == 0 and snap.req_table_used == 0  # KV freed
    assert len(eng.scheduler.waiting) == 2 and not eng.scheduler.running
    before = len(em.events)
    step(eng, 5)  # paused: nothing runs, no idle span either
    assert all(not isinstance(e, (IdleBegin, MemoryCheck)) for e in em.events[before:])
    assert eng.busy_reason() == "2 request(s) waiting"
    eng.continue_generation()
    eng.run_until_idle()
    for rid in PROMPTS:  # same greedy tokens as a run that was never interrupted
        assert client.final(rid).output_ids == want[rid]
        assert client.final(rid).finish_reason["type"] == "length"


def test_pause_in_place_keeps_everything_then_resumes():
    want = reference_tokens(PROMPTS)
    eng, em = make_engine(enable_overlap=True)
    client = Client()
    for rid, p in PROMPTS.items():
        client.submit(eng, rid, p)
    step(eng, 5)
    eng.pause_generation("in_place")
    snap = eng.pool_snapshot()
    progress = {rid: len(client.updates[rid]) for rid in PROMPTS}
    step(eng, 5)
    assert eng.pool_snapshot() == snap  # nothing scheduled, nothing freed
    assert {rid: len(client.updates[rid]) for rid in PROMPTS} == progress
    assert not em.of(ReqAborted) and not em.of(ReqRetracted)
    with pytest.raises(NotIdleError, match="2 request"):
        eng.flush_cache()
    eng.continue_generation()
    eng.run_until_idle()
    for rid in PROMPTS:
        assert client.final(rid).output_ids == want[rid]


def test_unknown_pause_mode_is_refused():
    eng, _ = make_engine()
    with pytest.raises(ControlError, match="unknown pause mode"):
        eng.pause_generation("sideways")
    assert eng.paused is None


def test_flush_cache_refused_while_running_or_offloading_accepted_when_idle():
    # A pool of 96 slots: the third prompt evicts the first ones' cached pages, which start
    # copying to the CPU tier (held in flight here).
    eng, em = make_engine(max_total_tokens=96, max_running_requests=2)
    client = Client()
    client.submit(eng, "a", b"a" * 40, 4)
    step(eng, 2)
    with pytest.raises(NotIdleError, match="running"):
        eng.flush_cache()
    refused = em.of(CacheFlush)[-1]
    assert not refused.ok and "running" in refused.reason
    eng.run_until_idle()
    client.submit(eng, "b", b"b" * 40, 4)
    eng.run_until_idle()
    assert eng.offloader is not None
    eng.offloader.hold()
    client.submit(eng, "c", b"c" * 60, 4)
    eng.run_once()
    assert eng.offloader.in_flight > 0
    step(eng, 10)
    assert client.final("c").finished
    assert not eng.is_fully_idle() and eng.is_fully_idle(for_health_check=True)
    with pytest.raises(NotIdleError, match="offload in flight"):
        eng.flush_cache()
    assert not any(isinstance(e, IdleBegin) for e in em.events[-3:])
    eng.offloader.release()
    eng.run_until_idle()
    cpu = [k for k in em.kv_events() if isinstance(k, BlockStored) and k.medium == MEDIUM_CPU]
    assert cpu and eng.offloader.tier
    eng.flush_cache()
    assert em.of(CacheFlush)[-1].ok
    assert isinstance(em.kv_events()[-2], AllBlocksCleared) or any(
        isinstance(k, AllBlocksCleared) for k in em.kv_events()
    )
    assert not eng.offloader.tier and eng.scheduler.tree.total_size == 0
    assert eng.pool_snapshot().free_slots == 96


def test_idle_span_opens_only_when_fully_idle_and_checks_memory():
    eng, em = make_engine()
    client = Client()
    client.submit(eng, "a", b"hello", 4)
    eng.run_until_idle()
    eng.run_once()  # still idle: no second check, no second span
    checks = em.of(MemoryCheck)
    assert len(checks) == 1 and checks[0].ok and checks[0].cached_slots > 0
    assert isinstance(em.events[-1], IdleBegin)
    client.submit(eng, "b", b"again", 4)
    # IdleEnd at arrival (before the request's own event), not at the next step.
    assert [type(e).__name__ for e in em.events[-2:]] == ["IdleEnd", "ReqQueued"]
    eng.run_until_idle()
    eng.run_once()
    assert all(c.ok for c in em.of(MemoryCheck)) and eng.idle.leaks_found == 0


def test_memory_check_catches_an_injected_leak():
    eng, em = make_engine()
    client = Client()
    client.submit(eng, "a", b"hello", 4)
    step(eng, 2)
    eng.scheduler.pool.alloc(3)  # slots nobody owns: the leak
    eng.run_until_idle()  # entering idle runs the check
    check = em.of(MemoryCheck)[-1]
    assert not check.ok and eng.idle.leaks_found == 1
    assert check.free_slots + check.cached_slots + check.in_use_slots == check.pool_size - 3
    assert "3 missing" in check.detail


def test_update_weights_refused_while_busy_allowed_paused_or_idle(tmp_path):
    eng, em = make_engine()
    client = Client()
    client.submit(eng, "a", b"hello", 8)
    step(eng, 2)
    model = eng.scheduler.runner.model
    name, param = next(iter(model.named_parameters()))
    path = tmp_path / "w.safetensors"
    save_file({name: torch.full_like(param, 0.01).contiguous()}, str(path))
    with pytest.raises(NotIdleError, match="neither paused nor fully idle"):
        eng.update_weights(str(path))
    assert not em.of(WeightsUpdateEnd)[-1].ok
    eng.pause_generation("in_place")
    msg = eng.update_weights(str(path))
    assert "updated 1 tensors" in msg and torch.all(param == 0.01)
    assert em.of(WeightsUpdateEnd)[-1].ok and em.of(WeightsUpdateBegin)[-1].source == str(path)
    with pytest.raises(WeightsMismatchError, match="shape mismatch"):
        eng.update_weights({name: torch.zeros(3)})
    with pytest.raises(WeightsMismatchError, match="does not have"):
        eng.update_weights({"lm_head.nope": torch.zeros(3)})
    eng.continue_generation()
    eng.run_until_idle()
    assert client.final("a").finished
    eng.update_weights({name: torch.full_like(param, 0.02)})  # fully idle: allowed
    assert torch.all(param == 0.02)


def test_internal_state_knobs():
    eng, _ = make_engine()
    state = eng.get_internal_state()
    assert state["max_running_requests"] == 8 and state["is_fully_idle"]
    new = eng.set_internal_state({"max_running_requests": 2, "max_prefill_tokens": 64})
    assert new["max_running_requests"] == 2 and eng.cfg.max_prefill_tokens == 64
    with pytest.raises(StateKeyError, match="cannot be set"):
        eng.set_internal_state({"page_size": 4})
    with pytest.raises(StateKeyError, match="<= 8"):
        eng.set_internal_state({"max_running_requests": 100})
    with pytest.raises(StateKeyError, match="integer"):
        eng.set_internal_state({"max_running_requests": "3", "max_prefill_tokens": 1})
    assert eng.cfg.max_prefill_tokens == 64  # nothing applied from a refused change
    # The knob is live: with 2 slots only 2 of 3 requests run at once.
    client = Client()
    for rid in "xyz":
        client.submit(eng, rid, rid.encode() * 5, 6)
    step(eng, 2)
    assert len(eng.scheduler.running) == 2


def test_profiler_runs_for_n_steps(tmp_path):
    eng, em = make_engine()
    client = Client()
    eng.start_profile(str(tmp_path), num_steps=3, activities=["CPU"])
    with pytest.raises(ProfileInProgressError):
        eng.start_profile(str(tmp_path))
    client.submit(eng, "a", b"profile me", 8)
    eng.run_until_idle()
    assert not eng.profiler.in_progress
    assert eng.profiler.last_result.steps == 3
    assert em.of(ProfileBegin) and em.of(ProfileEnd)[0].ok
    assert list(tmp_path.glob("*.trace.json"))


def test_engine_facade_threaded_pause_and_quiet_idle_loop():
    """The in-process Engine runs the same control plane on its own thread."""
    import time

    from schedscope.engine.engine import Engine

    em = RecordingEmitter()
    engine = Engine(EngineConfig(max_total_tokens=512), emitter=em).start()
    try:
        long = SamplingParams(max_new_tokens=150, ignore_eos=True)
        rid = engine.submit("a long one", long)
        deadline = time.monotonic() + 20
        while not engine.get_internal_state()["running_batch_size"]:
            assert time.monotonic() < deadline
            time.sleep(0.005)
        engine.pause_generation("retract")
        state = engine.get_internal_state()
        assert state["paused"] == "retract" and state["waiting_queue_size"] == 1
        with pytest.raises(AlreadyPausedError):
            engine.pause_generation("abort")
        with pytest.raises(NotIdleError):
            engine.flush_cache()
        engine.continue_generation()
        while engine.pop_result(rid) is None:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        while not engine.control.idle.idle:
            time.sleep(0.005)
        turns = engine.iterations
        time.sleep(0.5)
        assert engine.iterations - turns <= 3  # asleep on the inbox socket, not spinning
        engine.flush_cache()
        assert em.of(CacheFlush)[-1].ok and em.of(IdleBegin)
    finally:
        engine.close()


def test_release_memory_needs_fully_idle():
    eng, _ = make_engine()
    client = Client()
    client.submit(eng, "a", b"hello memory", 6)
    step(eng, 2)
    with pytest.raises(NotIdleError, match="release memory"):
        eng.release_memory()
    eng.run_until_idle()
    assert eng.scheduler.tree.total_size > 0
    eng.release_memory()
    assert eng.scheduler.tree.total_size == 0 and eng.pool_snapshot().free_slots == 512


def test_pause_reaches_a_real_socket_at_once(ipc_endpoint):
    """Seed 000 over the wire: with a flush interval far longer than the test, the Paused
    event and the pending KV events still arrive — pause itself flushes the emitter."""
    import zmq

    from schedscope.engine.emitter import Emitter
    from schedscope.engine.engine import engine_info
    from schedscope.telemetry.schema import decode_envelope

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(ipc_endpoint)
    cfg = EngineConfig(max_total_tokens=512)
    emitter = Emitter(engine_info(cfg), ipc_endpoint, flush_interval_s=3600, context=ctx)
    eng = ControlledEngine.create(cfg, emitter=emitter)
    try:

        def received() -> list:
            events = []
            while pull.poll(2000 if not events else 50):
                events += decode_envelope(pull.recv()).events
            return events

        client = Client()
        client.submit(eng, "a", b"over the wire", 40)
        step(eng, 6)
        eng.pause_generation("in_place")
        got = received()
        names = [type(e).__name__ for e in got]
        assert "Paused" in names and "KvEvents" in names and "BatchDone" in names
        eng.continue_generation()
        assert [type(e).__name__ for e in received()] == ["Resumed"]
    finally:
        emitter.close()
        pull.close(0)
        ctx.term()


def test_pause_retract_mid_chunked_prefill_and_abort_while_paused():
    long_prompt = bytes(range(32, 127)) * 3  # 285 tokens, prefilled in chunks of 64
    want = reference_tokens({"long": long_prompt, "short": b"short one"}, n=6)
    eng, em = make_engine(chunked_prefill_size=64, max_prefill_tokens=64)
    client = Client()
    client.submit(eng, "long", long_prompt, 6)
    client.submit(eng, "short", b"short one", 6)
    client.submit(eng, "gone", b"to be aborted", 6)
    eng.run_once()
    assert eng.scheduler.chunked_req is not None  # half prefilled
    eng.pause_generation("retract")
    assert eng.scheduler.chunked_req is None
    assert "long" in {e.rid for e in em.of(ReqRetracted)}
    assert eng.pool_snapshot().in_use_slots == 0
    eng.abort_request("gone")  # a client that leaves while the engine is paused
    assert client.final("gone").finish_reason["type"] == "abort"
    eng.continue_generation()
    eng.run_until_idle()
    for rid in ("long", "short"):
        assert client.final(rid).output_ids == want[rid]
    assert eng.check_memory().ok


def test_pause_while_idle_closes_the_idle_span_and_opens_none_while_paused():
    eng, em = make_engine()
    eng.run_once()
    assert isinstance(em.events[-1], IdleBegin)
    eng.pause_generation("in_place")
    assert [type(e).__name__ for e in em.events[-2:]] == ["IdleEnd", "Paused"]
    step(eng, 3)
    assert not isinstance(em.events[-1], IdleBegin)
    eng.continue_generation()
    eng.run_once()
    assert isinstance(em.events[-1], IdleBegin)
