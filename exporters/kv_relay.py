"""KV-event relay: a ``KvSink`` that republishes KV batches in the SGLang/vLLM wire format.

An existing KV-aware router (Dynamo, llm-d, SGLang's router) points at the sidecar instead of
the engine. One publisher per dp rank (endpoint port + dp rank, like the engines), each with
its own seq from 0, PUB socket (``hwm``) and, if ``replay_endpoint`` is set, a ROUTER socket
answering replay requests from a ring of the last ``buffer_steps`` batches.

Never blocks: ``publish()`` only appends to a bounded queue (``max_queue_size``; a full queue
drops the batch and counts it); one thread owns the sockets (ZMQ sockets are not thread-safe),
sends, and answers replays. A PUB socket never waits for a slow subscriber: ZMQ drops at hwm.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import zmq
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from schedscope.exporters.kv_wire import END_SEQ, KvEventsConfig, encode_payload
from schedscope.exporters.stats import EXPORT_STATS, ExportStats, RateLimitedLogger
from schedscope.telemetry.kv_sinks import KvBatch

_log = RateLimitedLogger(logging.getLogger(__name__))
_STOP = object()


@dataclass
class _Publisher:
    """The sockets and state of one dp rank's stream."""

    endpoint: str
    pub: zmq.Socket
    router: zmq.Socket | None
    replay_endpoint: str | None
    seq: int = 0
    ring: deque[tuple[int, bytes]] = field(default_factory=deque)  # (seq, payload)


class KvRelay:
    """``KvSink`` republishing batches as SGLang/vLLM KV events. See the module doc."""

    def __init__(
        self,
        config: KvEventsConfig | Mapping[str, Any] | str | None = None,
        *,
        dp_ranks: tuple[int, ...] = (0,),
        name: str = "kv_relay",
        stats: ExportStats = EXPORT_STATS,
        context: zmq.Context | None = None,
        poll_interval_s: float = 0.02,
    ) -> None:
        """``config``: a KvEventsConfig, its dict, or SGLang's ``--kv-events-config`` JSON.

        ``dp_ranks`` are bound at once (so a port in use fails here, loudly); other ranks bind
        on their first batch.
        """
        if isinstance(config, str):
            config = KvEventsConfig.from_json(config)
        elif config is None:
            config = KvEventsConfig()
        elif not isinstance(config, KvEventsConfig):
            config = KvEventsConfig.from_dict(config)
        self.config = config
        self.name = name
        self.stats = stats
        self._topic = config.topic.encode()
        self._ctx = context or zmq.Context.instance()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=max(1, config.max_queue_size))
        self._last_send_lag_s = 0.0
        self._publishers: dict[int, _Publisher] = {}
        self._poll_s = poll_interval_s
        self._closed = False
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(
            target=self._run, args=(dp_ranks,), name=f"schedscope-{name}", daemon=True
        )
        self._thread.start()
        self._ready.wait()
        if self._start_error is not None:
            self._thread.join()
            raise self._start_error

    # -- KvSink ---------------------------------------------------------------------------

    def publish(self, batch: KvBatch) -> None:
        if self._closed or not batch.events:
            return
        try:
            self._queue.put_nowait(batch)
        except queue.Full:
            self.stats.add("kv_batches", self.name, "dropped")
            self.stats.add("kv_events", self.name, "dropped", len(batch.events))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        while True:  # let the sender drain for a moment, then make room for the stop marker
            try:
                self._queue.put(_STOP, timeout=1.0)
                break
            except queue.Full:
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    continue
                self.stats.add("kv_batches", self.name, "dropped")  # an unsent batch
                self.stats.add("kv_events", self.name, "dropped", len(item.events))
        self._thread.join(timeout=5)

    def endpoints(self, dp_rank: int = 0) -> tuple[str, str | None]:
        """(PUB endpoint, replay endpoint) of a dp rank, as bound (tcp port 0 resolved)."""
        p = self._publishers.get(dp_rank)
        if p is None:
            return self.config.endpoint_for(dp_rank), self.config.replay_endpoint_for(dp_rank)
        return p.endpoint, p.replay_endpoint

    def queue_size(self) -> int:
        return self._queue.qsize()

    def lag_seconds(self) -> float:
        """How far routers' view trails the engine: the age of the oldest batch still queued
        (so a stuck sender shows as a growing lag), else the last sent batch's ts -> send."""
        with self._queue.mutex:
            oldest = self._queue.queue[0] if self._queue.queue else None
        if isinstance(oldest, KvBatch):
            return max(0.0, time.time() - oldest.ts)
        return self._last_send_lag_s

    # -- sender thread --------------------------------------------------------------------

    def _open(self, dp_rank: int) -> _Publisher:
        cfg = self.config
        pub = self._ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.SNDHWM, cfg.hwm)
        pub.setsockopt(zmq.LINGER, 0)
        router = None
        try:
            pub.bind(cfg.endpoint_for(dp_rank))
            endpoint = pub.getsockopt_string(zmq.LAST_ENDPOINT)
            replay_ep = cfg.replay_endpoint_for(dp_rank)
            if replay_ep:
                router = self._ctx.socket(zmq.ROUTER)
                router.setsockopt(zmq.SNDHWM, cfg.hwm)
                router.setsockopt(zmq.LINGER, 0)
                # Replay requests are [b"", 8-byte seq]: refuse anything bigger from the network.
                router.setsockopt(zmq.MAXMSGSIZE, 1024)
                router.bind(replay_ep)
                replay_ep = router.getsockopt_string(zmq.LAST_ENDPOINT)
        except zmq.ZMQError as exc:
            pub.close()
            if router is not None:
                router.close()
            raise OSError(
                f"KV relay cannot bind {cfg.endpoint_for(dp_rank)} / "
                f"{cfg.replay_endpoint_for(dp_rank)} (dp_rank {dp_rank}): {exc}"
            ) from exc
        p = _Publisher(
            endpoint, pub, router, replay_ep, ring=deque(maxlen=max(1, cfg.buffer_steps))
        )
        self._publishers[dp_rank] = p
        return p

    def _run(self, dp_ranks: tuple[int, ...]) -> None:
        try:
            for rank in dp_ranks:
                self._open(rank)
        except BaseException as exc:  # reported to the constructor
            self._start_error = exc
            self._close_sockets()
            self._ready.set()
            return
        self._ready.set()
        poller = zmq.Poller()
        polled: set[int] = set()
        try:
            while True:
                try:
                    item = self._queue.get(timeout=self._poll_s)
                except queue.Empty:
                    item = None
                while item is not None:
                    if item is _STOP:
                        return
                    self._send(item)
                    try:  # drain what is queued before looking at replays
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        item = None
                for rank, p in self._publishers.items():
                    if p.router is not None and rank not in polled:
                        poller.register(p.router, zmq.POLLIN)
                        polled.add(rank)
                if polled:
                    for sock, _ in poller.poll(0):
                        self._answer_replay(sock)
        finally:
            self._close_sockets()

    def _send(self, batch: KvBatch) -> None:
        rank = batch.dp_rank or 0
        p = self._publishers.get(rank)
        try:
            if p is None:
                p = self._open(rank)
            payload = encode_payload(batch.ts, batch.events, batch.dp_rank, self.config.hash_style)
        except Exception as exc:  # bind failure or an unencodable event: drop, count, log calmly
            self.stats.add("kv_batches", self.name, "dropped")
            self.stats.add("kv_events", self.name, "dropped", len(batch.events))
            _log.warn(f"send{rank}", "KV relay dropped a batch for dp_rank %s: %s", rank, exc)
            return
        seq = p.seq
        p.seq += 1
        p.ring.append((seq, payload))  # replay buffer holds it even if PUB drops it
        try:
            p.pub.send_multipart([self._topic, seq.to_bytes(8, "big"), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            self.stats.add("kv_batches", self.name, "dropped")
            self.stats.add("kv_events", self.name, "dropped", len(batch.events))
            return
        self.stats.add("kv_batches", self.name, "sent")
        self.stats.add("kv_events", self.name, "sent", len(batch.events))
        self._last_send_lag_s = max(0.0, time.time() - batch.ts)

    def _answer_replay(self, router: zmq.Socket) -> None:
        while True:
            try:
                frames = router.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return
            # [identity, b"", start_seq(8)]; anything else is malformed and gets no reply.
            if len(frames) != 3 or frames[1] != b"" or len(frames[2]) != 8:
                self.stats.add("kv_batches", self.name, "replay_malformed")
                continue
            ident, start = frames[0], int.from_bytes(frames[2], "big", signed=True)
            p = next(x for x in self._publishers.values() if x.router is router)
            sent = 0
            try:
                for seq, payload in list(p.ring):
                    if seq >= start:
                        router.send_multipart(
                            [ident, b"", self._topic, seq.to_bytes(8, "big"), payload],
                            flags=zmq.NOBLOCK,
                        )
                        sent += 1
                router.send_multipart([ident, b"", b"", END_SEQ, b""], flags=zmq.NOBLOCK)
            except zmq.Again:  # the client stopped reading: its problem, not ours
                self.stats.add("kv_batches", self.name, "replay_dropped")
            self.stats.add("kv_batches", self.name, "replayed", sent)

    def _close_sockets(self) -> None:
        for p in self._publishers.values():
            p.pub.close(linger=100)  # let the last batches reach subscribers
            if p.router is not None:
                p.router.close(linger=0)
        self._publishers.clear()


class KvRelayCollector(Collector):
    """prometheus_client Collector for a relay's lag and queue depth, read at scrape time."""

    def __init__(self, relay: KvRelay) -> None:
        self.relay = relay

    def collect(self) -> Iterator[GaugeMetricFamily]:
        lag = GaugeMetricFamily(
            "schedscope_kv_relay_lag_seconds",
            "Seconds the KV-event relay trails the engine: age of the oldest queued batch, "
            "else the last sent batch's delay.",
            labels=["exporter"],
        )
        lag.add_metric([self.relay.name], self.relay.lag_seconds())
        queued = GaugeMetricFamily(
            "schedscope_kv_relay_queued_batches",
            "KV batches waiting in the relay's bounded queue.",
            labels=["exporter"],
        )
        queued.add_metric([self.relay.name], self.relay.queue_size())
        yield lag
        yield queued
