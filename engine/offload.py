"""Asynchronous offload of evicted KV pages to a CPU tier (SGLang's CPU_PINNED medium).

When the radix cache evicts a page, its KV is gathered (on the main stream, so it is read
before the slots are reused) and copied to host memory off the scheduler's path:
- CUDA: a side stream waits for the main one, copies into pinned memory with non_blocking,
  and records an event; ``poll`` checks the event without blocking.
- CPU: a background thread does the copy; ``poll`` checks its future.
Until a copy completes the offload is *in flight*, which is exactly the transient state seed
004 adds to ``is_fully_idle``: flushing the cache or releasing memory then must wait.
Completed pages land in an LRU CPU tier and are announced as BlockStored(medium=CPU_PINNED);
pages the tier drops are BlockRemoved(medium=CPU_PINNED).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from schedscope.engine.radix_cache import Node, page_hash
from schedscope.telemetry.schema import MEDIUM_CPU, BlockRemoved, BlockStored, KvBlockEvent


@dataclass
class EvictedPage:
    """One page leaving the device cache: its identity and where its KV sits now."""

    block_hash: int
    parent_hash: int | None
    token_ids: list[int]
    slots: torch.Tensor  # slot indices into the device KV pool (still valid at offload time)


@dataclass
class _Transfer:
    page: EvictedPage
    future: Future | None = None  # CPU path
    event: torch.cuda.Event | None = None  # CUDA path
    host: torch.Tensor | None = None
    device_copy: torch.Tensor | None = None  # kept alive until the copy is done


@dataclass
class CpuPage:
    parent_hash: int | None
    token_ids: list[int]
    kv: torch.Tensor = field(repr=False)


class KvOffloader:
    """``read_slots(slots)`` returns the KV of those slots as one device tensor (a copy)."""

    def __init__(
        self,
        read_slots: Callable[[torch.Tensor], torch.Tensor],
        *,
        page_size: int,
        capacity_pages: int = 1024,
        device: torch.device | str = "cpu",
        notify: Callable[[], None] | None = None,
    ) -> None:
        self.read_slots = read_slots
        self.page_size = page_size
        self.capacity_pages = capacity_pages
        self.device = torch.device(device)
        self.notify = notify  # wakes the idle scheduler when a CPU copy lands
        self._cuda = self.device.type == "cuda"
        self._stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._pool: ThreadPoolExecutor | None = None  # CPU path: started on first use
        self._inflight: list[_Transfer] = []
        self.tier: OrderedDict[int, CpuPage] = OrderedDict()
        self._gate = threading.Event()  # cleared by hold(): lets tests keep a copy in flight
        self._gate.set()
        self.offloaded_pages = 0
        self.offloaded_bytes = 0

    # -- scheduler side -----------------------------------------------------------------------

    def offload(self, pages: list[EvictedPage]) -> None:
        """Start copying these pages to host memory; returns at once."""
        for page in pages:
            if page.block_hash in self.tier:
                self.tier.move_to_end(page.block_hash)
                continue
            kv = self.read_slots(page.slots)
            t = _Transfer(page)
            if self._cuda:
                assert self._stream is not None
                self._stream.wait_stream(torch.cuda.current_stream(self.device))
                with torch.cuda.stream(self._stream):
                    t.host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)
                    t.host.copy_(kv, non_blocking=True)
                    t.event = torch.cuda.Event()
                    t.event.record(self._stream)
                kv.record_stream(self._stream)
                t.device_copy = kv
            else:
                if self._pool is None:
                    self._pool = ThreadPoolExecutor(1, "schedscope-kv-offload")
                t.future = self._pool.submit(self._copy_on_thread, kv)
            self._inflight.append(t)

    def _copy_on_thread(self, kv: torch.Tensor) -> torch.Tensor:
        self._gate.wait()
        host = kv.clone()
        if self.notify is not None:
            self.notify()
        return host

    @property
    def in_flight(self) -> int:
        return len(self._inflight)

    def poll(self) -> list[KvBlockEvent]:
        """Move finished copies into the tier; returns their KV events (never blocks)."""
        if not self._inflight:
            return []
        events: list[KvBlockEvent] = []
        still: list[_Transfer] = []
        for t in self._inflight:
            if not self._done(t):
                still.append(t)
                continue
            host = t.future.result() if t.future is not None else t.host
            assert host is not None
            events.extend(self._admit(t.page, host))
        self._inflight = still
        return events

    def _done(self, t: _Transfer) -> bool:
        if t.future is not None:
            return t.future.done()
        assert t.event is not None
        return self._gate.is_set() and t.event.query()

    def _admit(self, page: EvictedPage, host: torch.Tensor) -> list[KvBlockEvent]:
        events: list[KvBlockEvent] = []
        while len(self.tier) >= self.capacity_pages:
            old_hash, _ = self.tier.popitem(last=False)
            events.append(BlockRemoved(block_hashes=[old_hash], medium=MEDIUM_CPU))
        self.tier[page.block_hash] = CpuPage(page.parent_hash, page.token_ids, host)
        self.offloaded_pages += 1
        self.offloaded_bytes += host.numel() * host.element_size()
        events.append(
            BlockStored(
                block_hashes=[page.block_hash],
                parent_block_hash=page.parent_hash,
                token_ids=list(page.token_ids),
                block_size=self.page_size,
                medium=MEDIUM_CPU,
            )
        )
        return events

    def announce_all(self) -> list[KvBlockEvent]:
        """BlockStored for every page of the CPU tier (re-sync of a new KV consumer)."""
        return [
            BlockStored(
                block_hashes=[h],
                parent_block_hash=page.parent_hash,
                token_ids=list(page.token_ids),
                block_size=self.page_size,
                medium=MEDIUM_CPU,
            )
            for h, page in self.tier.items()
        ]

    def clear(self) -> list[KvBlockEvent]:
        """Drop the whole tier (flush_cache). Callers make sure nothing is in flight."""
        if self._inflight:
            raise RuntimeError("cannot clear the CPU tier while an offload is in flight")
        if not self.tier:
            return []
        removed = BlockRemoved(block_hashes=list(self.tier), medium=MEDIUM_CPU)
        self.tier.clear()
        return [removed]

    # -- test and shutdown helpers --------------------------------------------------------------

    def hold(self) -> None:
        """Keep new and pending copies from completing (simulates a slow link in tests)."""
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()
        if self.notify is not None:
            self.notify()

    def close(self) -> None:
        self._gate.set()
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def evicted_pages(node: Node, page_size: int) -> list[EvictedPage]:
    """The pages of an evicted radix node, with hashes chained like the cache's events."""
    hashes = list(node.hashes)
    if len(hashes) * page_size == len(node.key):
        parent = node.parent
        prev = parent.hashes[-1] if parent is not None and parent.hashes else None
    else:  # events off: the cache kept no hashes; chain them here (eviction only: rare)
        prev = _path_hash(node.parent, page_size)
        hashes, h = [], prev
        for j in range(0, len(node.key), page_size):
            h = page_hash(h, node.key[j : j + page_size])
            hashes.append(h)
    pages = []
    for j, h in enumerate(hashes):
        lo, hi = j * page_size, (j + 1) * page_size
        slots = torch.tensor(node.value[lo:hi], dtype=torch.int64)
        pages.append(EvictedPage(h, prev, list(node.key[lo:hi]), slots))
        prev = h
    return pages


def _path_hash(node: Node | None, page_size: int) -> int | None:
    """Hash of the last page on the path root → node."""
    keys: list[list[int]] = []
    while node is not None and node.parent is not None:
        keys.append(node.key)
        node = node.parent
    prev: int | None = None
    for key in reversed(keys):
        for j in range(0, len(key), page_size):
            prev = page_hash(prev, key[j : j + page_size])
    return prev
