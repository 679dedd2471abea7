"""The engine's HTTP API end to end on loopback: uvicorn on a free port, httpx as the client,
the scheduler on its own thread — SGLang's native API, as its clients speak it."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
import torch
import uvicorn
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from schedscope.engine.config import EngineConfig
from schedscope.engine.control import ControlledEngine
from schedscope.engine.runner import EngineRunner
from schedscope.engine.server import ServerSettings, check_bind, create_app

from .conftest import free_tcp_port
from .engine_helpers import RecordingEmitter


class Server:
    def __init__(self) -> None:
        self.emitter = RecordingEmitter()
        cfg = EngineConfig(max_total_tokens=1024, max_running_requests=8)
        self.engine = ControlledEngine.create(cfg, emitter=self.emitter)
        self.runner = EngineRunner(self.engine).start()
        self.settings = ServerSettings(port=free_tcp_port())
        config = uvicorn.Config(
            create_app(self.runner, self.settings),
            host="127.0.0.1",
            port=self.settings.port,
            log_level="error",
        )
        self.uvicorn = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.uvicorn.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.uvicorn.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)
        self.url = f"http://127.0.0.1:{self.settings.port}"

    def close(self) -> None:
        self.uvicorn.should_exit = True
        self.thread.join(10)
        self.runner.stop()


@pytest.fixture(scope="module")
def server():
    srv = Server()
    yield srv
    srv.close()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as client:
        yield client
    # Every test leaves the engine unpaused and idle for the next one.
    assert server.runner.call_sync(lambda e: e.paused) is None


def _frames(raw: bytes) -> list:
    """Split an SGLang stream exactly as its clients do; check the framing while at it."""
    assert raw.endswith(b"data: [DONE]\n\n")
    chunks = raw.split(b"\n\n")
    assert chunks[-1] == b""
    out = []
    for chunk in chunks[:-1]:
        assert chunk.startswith(b"data: ") and not chunk.startswith(b"data:  ")
        assert b"\n" not in chunk  # one line of JSON per frame
        body = chunk[len(b"data: ") :]
        out.append(body.decode() if body == b"[DONE]" else json.loads(body))
    return out


def _wait_until(pred, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.005)


def test_info_endpoints(http, server):
    assert http.get("/health").status_code == 200
    models = http.get("/v1/models").json()
    assert models["data"][0]["id"] == "tiny"
    for path in ("/server_info", "/get_server_info"):
        info = http.get(path).json()
        assert info["served_model_name"] == "tiny" and info["port"] == server.settings.port
        assert info["internal_states"][0]["forward_ct"] >= 0
    assert http.get("/model_info").json()["is_generation"] is True


def test_generate_not_streaming(http):
    body = {
        "text": "Hello",
        "sampling_params": {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True},
        "lora_path": None,  # unknown top-level keys are ignored, as SGLang does
        "return_logprob": False,
    }
    r = http.post("/generate", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    assert len(out["output_ids"]) == 6 and isinstance(out["text"], str)
    assert meta["finish_reason"] == {"type": "length", "length": 6}
    assert meta["prompt_tokens"] == 5 and meta["completion_tokens"] == 6
    assert meta["e2e_latency"] > 0 and "cached_tokens" in meta and meta["id"]
    batch = http.post(
        "/generate", json={"text": ["a", "b"], "sampling_params": {"max_new_tokens": 2}}
    )
    assert [len(o["output_ids"]) <= 2 for o in batch.json()] == [True, True]
    ids = http.post(
        "/generate",
        json={"input_ids": [72, 105], "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}},
    )
    assert ids.json()["meta_info"]["prompt_tokens"] == 2


def test_generate_streaming_frames(http, server):
    body = {
        "text": "Stream this",
        "sampling_params": {"max_new_tokens": 8, "ignore_eos": True},
        "stream": True,
    }
    tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    r = http.post("/generate", json=body, headers={"traceparent": tp, "tracestate": "v=1"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    frames = _frames(r.content)
    assert frames[-1] == "[DONE]"
    data = frames[:-1]
    assert len(data) == 8
    for i, f in enumerate(data):
        meta = f["meta_info"]
        assert meta["completion_tokens"] == i + 1 == len(f["output_ids"])
        assert f["text"] == server.runner.tokenizer.decode(f["output_ids"])  # cumulative
        assert (meta["finish_reason"] is None) == (i < 7)
        assert ("e2e_latency" in meta) == (i == 7)
    assert data[-1]["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    queued = [e for e in server.emitter.events if type(e).__name__ == "ReqQueued"]
    assert queued[-1].traceparent == tp and queued[-1].rid == data[0]["meta_info"]["id"]
    assert queued[-1].tracestate == "v=1"
    bad = {"text": "x", "sampling_params": {"max_new_tokens": 1}}
    http.post("/generate", json=bad, headers={"traceparent": "garbage", "tracestate": "a=b"})
    queued = [e for e in server.emitter.events if type(e).__name__ == "ReqQueued"]
    assert queued[-1].traceparent is None and queued[-1].tracestate is None


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"sampling_params": {}}, "exactly one of 'text' or 'input_ids'"),
        ({"text": "x", "input_ids": [1]}, "exactly one of"),
        ({"text": "x", "sampling_params": {"max_tokens": 3}}, "unknown sampling_params"),
        ({"text": "x", "sampling_params": {"max_new_tokens": "3"}}, "wrong type"),
        ({"text": "x", "sampling_params": {"temperature": -1}}, "temperature"),
        ({"text": "x", "sampling_params": {"max_new_tokens": 5000}}, "exceeds"),
        ({"input_ids": [1, 99999]}, "vocabulary"),
        ({"text": 5}, "'text' must be"),
        ({"text": "x", "stream": "yes"}, "'stream' must be a boolean"),
        ({"text": ["a", "b"], "stream": True}, "batch"),
    ],
)
def test_bad_generate_requests_are_4xx_json(http, body, needle):
    r = http.post("/generate", json=body)
    assert 400 <= r.status_code < 500
    assert needle in r.json()["error"]


def test_bad_bodies_and_routes(http):
    r = http.post("/generate", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]
    assert http.post("/generate", json=[1, 2]).status_code == 400
    assert http.get("/nope").json() == {"error": "Not Found"}
    r = http.post("/pause_generation", json={"mode": "sideways"})
    assert r.status_code == 400 and "unknown pause mode" in r.json()["error"]
    r = http.post("/update_weights_from_disk", json={"model_path": "/does/not/exist.safetensors"})
    assert r.status_code == 400 and "does not exist" in r.json()["error"]
    r = http.post("/set_internal_state", json={"server_args": {"page_size": 8}})
    assert r.status_code == 400 and "cannot be set" in r.json()["error"]
    r = http.post("/flush_cache?timeout=soon")
    assert r.status_code == 400 and "timeout" in r.json()["error"]


def _start_long_stream(http_url: str, frames: list, n: int = 400) -> threading.Thread:
    def run() -> None:
        body = {
            "text": "long",
            "sampling_params": {"max_new_tokens": n, "ignore_eos": True},
            "stream": True,
        }
        with (
            httpx.Client(base_url=http_url, timeout=60) as c,
            c.stream("POST", "/generate", json=body) as r,
        ):
            buf = b""
            for chunk in r.iter_bytes():
                buf += chunk
                frames[:] = _frames(buf) if buf.endswith(b"[DONE]\n\n") else [buf]

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _running(server) -> int:
    return server.runner.call_sync(lambda e: len(e.scheduler.running))


def test_pause_abort_ends_a_live_stream_then_continue(http, server):
    frames: list = []
    t = _start_long_stream(server.url, frames)
    _wait_until(lambda: _running(server) == 1)
    r = http.post("/pause_generation", json={"mode": "abort"})
    assert r.status_code == 200 and r.json()["success"]
    t.join(20)
    assert frames[-1] == "[DONE]"
    assert frames[-2]["meta_info"]["finish_reason"]["type"] == "abort"
    again = http.post("/pause_generation", json={"mode": "in_place"})
    assert again.status_code == 409 and "already paused" in again.json()["error"]
    assert server.engine.scheduler.last_gen_throughput == 0.0
    assert http.post("/continue_generation").status_code == 200
    r = http.post("/continue_generation")
    assert r.status_code == 409 and "not paused" in r.json()["error"]


def test_pause_retract_then_the_request_finishes_after_continue(http, server):
    frames: list = []
    t = _start_long_stream(server.url, frames, n=60)
    _wait_until(lambda: _running(server) == 1)
    assert http.post("/pause_generation", json={"mode": "retract"}).status_code == 200
    state = http.get("/get_internal_state").json()[0]
    assert state["paused"] == "retract" and state["waiting_queue_size"] == 1
    assert state["in_use_slots"] == 0  # its KV was freed
    assert http.post("/continue_generation").status_code == 200
    t.join(30)
    assert frames[-2]["meta_info"]["finish_reason"] == {"type": "length", "length": 60}


def test_flush_cache_refused_while_running_accepted_when_idle(http, server):
    frames: list = []
    t = _start_long_stream(server.url, frames, n=150)
    _wait_until(lambda: _running(server) == 1)
    r = http.post("/flush_cache")
    assert 400 <= r.status_code < 500 and "not fully idle" in r.json()["error"]
    assert "running" in r.json()["error"]
    # With a timeout it waits for the engine to go idle, then flushes.
    r = http.post("/flush_cache?timeout=30")
    assert r.status_code == 200 and r.json()["success"]
    t.join(30)
    assert frames[-2]["meta_info"]["finish_reason"]["type"] == "length"
    assert server.runner.call_sync(lambda e: e.scheduler.tree.total_size) == 0


def test_profile_weights_and_internal_state(http, server, tmp_path):
    r = http.post(
        "/start_profile", json={"output_dir": str(tmp_path), "num_steps": 2, "activities": ["CPU"]}
    )
    assert r.status_code == 200
    r2 = http.post("/start_profile", json={"output_dir": str(tmp_path)})
    assert r2.status_code == 409 and "already in progress" in r2.json()["error"]
    http.post(
        "/generate",
        json={"text": "p", "sampling_params": {"max_new_tokens": 4, "ignore_eos": True}},
    )
    _wait_until(lambda: list(tmp_path.glob("*.trace.json")))
    assert http.post("/stop_profile").status_code == 409  # it stopped by itself

    model = server.engine.scheduler.runner.model
    name, param = next(iter(model.named_parameters()))
    path = tmp_path / "w.safetensors"
    save_file({name: param.detach().clone().contiguous()}, str(path))  # same values: harmless
    r = http.post("/update_weights_from_disk", json={"model_path": str(path)})
    assert r.status_code == 200 and "updated 1 tensors" in r.json()["message"]
    bad = tmp_path / "bad.safetensors"
    save_file({name: torch.zeros(2, 2)}, str(bad))
    r = http.post("/update_weights_from_disk", json={"model_path": str(bad)})
    assert r.status_code == 400 and "shape mismatch" in r.json()["error"]

    r = http.post("/set_internal_state", json={"server_args": {"max_running_requests": 4}})
    assert r.status_code == 200 and r.json()[0]["server_args"]["max_running_requests"] == 4
    assert http.get("/get_internal_state").json()[0]["max_running_requests"] == 4
    http.post("/set_internal_state", json={"max_running_requests": 8})


def test_many_short_connections(server):
    def one(i: int) -> int:
        with httpx.Client(base_url=server.url, timeout=30) as c:  # a new connection each
            body = {"text": f"q{i}", "sampling_params": {"max_new_tokens": 2}}
            return c.post("/generate", json=body).status_code

    results: list[int] = []
    threads = [threading.Thread(target=lambda i=i: results.append(one(i))) for i in range(24)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with httpx.Client(base_url=server.url, timeout=30) as c:
        for _ in range(100):
            assert c.get("/health", headers={"connection": "close"}).status_code == 200
    assert results == [200] * 24


def test_idle_engine_does_not_spin(server):
    _wait_until(lambda: server.runner.call_sync(lambda e: e.idle.idle))
    turns = server.runner.iterations
    cpu = time.process_time()
    time.sleep(1.0)
    cpu_used = time.process_time() - cpu
    # The whole process (scheduler, uvicorn, pytest) while idle: a spinning loop would burn a
    # full core (~1 s). The idle loop wakes about once a second for heartbeats.
    assert cpu_used < 0.2, cpu_used
    assert server.runner.iterations - turns <= 5


# -- the admin token off loopback (TestClient: no real non-loopback socket needed) -------------


def test_admin_token_required_off_loopback(server):
    with pytest.raises(ValueError, match="without an admin token"):
        check_bind(ServerSettings(host="0.0.0.0"))
    check_bind(ServerSettings(host="127.0.0.1"))
    check_bind(ServerSettings(host="::1"))
    app = create_app(server.runner, ServerSettings(host="0.0.0.0", admin_token="s3cret"))
    with TestClient(app) as c:
        r = c.get("/get_internal_state")
        assert r.status_code == 401 and "Bearer" in r.json()["error"]
        r = c.post("/flush_cache", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401
        ok = c.get("/get_internal_state", headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200
        # Generation and info stay public.
        assert c.get("/v1/models").status_code == 200
        gen = c.post("/generate", json={"text": "x", "sampling_params": {"max_new_tokens": 1}})
        assert gen.status_code == 200


def test_cli_refuses_non_loopback_without_token(capsys, monkeypatch):
    from schedscope.cli.main import run

    monkeypatch.delenv("SCHEDSCOPE_ADMIN_TOKEN", raising=False)
    code = run(["engine", "serve", "--host", "0.0.0.0", "--port", str(free_tcp_port())])
    assert code == 2
    assert "admin token" in capsys.readouterr().err


def test_error_after_the_stream_began_is_an_error_frame_then_done():
    import asyncio

    from schedscope.engine.runner import TokenUpdate
    from schedscope.engine.server import _stream
    from schedscope.engine.tokenizer import ByteTokenizer

    class FakeRunner:
        tokenizer = ByteTokenizer()

        def abort(self, rid: str) -> None:
            pass

    async def main() -> bytes:
        q: asyncio.Queue = asyncio.Queue()
        q.put_nowait(TokenUpdate("r1", [65], 1))
        q.put_nowait(
            TokenUpdate("r1", [65], 1, finished=True, error="engine stopped: boom", error_code=503)
        )
        return b"".join([f async for f in _stream(None, FakeRunner(), "r1", q, 0.0, 5.0)])

    frames = _frames(asyncio.run(main()))
    assert frames[0]["text"] == "A" and frames[0]["meta_info"]["finish_reason"] is None
    assert frames[1] == {
        "error": {"message": "engine stopped: boom", "type": "engine_error", "code": 503}
    }
    assert frames[2] == "[DONE]"


def test_client_disconnect_mid_stream_aborts_the_request(server):
    body = {
        "text": "bye",
        "sampling_params": {"max_new_tokens": 500, "ignore_eos": True},
        "stream": True,
    }
    with (
        httpx.Client(base_url=server.url, timeout=30) as c,
        c.stream("POST", "/generate", json=body) as r,
    ):
        for _ in r.iter_bytes():
            break  # first frame seen: hang up
    _wait_until(lambda: server.runner.call_sync(lambda e: e.is_fully_idle()))
    aborted = [e for e in server.emitter.events if type(e).__name__ == "ReqAborted"]
    assert aborted and aborted[-1].output_tokens < 500
