"""The telemetry layer fed by the real reference engine over a real socket (issue 6): with
overlap scheduling on, the batch spans carry exactly the forward_iters the engine launched,
no anomaly is counted, and each request span links to batch spans it ran in."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from schedscope.engine.config import EngineConfig
from schedscope.engine.emitter import Emitter
from schedscope.engine.engine import Engine, engine_info
from schedscope.engine.sampling import SamplingParams
from schedscope.telemetry.ingest import Ingest
from schedscope.telemetry.pipeline import in_memory_pipeline
from schedscope.telemetry.sidecar import Sidecar

from .conftest import wait_until
from .engine_helpers import prompts


class Tee:
    """Forwards to the real Emitter and remembers the forward_iters the engine launched."""

    def __init__(self, inner: Emitter) -> None:
        self.inner = inner
        self.enabled = True
        self.engine_id = inner.engine_id
        self.launched: list[int] = []

    def emit(self, event) -> None:
        if type(event).__name__ == "BatchLaunched":
            self.launched.append(event.forward_iter)
        self.inner.emit(event)

    def end_step(self) -> None:
        self.inner.end_step()

    def flush(self) -> None:
        self.inner.flush()

    def close(self, reason: str = "shutdown") -> None:
        self.inner.close(reason)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlap", "normal"])
def test_real_engine_batch_spans_have_exactly_its_forward_iters(
    ipc_endpoint: str, overlap: bool
) -> None:
    t = in_memory_pipeline()
    sidecar = Sidecar(Ingest(ipc_endpoint).start(), t.pipeline)
    cfg = EngineConfig(
        model="tiny",
        device="cpu",
        max_total_tokens=2048,
        max_running_requests=16,
        enable_overlap=overlap,
    )
    tee = Tee(Emitter(engine_info(cfg), ipc_endpoint, flush_interval_s=0.002))
    engine = Engine(cfg, emitter=tee)
    try:
        assert wait_until(lambda: tee.inner.connected, 10)
        results = engine.generate(prompts(6, length=40), SamplingParams(max_new_tokens=12))
        assert all(r.completion_tokens == 12 for r in results)
        tee.flush()

        def batch_spans():
            sidecar.process(timeout=0.05)
            return [s for s in t.spans.get_finished_spans() if s.name.startswith("batch")]

        assert wait_until(lambda: len(batch_spans()) >= len(tee.launched), 10)
        iters = sorted(s.attributes["schedscope.forward_iter"] for s in batch_spans())
        assert len(tee.launched) >= 12  # a prefill, then a decode step per further token
        assert iters == sorted(tee.launched) == list(range(1, len(tee.launched) + 1))
        anomalies = t.pipeline.store.family("forward_iter_anomalies")
        assert sum(v for _, v in anomalies.values()) == 0

        batch_ids = {s.context.span_id for s in batch_spans()}
        reqs = [
            s
            for s in t.spans.get_finished_spans()
            if s.attributes.get("gen_ai.usage.output_tokens") == 12
        ]
        assert len(reqs) == 6
        assert all(r.links and {ln.context.span_id for ln in r.links} <= batch_ids for r in reqs)
    finally:
        engine.close()
        sidecar.ingest.stop()
