"""The in-process API: streaming, abort, the scheduler thread, validation, request events."""

from __future__ import annotations

import threading

import pytest

from schedscope.engine.sampling import SamplingParams
from schedscope.telemetry.schema import (
    BatchDone,
    KvLoad,
    ReqAborted,
    ReqFinished,
    ReqFirstToken,
    ReqQueued,
)

from .engine_helpers import RecordingEmitter, tiny_engine

SP = SamplingParams(max_new_tokens=8, ignore_eos=True)


def test_streaming_callback_delivers_every_token_once() -> None:
    engine = tiny_engine(enable_overlap=True)
    seen: list[int] = []
    finals = []

    def on_output(out) -> None:
        seen.extend(out.new_token_ids)
        if out.finished:
            finals.append(out)

    rid = engine.submit("stream me", SP, on_output=on_output)
    engine.run_until_idle()
    result = engine.pop_result(rid)
    assert seen == result.output_ids and len(seen) == 8
    assert len(finals) == 1 and finals[0].finish_reason == "length"
    assert finals[0].completion_tokens == 8 and finals[0].prompt_tokens == len("stream me")


def test_request_lifecycle_events() -> None:
    em = RecordingEmitter()
    engine = tiny_engine(em, decode_log_interval=4)
    rid = engine.submit("hi there", SP, traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01")
    engine.run_until_idle()
    queued = em.of(ReqQueued)[0]
    assert (queued.rid, queued.prompt_tokens, queued.max_new_tokens) == (rid, 8, 8)
    assert queued.traceparent.startswith("00-aaaa")
    assert [e.rid for e in em.of(ReqFirstToken)] == [rid]
    fin = em.of(ReqFinished)[0]
    assert (fin.output_tokens, fin.finish_reason, fin.prompt_tokens) == (8, "length", 8)
    assert em.of(KvLoad) and em.of(KvLoad)[0].request_total_slots == 16
    decode = [d.decode for d in em.of(BatchDone) if d.decode]
    assert decode[-1].gen_throughput > 0  # a window of 4 decode batches has closed
    assert em.steps >= len(em.of(BatchDone))  # end_step once per step


@pytest.mark.parametrize("overlap", [False, True], ids=["normal", "overlap"])
def test_abort_waiting_and_running(overlap: bool) -> None:
    em = RecordingEmitter()
    engine = tiny_engine(em, enable_overlap=overlap, max_running_requests=1)
    long = SamplingParams(max_new_tokens=50, ignore_eos=True)
    running = engine.submit("first", long)
    waiting = engine.submit("second", long)
    for _ in range(3):
        engine.step()
    engine.abort(waiting)
    engine.abort(running)
    engine.run_until_idle()
    assert engine.pop_result(waiting).finish_reason == "abort"
    r = engine.pop_result(running)
    assert r.finish_reason == "abort" and 0 < r.completion_tokens < 50
    assert {e.rid for e in em.of(ReqAborted)} == {running, waiting}
    mem = engine.scheduler.memory_snapshot()
    assert mem["in_use_slots"] == 0 and mem["req_table_used"] == 0


def test_scheduler_thread_serves_other_threads() -> None:
    engine = tiny_engine().start()
    try:
        results = {}

        def client(i: int) -> None:
            results[i] = engine.generate([f"client {i}"], SP, timeout=30)[0]

        threads = [threading.Thread(target=client, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert sorted(results) == [0, 1, 2, 3]
        assert all(r.completion_tokens == 8 for r in results.values())
        on_thread = engine.call(lambda s: threading.current_thread().name).result(5)
        assert on_thread == "schedscope-scheduler"
        with pytest.raises(RuntimeError):
            engine.step()
    finally:
        engine.close()


def test_invalid_requests_fail_in_the_callers_thread() -> None:
    engine = tiny_engine(context_length=64)
    with pytest.raises(ValueError, match="exceeds"):
        engine.submit("x" * 60, SamplingParams(max_new_tokens=8))
    with pytest.raises(ValueError, match="empty"):
        engine.submit("", SP)
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([1, 2, 999], SP)
    with pytest.raises(ValueError, match="top_p"):
        engine.submit("ok", SamplingParams(top_p=0))


def test_package_import_stays_torch_free() -> None:
    import subprocess
    import sys

    code = "import sys, schedscope.engine, schedscope.engine.config; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
