"""KV re-sync after a sidecar restart, the engine's half (issue 10; README "Reliability and
security"): when the emitter connects to a new sidecar (``Emitter.connects`` goes up), the
engine re-announces its cache — AllBlocksCleared, then BlockStored for every block it holds —
so the restarted relay's consumers rebuild exactly the cache. The sidecar restart test
(test_reliability_sidecar_restart.py) checks the relay and consumer half with real processes.
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from schedscope.engine.sampling import SamplingParams
from schedscope.telemetry import schema as s

from .engine_helpers import RecordingEmitter, prompts, tiny_engine


class ReconnectingEmitter(RecordingEmitter):
    """Counts connections like Emitter.connects; the test bumps it to stand for a new
    sidecar accepting the connection."""

    connects = 1


def apply(blocks: dict[int, str | None], events: list) -> None:
    """A router's view: block hash -> medium."""
    for ev in events:
        if isinstance(ev, s.KvEvents):
            for kv in ev.events:
                if isinstance(kv, s.AllBlocksCleared):
                    blocks.clear()
                elif isinstance(kv, s.BlockStored):
                    blocks.update(dict.fromkeys(kv.block_hashes, kv.medium))
                elif isinstance(kv, s.BlockRemoved):
                    for h in kv.block_hashes:
                        blocks.pop(h, None)


def test_engine_reannounces_its_cache_when_a_new_sidecar_connects() -> None:
    em = ReconnectingEmitter()
    engine = tiny_engine(emitter=em)
    try:
        sampling = SamplingParams(max_new_tokens=4)
        for p in prompts(4, length=40):
            engine.submit(p, sampling)
        engine.run_until_idle()
        truth: dict[int, str | None] = {}
        apply(truth, em.events)
        assert truth  # the cache holds blocks

        # A new sidecar: its relay's consumers know nothing. One more step of work.
        em.connects += 1
        mark = len(em.events)
        engine.submit(prompts(1, length=40, shared="another ")[0], sampling)
        engine.run_until_idle()
        after = em.events[mark:]
        apply(truth, after)

        cleared = [
            i
            for i, ev in enumerate(after)
            if isinstance(ev, s.KvEvents)
            and any(isinstance(k, s.AllBlocksCleared) for k in ev.events)
        ]
        assert cleared, "no AllBlocksCleared re-announcement after the new connection"
        # A consumer that starts from the re-announcement sees exactly the cache.
        view: dict[int, str | None] = {}
        apply(view, after[cleared[0] :])
        assert view == truth
    finally:
        engine.close()
