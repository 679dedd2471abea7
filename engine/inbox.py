"""The scheduler thread's inbox: thread-safe, and something it can block on while idle.

Items travel in a deque (append/popleft are atomic under the GIL); every put also sends one
empty frame on an inproc PUSH socket whose PULL end the scheduler polls. So the idle scheduler
sleeps in ``zmq.Poller.poll`` and wakes the moment work arrives, instead of spinning (seed 003's
IdleSleeper). A wake-up frame without an item (already drained) is harmless; an item is always
appended before its wake-up is sent, so no wake-up is ever lost.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from collections import deque
from typing import Any

import zmq

_ids = itertools.count()


class Inbox:
    def __init__(self, context: zmq.Context | None = None) -> None:
        self._ctx = context or zmq.Context.instance()
        self.address = f"inproc://schedscope-inbox-{next(_ids)}"
        self._pull = self._ctx.socket(zmq.PULL)
        self._pull.setsockopt(zmq.LINGER, 0)
        self._pull.bind(self.address)
        self._push = self._ctx.socket(zmq.PUSH)
        self._push.setsockopt(zmq.LINGER, 0)
        self._push.connect(self.address)
        # ZMQ sockets are not thread-safe; producers (HTTP handlers, the offload thread) share
        # the PUSH end under this lock. Only the scheduler thread touches the PULL end.
        self._push_lock = threading.Lock()
        self._items: deque[Any] = deque()
        self._poller = zmq.Poller()
        self._poller.register(self._pull, zmq.POLLIN)
        self._closed = False

    def put(self, item: Any) -> None:
        self._items.append(item)
        self.wake()

    def wake(self) -> None:
        """Wake the scheduler without an item (e.g. an offload finished)."""
        with self._push_lock:
            if self._closed:
                return
            # Again: the queue is full of wake-ups already, the scheduler will wake anyway.
            with contextlib.suppress(zmq.Again):
                self._push.send(b"", zmq.NOBLOCK)

    def drain(self) -> list[Any]:
        """Take everything queued (scheduler thread only)."""
        while True:
            try:
                self._pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                break
        out = []
        while self._items:
            out.append(self._items.popleft())
        return out

    def __len__(self) -> int:
        return len(self._items)

    def wait(self, timeout_s: float) -> bool:
        """Block until something arrives or ``timeout_s`` passes; True when woken."""
        if self._items:
            return True
        return bool(self._poller.poll(max(0, int(timeout_s * 1000))))

    def close(self) -> None:
        with self._push_lock:
            self._closed = True
            self._push.close(linger=0)
        self._pull.close(linger=0)
