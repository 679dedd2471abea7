"""KV memory: a pool of token slots (one K/V vector per layer each) and the request→token table.

A slot is owned by exactly one of: the free list, the radix cache, or one request (the part of
its sequence not shared through the cache). The memory check of the control plane relies on
free + cached + in-use == size, and on the request table being empty when idle (seed 003).
"""

from __future__ import annotations

import torch


class KVPool:
    """Token-slot allocator over per-layer K and V tensors of shape [size + 1, kv_heads, dim]."""

    def __init__(
        self,
        size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.size = size
        # Slot `size` is scratch: padded gathers point at it, it is never handed out.
        self.pad_slot = size
        shape = (size + 1, num_kv_heads, head_dim)
        self.kv_caches = [
            (
                torch.zeros(shape, dtype=dtype, device=device),
                torch.zeros(shape, dtype=dtype, device=device),
            )
            for _ in range(num_layers)
        ]
        # LIFO free list: recently freed slots are reused first (warm in cache).
        self._free: list[int] = list(range(size - 1, -1, -1))

    @property
    def available(self) -> int:
        return len(self._free)

    def alloc(self, n: int) -> list[int] | None:
        if n > len(self._free):
            return None
        if n == 0:
            return []
        slots = self._free[-n:]
        del self._free[-n:]
        return slots

    def free(self, slots: list[int]) -> None:
        self._free.extend(slots)

    def clear(self) -> None:
        self._free = list(range(self.size - 1, -1, -1))


class ReqToTokenPool:
    """One row per admitted request: the pool slot of each of its tokens, in order."""

    def __init__(self, num_rows: int, context_length: int, pad_slot: int) -> None:
        self.num_rows = num_rows
        self.pad_slot = pad_slot
        self.table = torch.full((num_rows, context_length), pad_slot, dtype=torch.int64)
        self._free_rows: list[int] = list(range(num_rows - 1, -1, -1))

    @property
    def available(self) -> int:
        return len(self._free_rows)

    @property
    def used(self) -> int:
        return self.num_rows - len(self._free_rows)

    def alloc(self) -> int | None:
        return self._free_rows.pop() if self._free_rows else None

    def free(self, row: int) -> None:
        self._free_rows.append(row)

    def write(self, row: int, start: int, slots: list[int]) -> None:
        self.table[row, start : start + len(slots)] = torch.tensor(slots, dtype=torch.int64)

    def slots(self, row: int, end: int, start: int = 0) -> list[int]:
        return self.table[row, start:end].tolist()
