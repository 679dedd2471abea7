"""KV cache: replayed KV events match the radix cache; exhaustion retracts, nothing leaks."""

from __future__ import annotations

import itertools

import pytest

from schedscope.engine.sampling import SamplingParams
from schedscope.telemetry.schema import (
    MEDIUM_CPU,
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvEvents,
    ReqRetracted,
)

from .engine_helpers import RecordingEmitter, prompts, tiny_engine

PAGE = 4
LONG = SamplingParams(max_new_tokens=60, ignore_eos=True)


class KvReplay:
    """A consumer's view of the cache, built only from the emitted KV events."""

    def __init__(self) -> None:
        self.blocks: dict[int, int | None] = {}  # GPU tier: hash -> parent hash
        self.cpu: set[int] = set()  # CPU tier (evicted pages offloaded by the control plane)
        self.seen = 0
        self.stored = self.removed = 0

    def apply(self, events: list) -> None:
        for batch in events[self.seen :]:
            if not isinstance(batch, KvEvents):
                continue
            for ev in batch.events:
                if getattr(ev, "medium", MEDIUM_GPU) == MEDIUM_CPU:  # one view per medium
                    if isinstance(ev, BlockStored):
                        assert not self.cpu.intersection(ev.block_hashes)
                        self.cpu.update(ev.block_hashes)
                    else:
                        self.cpu.difference_update(ev.block_hashes)
                    continue
                if isinstance(ev, BlockStored):
                    assert ev.block_size == PAGE and len(ev.token_ids) == PAGE
                    assert ev.parent_block_hash is None or ev.parent_block_hash in self.blocks
                    for h in ev.block_hashes:
                        assert h not in self.blocks and -(2**63) <= h < 2**63
                        self.blocks[h] = ev.parent_block_hash
                    self.stored += 1
                elif isinstance(ev, BlockRemoved):
                    for h in ev.block_hashes:
                        del self.blocks[h]  # KeyError: removed a block never stored
                    self.removed += 1
                elif isinstance(ev, AllBlocksCleared):
                    self.blocks.clear()
                    self.cpu.clear()
        self.seen = len(events)


def assert_no_leak(engine) -> None:
    """free + cached + held by live requests == pool size (the control plane's check)."""
    s = engine.scheduler
    owned = sum(r.kv_len - r.prefix_len for r in s.reqs.values() if r.row is not None)
    mem = s.memory_snapshot()
    assert mem["free_slots"] + mem["cached_slots"] + owned == mem["pool_size"]
    assert mem["in_use_slots"] == owned
    assert mem["req_table_used"] == sum(r.row is not None for r in s.reqs.values())


def exhausting_engine(em, overlap: bool):
    # A small pool and an admission ratio that over-commits: decode must run out of KV.
    return tiny_engine(
        em,
        enable_overlap=overlap,
        page_size=PAGE,
        max_total_tokens=320,
        init_new_token_ratio=0.1,
        chunked_prefill_size=64,
    )


@pytest.mark.parametrize("overlap", [False, True], ids=["normal", "overlap"])
def test_kv_exhaustion_retracts_and_finishes_everything(overlap: bool) -> None:
    em = RecordingEmitter()
    engine = exhausting_engine(em, overlap)
    replay = KvReplay()
    ps = prompts(6, 40, shared="shared prefix for all of them: ") + prompts(4, 24)
    rids = [engine.submit(p, LONG) for p in ps]
    while engine.step() or engine.scheduler.has_work():
        assert_no_leak(engine)
        replay.apply(em.events)
        assert set(replay.blocks) == engine.scheduler.tree.block_hashes()
        assert replay.cpu == set(engine.control.offloader.tier)
    results = [engine.pop_result(r) for r in rids]
    assert all(r.finish_reason == "length" and r.completion_tokens == 60 for r in results)
    assert em.of(ReqRetracted) and sum(r.retractions for r in results) > 0
    assert replay.removed > 0, "the small pool must have evicted cached blocks"
    assert_no_leak(engine)
    mem = engine.scheduler.memory_snapshot()
    assert mem["req_table_used"] == 0 and mem["in_use_slots"] == 0
    # Clearing the cache (when idle) is one AllBlocksCleared, and frees every slot.
    engine.call(lambda s: s.tree.reset())
    engine.step()
    replay.apply(em.events)
    assert replay.blocks == {} and engine.scheduler.tree.block_hashes() == set()
    assert engine.scheduler.pool.available == 320

    # Retraction recomputes KV but not the outcome: same tokens as with a roomy pool.
    roomy = tiny_engine(page_size=PAGE, chunked_prefill_size=64, enable_overlap=overlap)
    expected = roomy.generate(ps, LONG)
    assert [r.output_ids for r in results] == [r.output_ids for r in expected]
    assert sum(r.retractions for r in expected) == 0


def test_block_hashes_chain_per_page_like_sglang() -> None:
    em = RecordingEmitter()
    engine = tiny_engine(em, page_size=PAGE)
    engine.generate(["0123456789abcdef"], SamplingParams(max_new_tokens=1))
    stored = [e for b in em.of(KvEvents) for e in b.events if isinstance(e, BlockStored)]
    # One page per BlockStored; each names the previous page as its parent.
    assert [len(e.block_hashes) for e in stored] == [1] * 4
    assert stored[0].parent_block_hash is None
    for prev, cur in itertools.pairwise(stored):
        assert cur.parent_block_hash == prev.block_hashes[0]
    assert b"".join(bytes(e.token_ids) for e in stored) == b"0123456789abcdef"
    assert all(e.medium == "GPU" for e in stored)


def test_telemetry_off_records_no_kv_events() -> None:
    engine = tiny_engine()  # NullEmitter
    engine.generate(["hello there, general"], SamplingParams(max_new_tokens=4))
    assert engine.scheduler.tree.take_events() == []
