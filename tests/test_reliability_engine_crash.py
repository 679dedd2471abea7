"""Engine crash mid-batch (issue 10): a real engine process is SIGKILLed with a batch and a
request open; a new instance (new engine_id, same identity) starts. The sidecar recognises
the new instance as a restart of the old one and ends the old one's open spans with error
status, counted."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from opentelemetry.trace import StatusCode

from schedscope.telemetry.engines import EngineRegistry
from schedscope.telemetry.ingest import Ingest
from schedscope.telemetry.pipeline import in_memory_pipeline
from schedscope.telemetry.sidecar import Sidecar

from .reliability_support import ipc_endpoint, metric_value, prom, wait_for

ENGINE_ID_KEY = "schedscope.engine_id"  # resource attribute (telemetry/spans.py)

# An engine-like process: one finished batch, then a request and a batch left open, then it
# waits to be killed. argv: endpoint, forward_iter of the open batch.
ENGINE = textwrap.dedent(
    """
    import sys, time
    from schedscope.engine.emitter import Emitter
    from schedscope.telemetry import schema as s
    endpoint, fi = sys.argv[1], int(sys.argv[2])
    em = Emitter(s.EngineInfo(model="crash-test", tp_rank=0, dp_rank=0), endpoint)
    t = time.monotonic_ns
    while not em.poll_connection():
        time.sleep(0.01)
    em.emit(s.ReqQueued(t(), f"req-{fi}", 16))
    em.emit(s.BatchLaunched(t(), fi - 1, "prefill", [f"req-{fi}"], 16))
    em.emit(s.BatchDone(t(), fi - 1, "prefill", s.PrefillStats(1, 16, 0, 1, 0, 0.1), None))
    em.emit(s.ReqFirstToken(t(), f"req-{fi}"))
    em.emit(s.BatchLaunched(t(), fi, "decode", [f"req-{fi}"], 1))  # never done: mid-batch
    em.flush()
    print(em.engine_id, flush=True)
    time.sleep(60)
    """
)


def start_engine(endpoint: str, fi: int) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-c", ENGINE, endpoint, str(fi)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().strip()


def test_engine_killed_mid_batch_spans_end_with_error_and_new_instance_is_recognised() -> None:
    endpoint = ipc_endpoint("crash")
    tel = in_memory_pipeline()
    # 0.5 s of silence (heartbeats come every second) is enough here to call it a restart.
    sidecar = Sidecar(Ingest(endpoint), tel.pipeline, registry=EngineRegistry(restart_stale_s=0.5))
    sidecar.start()
    first = second = None
    try:
        first, old_id = start_engine(endpoint, fi=2)
        assert wait_for(lambda: sidecar.process(0.05) or old_id in tel.pipeline.engines)
        assert wait_for(lambda: sidecar.process(0.05) or tel.pipeline.engines[old_id].batches)
        first.kill()  # SIGKILL: no Shutdown event, no flush
        first.wait(10)
        assert wait_for(lambda: sidecar.ingest.counters.unexpected_disconnects >= 1)
        wait_for(lambda: False, timeout=0.7)  # silence longer than restart_stale_s

        second, new_id = start_engine(endpoint, fi=1)
        assert new_id != old_id
        assert wait_for(lambda: sidecar.process(0.05) or new_id in tel.pipeline.engines)
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
                proc.wait(10)
        sidecar.close()

    # The new instance replaced the old one: same identity, new engine_id.
    assert old_id not in tel.pipeline.engines
    assert sidecar.registry.restarts_total == 1
    assert tel.pipeline.engines[new_id].m.engine_restarts.value == 1

    finished = tel.spans.get_finished_spans()
    old_spans = [sp for sp in finished if sp.resource.attributes.get(ENGINE_ID_KEY) == old_id]
    assert old_spans
    errors = [sp for sp in old_spans if sp.status.status_code is StatusCode.ERROR]
    # The open decode batch (forward_iter 2) and the open request ended with error status.
    batch = [sp for sp in errors if sp.attributes.get("schedscope.forward_iter") == 2]
    req = [sp for sp in errors if sp.attributes.get("schedscope.rid") == "req-2"]
    assert len(batch) == 1 and len(req) == 1, [sp.name for sp in errors]
    assert all("restart" in (sp.status.description or "") for sp in batch + req)
    # The finished prefill batch was not touched.
    done = [sp for sp in old_spans if sp.attributes.get("schedscope.forward_iter") == 1]
    assert len(done) == 1 and done[0].status.status_code is not StatusCode.ERROR
    # Counted on /metrics.
    from prometheus_client import generate_latest

    text = generate_latest(tel.registry).decode()
    assert metric_value(text, prom("engine_restarts"), engine_id=new_id) == 1


def test_sidecar_keeps_the_registry_it_is_given() -> None:
    # Regression: `registry or EngineRegistry()` dropped an empty registry (it has __len__),
    # and with it restart_stale_s, so a crashed engine's successor was not recognised.
    registry = EngineRegistry(restart_stale_s=0.5)
    assert Sidecar(Ingest("inproc://unused"), registry=registry).registry is registry
