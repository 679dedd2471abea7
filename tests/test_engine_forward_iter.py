"""forward_iter (seed 002): every BatchDone carries the forward_iter of its own launch."""

from __future__ import annotations

import time

import pytest

from schedscope.engine.batch import ScheduleBatch
from schedscope.engine.emitter import Emitter
from schedscope.engine.engine import engine_info
from schedscope.engine.sampling import SamplingParams
from schedscope.telemetry.ingest import Ingest
from schedscope.telemetry.schema import (
    MODE_DECODE,
    MODE_PREFILL,
    BatchDone,
    BatchLaunched,
    EngineHello,
)

from .engine_helpers import RecordingEmitter, prompts, tiny_engine


def run_waves(engine, waves: int = 3) -> None:
    """Requests arrive in waves while others decode, with one long (chunked) prompt."""
    sp = SamplingParams(max_new_tokens=6, ignore_eos=True)
    engine.submit("x" * 150, sp)  # chunked: chunked_prefill_size is 64 below
    for w in range(waves):
        for p in prompts(3, 20, shared=f"wave {w} "):
            engine.submit(p, sp)
        for _ in range(4):
            engine.step()
    engine.run_until_idle()


def check_batches(events: list) -> None:
    launched = [e for e in events if isinstance(e, BatchLaunched)]
    done = [e for e in events if isinstance(e, BatchDone)]
    iters = [e.forward_iter for e in launched]
    assert iters == list(range(1, len(iters) + 1)), "launch ids consecutive from 1"
    assert sorted(e.forward_iter for e in done) == iters, "one BatchDone per launch, no dupes"
    by_iter = {e.forward_iter: e for e in launched}
    for d in done:
        own = by_iter[d.forward_iter]
        assert d.mode == own.mode
        if d.mode == MODE_PREFILL:
            assert d.prefill is not None and d.prefill.new_tokens == own.num_tokens
        else:
            assert d.decode is not None and d.decode.running_reqs == len(own.rids)
    assert done[0].mode == MODE_PREFILL and done[0].forward_iter == 1, "prefill not off by one"
    assert {d.mode for d in done} == {MODE_PREFILL, MODE_DECODE}
    assert any(d.prefill and d.prefill.chunked_reqs for d in done)


@pytest.mark.parametrize("overlap", [False, True], ids=["normal", "overlap"])
def test_batch_done_carries_its_own_forward_iter(overlap: bool) -> None:
    em = RecordingEmitter()
    engine = tiny_engine(em, enable_overlap=overlap, chunked_prefill_size=64)
    run_waves(engine)
    check_batches(em.events)
    # With overlap, batch N's results really are processed after N+1 was launched.
    pos = {
        (type(e).__name__, e.forward_iter): i
        for i, e in enumerate(em.events)
        if isinstance(e, BatchLaunched | BatchDone)
    }
    late = [
        it
        for (kind, it), i in pos.items()
        if kind == "BatchDone" and pos.get(("BatchLaunched", it + 1), 1 << 60) < i
    ]
    assert bool(late) is overlap


def test_copy_keeps_forward_iter() -> None:
    batch = ScheduleBatch.prefill()
    batch.forward_iter = 7
    assert batch.copy().forward_iter == 7


def test_forward_iter_over_a_real_socket(ipc_endpoint: str) -> None:
    engine_cfg = tiny_engine().config.replace(enable_overlap=True, chunked_prefill_size=64)
    with Ingest(ipc_endpoint) as ingest:
        emitter = Emitter(engine_info(engine_cfg), ipc_endpoint, flush_interval_s=0.0)
        engine = tiny_engine(emitter, enable_overlap=True, chunked_prefill_size=64)
        time.sleep(0.2)  # let the PUSH socket connect (IMMEDIATE drops before that)
        run_waves(engine, waves=2)
        emitter.flush()
        sent = emitter.sent_messages
        events, frames = [], 0
        deadline = time.monotonic() + 10
        while frames < sent and time.monotonic() < deadline:
            got = ingest.get(timeout=0.5)
            if got is not None:
                frames += 1
                events.extend(got.frame.events)
        emitter.close()
    assert emitter.dropped_messages == 0 and frames == sent
    hello = next(e for e in events if isinstance(e, EngineHello))
    assert hello.info.model == "tiny" and hello.info.engine_type == "unified"
    assert hello.info.max_total_tokens == 2048 and hello.info.max_running_requests == 16
    check_batches(events)
