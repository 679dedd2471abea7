"""Radix-tree prefix cache over pages of ``page_size`` tokens, with LRU eviction and lock counts.

Each node holds a run of whole pages: their token ids, their pool slots and (when recording KV
events) one block hash per page, chained through the previous page's hash like SGLang's
(signed int64). A node locked by a running request (lock_ref > 0, counted up to the root) is
never evicted. Store, evict and clear are recorded as BlockStored (one per page),
BlockRemoved (one per node) and AllBlocksCleared; the scheduler takes them once per step.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections.abc import Callable

from schedscope.engine.kv_pool import KVPool
from schedscope.telemetry.schema import (
    MEDIUM_GPU,
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvBlockEventT,
)


def page_hash(parent: int | None, tokens: list[int]) -> int:
    """Block hash of one page, chained through its parent's hash, as a signed int64."""
    h = hashlib.blake2b(digest_size=8)
    h.update(b"root" if parent is None else parent.to_bytes(8, "little", signed=True))
    h.update(array("q", tokens).tobytes())
    return int.from_bytes(h.digest(), "little", signed=True)


class Node:
    __slots__ = ("children", "hashes", "key", "last_access", "lock_ref", "parent", "value")

    def __init__(
        self,
        key: list[int],
        value: list[int],
        hashes: list[int],
        parent: Node | None,
        last_access: int = 0,
    ) -> None:
        self.key = key  # token ids, a whole number of pages
        self.value = value  # pool slots, one per token
        self.hashes = hashes  # one per page; empty when events are off
        self.parent = parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.lock_ref = 0
        self.last_access = last_access


class RadixCache:
    def __init__(
        self,
        pool: KVPool,
        page_size: int,
        *,
        record_events: bool = True,
        medium: str = MEDIUM_GPU,
    ) -> None:
        self.pool = pool
        self.page_size = page_size
        self.record_events = record_events
        self.medium = medium
        self.root = Node([], [], [], None)
        self.root.lock_ref = 1
        self.evictable_size = 0  # tokens in unlocked nodes
        self.protected_size = 0  # tokens in nodes locked by running requests
        self._clock = 0  # LRU order; a counter keeps runs deterministic
        self._events: list[KvBlockEventT] = []
        # Hook for a second KV tier (control plane): sees each evicted node before its slots
        # go back to the pool, while their K/V are still intact.
        self.on_evict: Callable[[Node], None] | None = None

    # -- lookups and inserts ----------------------------------------------------------------

    def match_prefix(self, tokens: list[int]) -> tuple[list[int], Node]:
        """Slots of the longest cached whole-page prefix of ``tokens``, and its last node."""
        p = self.page_size
        n = len(tokens) // p * p
        node, slots, i = self.root, [], 0
        self._clock += 1
        while i < n:
            child = node.children.get(tuple(tokens[i : i + p]))
            if child is None:
                break
            child.last_access = self._clock
            m = self._match_len(child.key, tokens, i, n)
            if m < len(child.key):
                child = self._split(child, m)
            slots.extend(child.value)
            node, i = child, i + m
        return slots, node

    def insert(self, tokens: list[int], slots: list[int]) -> int:
        """Cache the whole pages of ``tokens``; returns how many leading tokens were cached
        already (the caller still owns, and must free, its own slots for those)."""
        p = self.page_size
        n = len(tokens) // p * p
        node, i = self.root, 0
        self._clock += 1
        while i < n:
            child = node.children.get(tuple(tokens[i : i + p]))
            if child is None:
                self._add_leaf(node, tokens[i:n], slots[i:n])
                return i
            child.last_access = self._clock
            m = self._match_len(child.key, tokens, i, n)
            if m < len(child.key):
                child = self._split(child, m)
            node, i = child, i + m
        return n

    def _match_len(self, key: list[int], tokens: list[int], start: int, end: int) -> int:
        p, m = self.page_size, 0
        limit = min(len(key), end - start)
        while m < limit and key[m : m + p] == tokens[start + m : start + m + p]:
            m += p
        return m

    def _split(self, child: Node, m: int) -> Node:
        """Cut ``child`` after m tokens; the new upper node takes its place (no KV events:
        the blocks and their hashes are unchanged)."""
        p = self.page_size
        parent = child.parent
        assert parent is not None
        upper = Node(child.key[:m], child.value[:m], child.hashes[: m // p], parent)
        upper.lock_ref, upper.last_access = child.lock_ref, child.last_access
        child.key, child.value, child.hashes = (
            child.key[m:],
            child.value[m:],
            child.hashes[m // p :],
        )
        child.parent = upper
        upper.children[tuple(child.key[:p])] = child
        parent.children[tuple(upper.key[:p])] = upper
        return upper

    def _add_leaf(self, parent: Node, key: list[int], value: list[int]) -> None:
        p = self.page_size
        hashes: list[int] = []
        if self.record_events:
            prev = parent.hashes[-1] if parent.hashes else None
            for j in range(0, len(key), p):
                page = key[j : j + p]
                h = page_hash(prev, page)
                self._events.append(BlockStored([h], prev, page, p, self.medium))
                hashes.append(h)
                prev = h
        leaf = Node(key, value, hashes, parent, self._clock)
        parent.children[tuple(key[:p])] = leaf
        self.evictable_size += len(key)

    # -- locks ------------------------------------------------------------------------------

    def inc_lock_ref(self, node: Node) -> None:
        while node is not self.root:
            if node.lock_ref == 0:
                self.evictable_size -= len(node.key)
                self.protected_size += len(node.key)
            node.lock_ref += 1
            node = node.parent  # type: ignore[assignment]

    def dec_lock_ref(self, node: Node) -> None:
        while node is not self.root:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                self.evictable_size += len(node.key)
                self.protected_size -= len(node.key)
            node = node.parent  # type: ignore[assignment]

    # -- eviction and clearing --------------------------------------------------------------

    def evict(self, num_tokens: int) -> int:
        """Free at least ``num_tokens`` slots from unlocked leaves, least recently used first."""
        heap = [
            (n.last_access, id(n), n) for n in self._nodes() if not n.children and not n.lock_ref
        ]
        heapq.heapify(heap)
        freed = 0
        while freed < num_tokens and heap:
            _, _, node = heapq.heappop(heap)
            parent = node.parent
            assert parent is not None
            if self.on_evict is not None:
                self.on_evict(node)
            self.pool.free(node.value)
            freed += len(node.value)
            self.evictable_size -= len(node.key)
            if self.record_events:
                self._events.append(BlockRemoved(node.hashes, self.medium))
            del parent.children[tuple(node.key[: self.page_size])]
            if parent is not self.root and not parent.children and not parent.lock_ref:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        return freed

    def reset(self) -> None:
        """Drop every cached block (only when no request holds a lock: the caller checks)."""
        for node in self._nodes():
            self.pool.free(node.value)
        self.root = Node([], [], [], None)
        self.root.lock_ref = 1
        self.evictable_size = self.protected_size = 0
        if self.record_events:
            self._events.append(AllBlocksCleared())

    def _nodes(self) -> list[Node]:
        out, stack = [], list(self.root.children.values())
        while stack:
            node = stack.pop()
            out.append(node)
            stack.extend(node.children.values())
        return out

    # -- views ------------------------------------------------------------------------------

    @property
    def total_size(self) -> int:
        return self.evictable_size + self.protected_size

    def take_events(self) -> list[KvBlockEventT]:
        events, self._events = self._events, []
        return events

    def announce_all(self) -> list[KvBlockEventT]:
        """BlockStored for every page the tree holds, parents before children: what a KV
        consumer that knows nothing (a restarted sidecar's relay) needs to rebuild the cache."""
        out: list[KvBlockEventT] = []
        stack = list(self.root.children.values())
        p = self.page_size
        while stack:  # depth first from the root: a parent is always announced first
            node = stack.pop()
            prev = node.parent.hashes[-1] if node.parent and node.parent.hashes else None
            for j, h in enumerate(node.hashes):
                out.append(BlockStored([h], prev, node.key[j * p : (j + 1) * p], p, self.medium))
                prev = h
            stack.extend(node.children.values())
        return out

    def block_hashes(self) -> set[int]:
        """Every block hash the tree holds now (tests compare it with replayed events)."""
        return {h for node in self._nodes() for h in node.hashes}
