"""Control-plane building blocks on their own: inbox, memory check, offloader, profiler, weights."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from safetensors.torch import save_file

from schedscope.engine.control_errors import (
    ProfileInProgressError,
    ProfileNotRunningError,
    WeightsMismatchError,
)
from schedscope.engine.idle import IdleTracker, PoolSnapshot, check_memory
from schedscope.engine.inbox import Inbox
from schedscope.engine.offload import EvictedPage, KvOffloader
from schedscope.engine.profiler import EngineProfiler
from schedscope.engine.weights import apply_tensors, check_tensors, load_tensors
from schedscope.telemetry.schema import (
    MEDIUM_CPU,
    BlockRemoved,
    BlockStored,
    IdleBegin,
    IdleEnd,
    MemoryCheck,
    ProfileBegin,
    ProfileEnd,
)

from .engine_helpers import RecordingEmitter


def test_inbox_wakes_a_blocked_waiter_and_keeps_order():
    inbox = Inbox()
    try:
        assert inbox.wait(0.0) is False
        woke = []
        t = threading.Thread(target=lambda: woke.append(inbox.wait(5.0)))
        t.start()
        inbox.put("a")
        inbox.put("b")
        t.join(5)
        assert woke == [True]
        assert inbox.drain() == ["a", "b"]
        assert inbox.drain() == []
    finally:
        inbox.close()


def test_memory_check_clean_and_leak():
    ok = check_memory(PoolSnapshot(100, 60, 40, 0, 0))
    assert ok.ok and ok.detail == ""
    leak = check_memory(PoolSnapshot(100, 60, 37, 0, 0))
    assert not leak.ok and "3 missing" in leak.detail and "pool size 100" in leak.detail
    held = check_memory(PoolSnapshot(100, 60, 30, 10, 1))
    assert not held.ok and "10 slots held" in held.detail and "1 rows" in held.detail


def test_idle_tracker_emits_check_then_idle_and_flushes_once():
    em = RecordingEmitter()
    flushed_kv = []
    tracker = IdleTracker(em, lambda: PoolSnapshot(8, 8, 0, 0, 0), lambda: flushed_kv.append(1))
    tracker.update(True)
    tracker.update(True)  # still idle: nothing new
    tracker.update(False)
    kinds = [type(e) for e in em.events]
    assert kinds == [MemoryCheck, IdleBegin, IdleEnd]
    assert em.events[0].ok and flushed_kv == [1] and em.flushes == 1


def _kv_reader(store: torch.Tensor):
    return lambda slots: store[slots].clone()


def test_offload_is_in_flight_until_the_copy_lands():
    store = torch.arange(64, dtype=torch.float32).reshape(16, 4)
    woke = threading.Event()
    off = KvOffloader(_kv_reader(store), page_size=2, capacity_pages=2, notify=woke.set)
    try:
        off.hold()
        pages = [
            EvictedPage(11, None, [1, 2], torch.tensor([0, 1])),
            EvictedPage(12, 11, [3, 4], torch.tensor([2, 3])),
        ]
        off.offload(pages)
        assert off.in_flight == 2
        assert off.poll() == []  # held: nothing lands
        off.release()
        deadline = time.monotonic() + 5
        events = []
        while off.in_flight and time.monotonic() < deadline:
            events += off.poll()
            time.sleep(0.001)
        assert off.in_flight == 0 and woke.is_set()
        assert [type(e) for e in events] == [BlockStored, BlockStored]
        assert all(e.medium == MEDIUM_CPU for e in events)
        assert events[1].parent_block_hash == 11
        assert torch.equal(off.tier[12].kv, store[torch.tensor([2, 3])])
        # A third page pushes the oldest out of the 2-page tier: BlockRemoved on CPU_PINNED.
        off.offload([EvictedPage(13, 12, [5, 6], torch.tensor([4, 5]))])
        while off.in_flight and time.monotonic() < deadline:
            events = off.poll()
        assert isinstance(events[0], BlockRemoved) and events[0].block_hashes == [11]
        assert events[0].medium == MEDIUM_CPU
        cleared = off.clear()
        assert cleared[0].block_hashes == [12, 13] and not off.tier
    finally:
        off.close()


def test_profiler_steps_and_refuses_a_second_start(tmp_path):
    em = RecordingEmitter()
    prof = EngineProfiler(em)
    with pytest.raises(ProfileNotRunningError):
        prof.stop()
    prof.start(str(tmp_path), num_steps=2, activities=["CPU"])
    with pytest.raises(ProfileInProgressError, match="already in progress"):
        prof.start(str(tmp_path))
    torch.ones(8).sum()
    prof.on_step()
    assert prof.in_progress
    prof.on_step()
    assert not prof.in_progress  # stopped by itself after num_steps
    assert prof.last_result is not None and prof.last_result.steps == 2
    assert list(tmp_path.glob("*.trace.json"))
    assert [type(e) for e in em.events] == [ProfileBegin, ProfileEnd]


def test_weights_checked_before_anything_is_copied(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(3, 2))
    before = model[0].weight.detach().clone()
    with pytest.raises(WeightsMismatchError, match="shape mismatch"):
        check_tensors(model, {"0.weight": torch.zeros(3, 3)})
    with pytest.raises(WeightsMismatchError, match="does not have"):
        check_tensors(model, {"nope": torch.zeros(1)})
    with pytest.raises(WeightsMismatchError, match="does not exist"):
        load_tensors(tmp_path / "missing.safetensors")
    assert torch.equal(model[0].weight, before)
    path = tmp_path / "w.safetensors"
    save_file({"0.weight": torch.full((2, 3), 0.5)}, str(path))
    tensors = load_tensors(path)
    check_tensors(model, tensors)
    assert apply_tensors(model, tensors) == 1
    assert torch.all(model[0].weight == 0.5)
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(WeightsMismatchError, match="cannot read"):
        load_tensors(tmp_path / "bad.safetensors")
