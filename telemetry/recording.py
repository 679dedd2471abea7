"""Raw-event recordings: the exact frames a sidecar received, to replay them later.

File layout (little-endian)::

    header   MAGIC (8 bytes) | version u16 | meta_len u32 | meta (JSON, utf-8)
    record   kind u8 | length u32 | recv_wall_ns u64 | payload (length bytes)
    ...
    trailer  a record of kind KIND_END whose payload is JSON: frames, bytes, truncated counts

Frames are stored as received (bytes off the socket, before decoding), so a replay goes
through the same decode/validate path and reproduces bad frames too. ``recv_wall_ns`` is the
sidecar's wall clock at receipt: replay uses it as the receive time and for ``--realtime``.

The writer is bounded by ``max_bytes``: a frame that would cross it is not written, and the
truncation is counted (``dropped_frames``/``dropped_bytes``, also in the trailer). The reader
stops cleanly at a truncated tail (a killed recorder) and says so in ``truncated_tail``.

Torch-free; only the processing/receiving thread that owns a writer may call it.
"""

from __future__ import annotations

import json
import math
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from schedscope.telemetry.ingest import Ingest

if TYPE_CHECKING:
    from schedscope.telemetry.sidecar import Sidecar

MAGIC = b"\x89SSREC\r\n"  # PNG-style: a high byte and CRLF catch text-mode mangling
VERSION = 1
KIND_RAW_EVENTS = 0  # one engine -> sidecar frame (the msgpack envelope)
KIND_END = 255  # trailer with the writer's counts
_FUTURE_SLACK_NS = 86_400 * 10**9  # a receive time more than a day ahead is damage
_MAX_REALTIME_GAP_S = 86_400.0  # --realtime refuses to sleep longer than this for one gap

_HEADER = struct.Struct("<8sHI")
_RECORD = struct.Struct("<BIQ")
_TRAILER_RESERVE = 512  # room always kept for the trailer under max_bytes
MAX_FRAME_BYTES = 2**32 - 1


class RecordingError(ValueError):
    """The file is not a schedscope recording (or one of an unsupported version)."""


@dataclass
class Frame:
    kind: int
    recv_wall_ns: int
    data: bytes


class RecordingWriter:
    """Appends frames to a recording, never growing it past ``max_bytes``."""

    def __init__(
        self,
        path: str | Path,
        *,
        max_bytes: int = 256 * 1024**2,
        meta: dict[str, Any] | None = None,
        flush_interval_s: float = 1.0,
    ) -> None:
        self.path = Path(path)
        meta_bytes = json.dumps(
            {"created_wall_ns": time.time_ns(), **(meta or {})}, separators=(",", ":")
        ).encode()
        if max_bytes < _HEADER.size + len(meta_bytes) + _TRAILER_RESERVE:
            raise ValueError(f"max_bytes {max_bytes} is too small for a recording")
        self.max_bytes = max_bytes
        self.frames = 0
        self.dropped_frames = 0
        self.dropped_bytes = 0
        self._flush_interval_ns = int(flush_interval_s * 1e9)
        self._next_flush_ns = 0
        # Writers: the receiving thread, and the processing thread for KV-ingest batches.
        self._lock = threading.Lock()
        self._file: IO[bytes] | None = open(self.path, "wb")  # noqa: SIM115 (closed in close())
        self._file.write(_HEADER.pack(MAGIC, VERSION, len(meta_bytes)) + meta_bytes)
        self.bytes_written = _HEADER.size + len(meta_bytes)

    def write(
        self, data: bytes | memoryview, recv_wall_ns: int, kind: int = KIND_RAW_EVENTS
    ) -> bool:
        """Append one frame; False (and counted) when the size cap leaves no room for it."""
        with self._lock:
            return self._write(data, recv_wall_ns, kind)

    def _write(self, data: bytes | memoryview, recv_wall_ns: int, kind: int) -> bool:
        if self._file is None:
            return False
        size = _RECORD.size + len(data)
        if (
            len(data) > MAX_FRAME_BYTES
            or self.bytes_written + size > self.max_bytes - _TRAILER_RESERVE
        ):
            self.dropped_frames += 1
            self.dropped_bytes += len(data)
            return False
        self._file.write(_RECORD.pack(kind, len(data), recv_wall_ns))
        self._file.write(data)
        self.bytes_written += size
        self.frames += 1
        # Flush now and then, so a killed sidecar leaves a useful (truncated-tail) file.
        if recv_wall_ns >= self._next_flush_ns:
            self._file.flush()
            self._next_flush_ns = recv_wall_ns + self._flush_interval_ns
        return True

    def stats(self) -> dict[str, int]:
        return {
            "frames": self.frames,
            "bytes": self.bytes_written,
            "dropped_frames": self.dropped_frames,
            "dropped_bytes": self.dropped_bytes,
        }

    def close(self) -> None:
        """Write the trailer and close. Idempotent."""
        with self._lock:
            if self._file is None:
                return
            trailer = json.dumps(self.stats(), separators=(",", ":")).encode()
            self._file.write(_RECORD.pack(KIND_END, len(trailer), time.time_ns()) + trailer)
            self._file.close()
            self._file = None

    def __enter__(self) -> RecordingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordingReader:
    """Iterates the frames of a recording; tolerant of a truncated tail."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.meta: dict[str, Any] = {}
        self.trailer: dict[str, Any] | None = None  # None: the writer never closed the file
        self.truncated_tail = False
        self.frames_read = 0
        # What a damaged file made the reader skip or doubt, one line each (issue 18): a
        # replay reports it and fails instead of claiming success.
        self.damage: list[str] = []
        with open(self.path, "rb") as f:
            head = f.read(_HEADER.size)
            if len(head) < _HEADER.size or head[:8] != MAGIC:
                raise RecordingError(f"{self.path} is not a schedscope recording")
            _, version, meta_len = _HEADER.unpack(head)
            if version != VERSION:
                raise RecordingError(
                    f"{self.path}: recording version {version} not supported (this is {VERSION})"
                )
            meta = f.read(meta_len)
            if len(meta) < meta_len:
                raise RecordingError(f"{self.path}: truncated header")
            try:
                self.meta = json.loads(meta)
            except (ValueError, RecursionError):
                raise RecordingError(f"{self.path}: corrupt header") from None
            if not isinstance(self.meta, dict):
                raise RecordingError(f"{self.path}: corrupt header (not a JSON object)")
            self._data_offset = f.tell()

    def __iter__(self) -> Iterator[Frame]:
        with open(self.path, "rb") as f:
            f.seek(self._data_offset)
            while True:
                head = f.read(_RECORD.size)
                if not head:
                    return
                if len(head) < _RECORD.size:
                    self.truncated_tail = True
                    return
                kind, length, recv_wall_ns = _RECORD.unpack(head)
                data = f.read(length)
                if len(data) < length:
                    self.truncated_tail = True
                    return
                if kind == KIND_END:
                    self._read_trailer(data)
                    rest = len(f.read())
                    if rest:
                        self.damage.append(
                            f"end marker at record {self.frames_read + 1} but {rest} more bytes "
                            "follow: the rest of the file was skipped"
                        )
                    return
                self.frames_read += 1
                if recv_wall_ns > time.time_ns() + _FUTURE_SLACK_NS:  # u64: never < 0
                    self.damage.append(
                        f"record {self.frames_read}: receive time {recv_wall_ns} ns is not "
                        "a plausible wall-clock time (far future): skipped"
                    )
                    continue
                yield Frame(kind, recv_wall_ns, data)

    def _read_trailer(self, data: bytes) -> None:
        try:
            trailer = json.loads(data)
        except (ValueError, RecursionError):
            trailer = None
        if not isinstance(trailer, dict):
            self.damage.append("corrupt trailer (not a JSON object)")
            self.trailer = {}
            return
        self.trailer = trailer
        frames = trailer.get("frames")
        if isinstance(frames, int) and frames != self.frames_read:
            self.damage.append(
                f"the trailer says {frames} frames were written, {self.frames_read} were read"
            )

    def raw_frames(self) -> Iterator[Frame]:
        """Only the engine -> sidecar frames (kinds this version knows how to replay)."""
        return (fr for fr in self if fr.kind == KIND_RAW_EVENTS)


# ---------------------------------------------------------------------------------------------
# Wiring into the sidecar: record what the ingest receives; feed a recording back through it.
# ---------------------------------------------------------------------------------------------


class RecordingIngest(Ingest):
    """An Ingest that also writes every frame it is handed, as received, to a recording.

    The write happens on the receiving thread, before decoding, so garbage frames are kept too
    and a replay counts them the same way. Close the writer only after ``stop()``.
    """

    def __init__(self, endpoint: str, writer: RecordingWriter, **kwargs: Any) -> None:
        super().__init__(endpoint, **kwargs)
        self.writer = writer

    def accept(self, data: bytes | memoryview):  # type: ignore[override]
        self.writer.write(data, time.time_ns())
        return super().accept(data)


@dataclass
class ReplayStats:
    frames: int = 0
    first_wall_ns: int | None = None
    last_wall_ns: int | None = None
    truncated_tail: bool = False
    trailer: dict[str, Any] | None = None


def replay_into(
    reader: RecordingReader,
    sidecar: Sidecar,
    *,
    realtime: bool = False,
    speed: float = 1.0,
    should_stop: Callable[[], bool] = lambda: False,
    on_frame: Callable[[int, int], None] | None = None,
) -> ReplayStats:
    """Run a recording through ``sidecar`` exactly like live frames: same decode, validation,
    registry and handler; each frame keeps its recorded receive time.

    The sidecar's Ingest is not started: frames go in through ``accept`` and are processed at
    once, so a replay never drops on the queue however fast it runs. ``realtime`` sleeps to
    reproduce the recorded gaps (divided by ``speed``). ``on_frame(frames, recv_wall_ns)``
    runs after each frame (the caller ticks the telemetry on the recorded clock).
    """
    if not (math.isfinite(speed) and speed > 0):
        raise RecordingError(f"speed must be a finite number > 0, not {speed}")
    stats = ReplayStats()
    ingest = sidecar.ingest
    start_mono = time.monotonic()
    for frame in reader.raw_frames():
        if should_stop():
            break
        if stats.first_wall_ns is None:
            stats.first_wall_ns = frame.recv_wall_ns
        if realtime:
            due = start_mono + (frame.recv_wall_ns - stats.first_wall_ns) / 1e9 / speed
            delay = due - time.monotonic()
            if not delay <= _MAX_REALTIME_GAP_S:  # also inf/nan from a tiny speed
                raise RecordingError(
                    f"--realtime would wait {delay:.3g} s before record {stats.frames + 1} "
                    f"(speed {speed:g}); use a higher --speed or no --realtime"
                )
            if delay > 0:
                time.sleep(delay)
        stats.last_wall_ns = frame.recv_wall_ns
        if ingest.accept(frame.data) is not None:
            received = ingest.get(timeout=0)
            if received is not None:
                received.recv_wall_ns = frame.recv_wall_ns
                sidecar.process_one(received)
        stats.frames += 1
        if on_frame is not None:
            on_frame(stats.frames, frame.recv_wall_ns)
    stats.truncated_tail = reader.truncated_tail
    stats.trailer = reader.trailer
    return stats
