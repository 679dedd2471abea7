"""The SGLang / vLLM KV-event wire format (DESIGN §6), shared by the relay and the ingest.

- ZMQ PUB, 3 frames per batch: ``[topic, seq (8-byte big-endian, from 0), payload]``.
- payload: msgpack ``[ts: float, events: list, dp_rank: int | nil]``.
- event: msgpack map, first key ``"type"`` (class name). Fields without a default always sent
  (nil included), optional fields left out when None. Unknown fields are ignored on read.
- replay: ROUTER; a DEALER sends ``[b"", start_seq]``, gets ``[b"", topic, seq, payload]`` per
  buffered batch with seq >= start_seq, then the end marker ``[b"", b"", seq -1, b""]``.

Hash styles (``HASH_STYLES``): "sglang" signed int64 (our internal form); "vllm" the low 64
bits as an unsigned int; "vllm_bytes" 32 bytes = 24 zero bytes + the 8 low bytes big-endian.
Reading normalises every style back to a signed int64: an int >= 2^63 wraps, bytes keep their
last 8 bytes (big-endian) — the same value vLLM's int mode would have sent for that hash.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

import msgspec

from schedscope.telemetry.schema import (
    AllBlocksCleared,
    BlockRemoved,
    BlockStored,
    KvBlockEventT,
)

HASH_SGLANG = "sglang"
HASH_VLLM = "vllm"
HASH_VLLM_BYTES = "vllm_bytes"
HASH_STYLES = (HASH_SGLANG, HASH_VLLM, HASH_VLLM_BYTES)

END_SEQ = (-1).to_bytes(8, "big", signed=True)
_U64 = 1 << 64
_MASK = _U64 - 1

# SGLang media -> vLLM media names, for the vLLM style.
_VLLM_MEDIUM = {"CPU_PINNED": "CPU", "DISK": "STORAGE"}


@dataclass
class KvEventsConfig:
    """SGLang's ``--kv-events-config`` JSON keys (vLLM's are the same), plus our hash_style.

    Loopback by default (the engines default to ``tcp://*:5557``; pass that to listen on every
    interface).
    """

    publisher: str = "zmq"
    endpoint: str = "tcp://127.0.0.1:5557"
    replay_endpoint: str | None = None
    buffer_steps: int = 10_000
    hwm: int = 100_000
    max_queue_size: int = 100_000
    topic: str = ""
    hash_style: str = HASH_SGLANG

    def __post_init__(self) -> None:
        if self.hash_style not in HASH_STYLES:
            raise ValueError(f"hash_style must be one of {HASH_STYLES}, not {self.hash_style!r}")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> KvEventsConfig:
        """Known keys only; unknown ones (e.g. vLLM's enable_kv_cache_events) are ignored."""
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known and v is not None})

    @classmethod
    def from_json(cls, text: str) -> KvEventsConfig:
        return cls.from_dict(json.loads(text))

    def endpoint_for(self, dp_rank: int | None) -> str:
        return offset_endpoint(self.endpoint, dp_rank)

    def replay_endpoint_for(self, dp_rank: int | None) -> str | None:
        return offset_endpoint(self.replay_endpoint, dp_rank) if self.replay_endpoint else None


def offset_endpoint(endpoint: str, dp_rank: int | None) -> str:
    """Both engines add the dp rank to the port; ipc/inproc endpoints get a ``_dp<rank>`` suffix."""
    if not dp_rank:
        return endpoint
    m = re.match(r"^(tcp://.*):(\d+)$", endpoint)
    if m:
        return f"{m.group(1)}:{int(m.group(2)) + dp_rank}"
    return f"{endpoint}_dp{dp_rank}"


# ---------------------------------------------------------------------------------------------
# Hashes
# ---------------------------------------------------------------------------------------------


def hash_out(h: int, style: str) -> int | bytes:
    """Our signed int64 hash in the requested wire style."""
    if style == HASH_SGLANG:
        return h
    u = h & _MASK
    if style == HASH_VLLM:
        return u
    return bytes(24) + u.to_bytes(8, "big")


def hash_in(value: Any) -> int:
    """Any wire hash (int64, uint64, bytes) -> signed int64."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        b = bytes(value)[-8:]
        return int.from_bytes(b.rjust(8, b"\0"), "big", signed=True)
    v = _wire_int(value) & _MASK
    return v - _U64 if v >= (1 << 63) else v


def _wire_int(value: Any) -> int:
    """An integer field off the wire. Floats (incl. inf/NaN) and bools are malformed input:
    int() would silently truncate them or raise OverflowError, which callers don't expect."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------
# Events
# ---------------------------------------------------------------------------------------------


def event_to_wire(ev: KvBlockEventT, style: str) -> dict[str, Any]:
    """One of our KV events as the engine's map (key order: "type" first, then fields)."""
    vllm = style != HASH_SGLANG
    if isinstance(ev, BlockStored):
        out: dict[str, Any] = {
            "type": "BlockStored",
            "block_hashes": [hash_out(h, style) for h in ev.block_hashes],
            "parent_block_hash": (
                None if ev.parent_block_hash is None else hash_out(ev.parent_block_hash, style)
            ),
            "token_ids": ev.token_ids,
            "block_size": ev.block_size,
            "lora_id": ev.lora_id,
        }
        if vllm:  # vLLM always sends medium and lora_name
            out["medium"] = _VLLM_MEDIUM.get(ev.medium, ev.medium) if ev.medium else None
            out["lora_name"] = None
        elif ev.medium is not None:
            out["medium"] = ev.medium
        return out
    if isinstance(ev, BlockRemoved):
        out = {
            "type": "BlockRemoved",
            "block_hashes": [hash_out(h, style) for h in ev.block_hashes],
        }
        if vllm:
            out["medium"] = _VLLM_MEDIUM.get(ev.medium, ev.medium) if ev.medium else None
        elif ev.medium is not None:
            out["medium"] = ev.medium
        return out
    if isinstance(ev, AllBlocksCleared):
        return {"type": "AllBlocksCleared"}
    raise TypeError(f"not a KV event: {type(ev).__name__}")


_encoder = msgspec.msgpack.Encoder()


def encode_payload(
    ts: float, events: list[KvBlockEventT], dp_rank: int | None, style: str
) -> bytes:
    return _encoder.encode([float(ts), [event_to_wire(e, style) for e in events], dp_rank])


# Positional field orders, for a publisher that sends events as tagged arrays instead of maps.
_ARRAY_FIELDS = {
    "BlockStored": (
        "block_hashes",
        "parent_block_hash",
        "token_ids",
        "block_size",
        "lora_id",
        "medium",
    ),
    "BlockRemoved": ("block_hashes", "medium"),
    "AllBlocksCleared": (),
}


class UnknownKvEvent(ValueError):
    """An event whose type we do not know (counted, skipped)."""


def event_from_wire(raw: Any) -> KvBlockEventT:
    """One wire event (map, or tagged array) -> our schema. Unknown fields are ignored.

    Raises UnknownKvEvent for an unknown type, ValueError/TypeError/KeyError for a bad one.
    """
    if isinstance(raw, (list, tuple)) and raw and isinstance(raw[0], str):
        names = _ARRAY_FIELDS.get(raw[0])
        if names is None:
            raise UnknownKvEvent(raw[0])
        raw = {"type": raw[0], **dict(zip(names, raw[1:], strict=False))}
    if not isinstance(raw, dict):
        raise TypeError(f"KV event is a {type(raw).__name__}, not a map")
    kind = raw.get("type")
    if kind == "BlockStored":
        parent = raw.get("parent_block_hash")
        medium = raw.get("medium")
        return BlockStored(
            block_hashes=[hash_in(h) for h in raw["block_hashes"]],
            parent_block_hash=None if parent is None else hash_in(parent),
            token_ids=[_wire_int(t) for t in raw.get("token_ids") or ()],
            block_size=_wire_int(raw.get("block_size") or 0),
            medium=str(medium) if medium is not None else None,
            lora_id=raw.get("lora_id"),
        )
    if kind == "BlockRemoved":
        medium = raw.get("medium")
        return BlockRemoved(
            block_hashes=[hash_in(h) for h in raw["block_hashes"]],
            medium=str(medium) if medium is not None else None,
        )
    if kind == "AllBlocksCleared":
        return AllBlocksCleared()
    raise UnknownKvEvent(str(kind))


def decode_payload(payload: bytes) -> tuple[float, list[Any], int | None]:
    """payload -> (ts, raw events, dp_rank or None). dp_rank may be nil or missing."""
    obj = msgspec.msgpack.decode(payload)
    if not isinstance(obj, (list, tuple)) or len(obj) < 2 or not isinstance(obj[1], (list, tuple)):
        raise ValueError("KV payload is not [ts, events, dp_rank]")
    dp = obj[2] if len(obj) > 2 else None
    ts = float(obj[0])
    # A non-finite or absurd ts would poison every timestamp derived from it downstream.
    if not math.isfinite(ts) or not 0.0 <= ts < 1e11:
        raise ValueError(f"KV payload ts {obj[0]!r} is not a wall-clock time in seconds")
    return ts, list(obj[1]), (int(dp) if isinstance(dp, int) else None)
