"""Raw event schema shared by the engine (emitter) and the sidecar (ingest).

Wire format: one msgpack message per flush, the envelope
``[schema_version, engine_id, seq, [event, ...]]``. ``seq`` counts messages per engine from 0
(a message the emitter had to drop still consumes its seq, so the sidecar sees the gap).

Every event is a msgspec Struct encoded as an array whose first element is a small integer
tag (compact and fast to decode). Timestamps ``ts`` are the engine's ``time.monotonic_ns()``;
the sidecar converts them to wall time with the clock anchor carried by EngineHello/Heartbeat.

Torch-free on purpose: both sides import it.
"""

from __future__ import annotations

import math
import os
import re
import tempfile
from typing import Union

import msgspec

SCHEMA_VERSION = 1

# Where engines send and the sidecar listens: argument, then $SCHEDSCOPE_ENDPOINT, then this.
ENV_ENDPOINT = "SCHEDSCOPE_ENDPOINT"
DEFAULT_ENDPOINT = f"ipc://{tempfile.gettempdir()}/schedscope-events.sock"
ENDPOINT_SCHEMES = ("ipc://", "tcp://", "inproc://")


def resolve_endpoint(endpoint: str | None = None) -> str:
    """Argument, then $SCHEDSCOPE_ENDPOINT, then the default ipc:// path."""
    chosen = endpoint or os.environ.get(ENV_ENDPOINT) or DEFAULT_ENDPOINT
    if not chosen.startswith(ENDPOINT_SCHEMES) or chosen in ENDPOINT_SCHEMES:
        raise ValueError(
            f"invalid endpoint {chosen!r}: expected ipc://PATH, tcp://HOST:PORT or inproc://NAME"
        )
    return chosen


# Batch modes (strings on the wire: readable in recordings, tiny next to the rest).
MODE_PREFILL = "prefill"
MODE_DECODE = "decode"
MODE_MIXED = "mixed"
BATCH_MODES = (MODE_PREFILL, MODE_DECODE, MODE_MIXED)

# Pause modes, as SGLang's pause_generation takes them.
PAUSE_ABORT = "abort"
PAUSE_RETRACT = "retract"
PAUSE_IN_PLACE = "in_place"
PAUSE_MODES = (PAUSE_ABORT, PAUSE_RETRACT, PAUSE_IN_PLACE)

# KV media, as SGLang names them (vLLM's CPU/STORAGE are accepted on ingest).
MEDIUM_GPU = "GPU"
MEDIUM_CPU = "CPU_PINNED"


class _Struct(msgspec.Struct, array_like=True, omit_defaults=False, gc=False):
    """Base for nested, untagged structs."""


class Event(msgspec.Struct, array_like=True, tag=True, gc=False):
    """Base of every raw event. Subclasses set an integer ``tag``."""

    ts: int  # engine time.monotonic_ns()


# ---------------------------------------------------------------------------------------------
# Identity, clock and the emitter's own health
# ---------------------------------------------------------------------------------------------


class EngineInfo(_Struct):
    """Who the engine is: the labels of everything the sidecar makes from its events."""

    model: str
    engine_type: str = "unified"  # SGLang's engine_type label: unified / prefill / decode
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int | None = None
    page_size: int = 1
    max_total_tokens: int = 0
    max_running_requests: int = 0
    pid: int = 0
    hostname: str = ""
    version: str = ""
    config: dict[str, str | int | float | bool | None] = {}


class EngineHello(Event, tag=1):
    """First message of an engine instance: identity plus a clock anchor (wall_ns at ts)."""

    wall_ns: int
    info: EngineInfo


class Heartbeat(Event, tag=2):
    """Periodic clock anchor and identity, so a sidecar that starts late still learns both."""

    wall_ns: int
    info: EngineInfo


class EmitterStats(Event, tag=3):
    """Cumulative counts of what the emitter had to drop (socket would block, no sidecar).

    Sent with the next message that gets through after a drop, and with every hello/heartbeat.
    """

    dropped_messages: int
    dropped_events: int
    # Added in schema 1 (optional, at the end): messages handed to ZMQ so far, and messages the
    # emitter refused itself for exceeding its max_message_bytes (also in dropped_messages).
    sent_messages: int = 0
    oversized_messages: int = 0


class Shutdown(Event, tag=4):
    """The engine is exiting on purpose: the sidecar closes everything that is open."""

    reason: str = ""


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------


class ReqQueued(Event, tag=10):
    rid: str
    prompt_tokens: int
    max_new_tokens: int = 0
    traceparent: str | None = None  # W3C trace context from the client, if any
    tracestate: str | None = None


class ReqFirstToken(Event, tag=11):
    rid: str
    cached_tokens: int = 0


class ReqFinished(Event, tag=12):
    rid: str
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = 0
    finish_reason: str = "length"  # length / stop / abort
    streaming: bool = False


class ReqAborted(Event, tag=13):
    rid: str
    output_tokens: int = 0
    reason: str = ""


class ReqRetracted(Event, tag=14):
    """Running request moved back to the waiting queue (KV exhausted or pause retract)."""

    rid: str
    output_tokens: int = 0
    freed_tokens: int = 0


# ---------------------------------------------------------------------------------------------
# Batches (identity: forward_iter, the snapshot of forward_ct taken at launch — seed 002)
# ---------------------------------------------------------------------------------------------


class PrefillStats(_Struct):
    """SGLang's prefill log line."""

    new_seqs: int
    new_tokens: int
    cached_tokens: int
    running_reqs: int
    queued_reqs: int
    token_usage: float
    chunked_reqs: int = 0


class DecodeStats(_Struct):
    """SGLang's decode log line."""

    running_reqs: int
    num_tokens: int  # tokens held in KV by the running requests
    generated_tokens: int  # tokens generated by this batch
    gen_throughput: float  # tokens/s as the engine computes it for its decode log
    token_usage: float
    queued_reqs: int
    spec_accept_length: float = 0.0
    cuda_graph: bool = False


class BatchLaunched(Event, tag=20):
    forward_iter: int
    mode: str  # prefill / decode / mixed
    rids: list[str]
    num_tokens: int  # tokens this forward pass computes


class BatchDone(Event, tag=21):
    forward_iter: int
    mode: str
    prefill: PrefillStats | None = None
    decode: DecodeStats | None = None


# ---------------------------------------------------------------------------------------------
# Control plane: pause, idle, admin actions
# ---------------------------------------------------------------------------------------------


class Paused(Event, tag=30):
    mode: str  # abort / retract / in_place
    reason: str = ""


class Resumed(Event, tag=31):
    pass


class IdleBegin(Event, tag=32):
    """Emitted only when the engine is *fully* idle (seed 004)."""


class IdleEnd(Event, tag=33):
    pass


class MemoryCheck(Event, tag=50):
    ok: bool
    pool_size: int
    free_slots: int
    cached_slots: int
    in_use_slots: int
    req_table_used: int
    detail: str = ""


class CacheFlush(Event, tag=51):
    ok: bool
    reason: str = ""  # why it was refused, when ok is False
    start_ts: int = 0


class WeightsUpdateBegin(Event, tag=52):
    source: str


class WeightsUpdateEnd(Event, tag=53):
    ok: bool
    message: str = ""


class ProfileBegin(Event, tag=54):
    output_dir: str
    num_steps: int | None = None


class ProfileEnd(Event, tag=55):
    ok: bool = True
    path: str = ""


# ---------------------------------------------------------------------------------------------
# KV cache (the engine's own view; exporters translate to the SGLang/vLLM wire format)
# ---------------------------------------------------------------------------------------------


class KvBlockEvent(msgspec.Struct, array_like=True, tag=True, gc=False):
    """Base of the KV cache events carried inside KvEvents."""


class BlockStored(KvBlockEvent, tag=41):
    block_hashes: list[int]  # signed int64, chained through parent_block_hash (SGLang style)
    parent_block_hash: int | None
    token_ids: list[int]
    block_size: int
    medium: str | None = MEDIUM_GPU
    lora_id: int | None = None


class BlockRemoved(KvBlockEvent, tag=42):
    block_hashes: list[int]
    medium: str | None = MEDIUM_GPU


class AllBlocksCleared(KvBlockEvent, tag=43):
    pass


KvBlockEventT = Union[BlockStored, BlockRemoved, AllBlocksCleared]


class KvEvents(Event, tag=40):
    forward_iter: int | None
    events: list[KvBlockEventT]


class KvLoad(Event, tag=44):
    """Router load signal, SGLang's KvMetrics without the pickle."""

    request_active_slots: int
    request_total_slots: int
    kv_active_blocks: int
    kv_total_blocks: int
    num_requests_waiting: int
    cache_usage: float
    prefix_hit_rate: float
    dp_rank: int = 0


AnyEvent = Union[
    EngineHello,
    Heartbeat,
    EmitterStats,
    Shutdown,
    ReqQueued,
    ReqFirstToken,
    ReqFinished,
    ReqAborted,
    ReqRetracted,
    BatchLaunched,
    BatchDone,
    Paused,
    Resumed,
    IdleBegin,
    IdleEnd,
    KvEvents,
    KvLoad,
    MemoryCheck,
    CacheFlush,
    WeightsUpdateBegin,
    WeightsUpdateEnd,
    ProfileBegin,
    ProfileEnd,
]

EVENT_TYPES: tuple[type[Event], ...] = AnyEvent.__args__  # type: ignore[attr-defined]
EVENT_TAGS: dict[int, type[Event]] = {
    cls.__struct_config__.tag: cls
    for cls in EVENT_TYPES  # type: ignore[misc]
}


class Envelope(msgspec.Struct, array_like=True, gc=False):
    """One message on the engine -> sidecar socket."""

    schema_version: int
    engine_id: str
    seq: int
    events: list[AnyEvent]


# ---------------------------------------------------------------------------------------------
# Encoding / decoding
# ---------------------------------------------------------------------------------------------


class FrameError(ValueError):
    """A frame that cannot be accepted. ``kind`` names the counter it goes to."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "malformed" | "schema_version" | "oversized" | "too_deep" | ...


_encoder = msgspec.msgpack.Encoder()
_envelope_decoder = msgspec.msgpack.Decoder(Envelope)
# Slow path: take the frame apart one level at a time, so one bad part is named and counted.
_array_decoder = msgspec.msgpack.Decoder(list[msgspec.Raw])
_int_decoder = msgspec.msgpack.Decoder(int)
_header_decoder = msgspec.msgpack.Decoder(tuple[int, str, int, list[msgspec.Raw]])
_event_decoder = msgspec.msgpack.Decoder(AnyEvent)
# msgspec reports a str with invalid UTF-8 as UnicodeDecodeError, not DecodeError.
_DECODE_ERRORS = (msgspec.DecodeError, msgspec.ValidationError, UnicodeDecodeError)


def encode_envelope(engine_id: str, seq: int, events: list[Event]) -> bytes:
    return _encoder.encode((SCHEMA_VERSION, engine_id, seq, events))


def encode_events(events: list[Event]) -> bytes:
    """Encode a bare list of events (used by recordings)."""
    return _encoder.encode(events)


class DecodedFrame(msgspec.Struct, gc=False):
    engine_id: str
    seq: int
    events: list[Event]
    rejected_events: int = 0  # events of this frame dropped (unknown tag or invalid fields)
    errors: list[str] = []
    unknown_events: int = 0  # the part of rejected_events whose tag this sidecar does not know


def decode_envelope(frame: bytes | memoryview) -> DecodedFrame:
    """Decode and validate one frame.

    Raises FrameError for a frame that cannot be used at all (garbage, truncated, wrong schema
    version). A frame whose events are mostly valid keeps them: each unknown or invalid event is
    dropped on its own and reported in ``rejected_events`` / ``unknown_events`` / ``errors``.
    """
    try:
        try:  # fast path: the whole frame is valid
            env = _envelope_decoder.decode(frame)
            ok = env.schema_version == SCHEMA_VERSION and 0 <= env.seq <= INT64_MAX
            if ok and (_SUSPECT.search(frame) is None or all(map(_in_range, env.events))):
                return DecodedFrame(env.engine_id, env.seq, env.events)
        except _DECODE_ERRORS:
            pass
        return _decode_slow(frame)
    except RecursionError:
        # Deeply nested arrays: msgspec recurses per level (issue 18). Its own kind.
        raise FrameError("too_deep", "malformed frame: nested too deeply") from None


INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
# The only msgpack encodings of an out-of-range value: uint64 with the top bit set, and a
# float32/float64 with an all-ones exponent (inf/nan). No match: no field needs checking
# (a match may be inside a string: then the events are checked one by one).
_SUSPECT = re.compile(rb"\xcf[\x80-\xff]|\xcb[\x7f\xff][\xf0-\xff]|\xca[\x7f\xff][\x80-\xff]")


def _in_range(value: object) -> bool:
    """Every int fits int64 and every float is finite (downstream: OTLP, JSON, counters)."""
    if type(value) is int:
        return INT64_MIN <= value <= INT64_MAX  # type: ignore[operator]
    if type(value) is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    if isinstance(value, msgspec.Struct):
        return all(_in_range(v) for v in msgspec.structs.astuple(value))
    if isinstance(value, list | tuple):
        return all(_in_range(v) for v in value)
    return True


def _decode_slow(frame: bytes | memoryview) -> DecodedFrame:
    try:
        parts = _array_decoder.decode(frame)
        # The version is checked before the rest, so a future envelope of another shape is
        # reported as a version mismatch, not as garbage.
        version = _int_decoder.decode(parts[0]) if parts else None
    except _DECODE_ERRORS as exc:
        raise FrameError("malformed", f"malformed frame: {exc}") from None
    if version is None:
        raise FrameError("malformed", "malformed frame: empty envelope")
    if version != SCHEMA_VERSION:
        raise FrameError(
            "schema_version",
            f"unsupported schema version {version} (this sidecar speaks {SCHEMA_VERSION})",
        )
    try:
        _, engine_id, seq, raw_events = _header_decoder.decode(frame)
    except _DECODE_ERRORS as exc:
        raise FrameError("malformed", f"malformed envelope: {exc}") from None
    if seq < 0:
        raise FrameError("malformed", f"negative seq {seq} from engine {engine_id!r}")
    if seq > INT64_MAX:
        raise FrameError("out_of_range", f"seq {seq} outside int64 from engine {engine_id!r}")
    events: list[Event] = []
    errors: list[str] = []
    unknown = 0
    for raw in raw_events:
        try:
            ev = _event_decoder.decode(raw)
        except _DECODE_ERRORS as exc:
            tag = _event_tag(raw)
            if tag is not None and tag not in EVENT_TAGS:
                unknown += 1
                errors.append(f"unknown event tag {tag} from engine {engine_id!r}")
            else:
                errors.append(f"invalid event (tag {tag}) from engine {engine_id!r}: {exc}")
            continue
        if _in_range(ev):
            events.append(ev)
        else:
            errors.append(
                f"event {type(ev).__name__} from engine {engine_id!r}: int outside int64 "
                "or non-finite float"
            )
    return DecodedFrame(engine_id, seq, events, len(errors), errors, unknown)


def _event_tag(raw: msgspec.Raw) -> int | None:
    try:
        parts = _array_decoder.decode(raw)
        return _int_decoder.decode(parts[0]) if parts else None
    except _DECODE_ERRORS:
        return None


def event_type_name(event: Event | KvBlockEvent) -> str:
    return type(event).__name__
