"""Issue 18, the engine half: no single request, knob or body takes the engine down.

The real engine (tiny CPU model) on its scheduler thread, the real app through TestClient; each
test fails on the code before the hardening (the scheduler thread died, a 500, another client's
request aborted, the internal state leaked)."""

from __future__ import annotations

import json
import threading

import pytest
from fastapi.testclient import TestClient

from schedscope.engine import model_runner
from schedscope.engine.config import EngineConfig
from schedscope.engine.control import ControlledEngine
from schedscope.engine.runner import EngineRunner, GenerateInput, TokenUpdate
from schedscope.engine.sampling import SamplingParams
from schedscope.engine.server import ServerSettings, create_app

from .engine_helpers import RecordingEmitter

OK = {"text": "hello", "sampling_params": {"max_new_tokens": 2, "ignore_eos": True}}


@pytest.fixture(scope="module")
def runner():
    cfg = EngineConfig(max_total_tokens=1024, max_running_requests=8)
    eng = ControlledEngine.create(cfg, emitter=RecordingEmitter())
    r = EngineRunner(eng).start()
    yield r
    r.stop()


@pytest.fixture(scope="module")
def client(runner):
    with TestClient(create_app(runner, ServerSettings())) as c:
        yield c


def _serves(client: TestClient) -> None:
    r = client.post("/generate", json=OK)
    assert r.status_code == 200, r.text
    assert r.json()["meta_info"]["finish_reason"]["type"] == "length"


@pytest.mark.parametrize(
    ("params", "needle"),
    [
        ({"temperature": 1e-40}, "temperature"),
        ({"temperature": float("nan")}, "temperature must be a finite"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": 10**400}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"top_k": 2**70}, "top_k"),
        ({"seed": 2**64}, "seed"),
        ({"seed": -1}, "seed"),
        ({"max_new_tokens": 2**70}, "max_new_tokens"),
        ({"stop_token_ids": [2**70]}, "stop_token_ids"),
    ],
)
def test_bad_sampling_numbers_are_400_and_the_engine_serves_on(client, runner, params, needle):
    sp = {"max_new_tokens": 2, "temperature": 0.7, **params}
    # json.dumps writes NaN/Infinity literals, which Python's json (the server's) accepts.
    r = client.post("/generate", content=json.dumps({"text": "x", "sampling_params": sp}))
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]
    assert runner.alive
    _serves(client)


@pytest.mark.parametrize(
    "knobs",
    [
        {"kv_load_interval_s": 1e300},
        {"kv_load_interval_s": float("inf")},
        {"kv_load_interval_s": float("nan")},
        {"max_prefill_tokens": 1e300},
        {"decode_log_interval": 10**400},
        {"min_new_token_ratio": 0.5, "kv_load_interval_s": float("inf")},
    ],
)
def test_absurd_internal_state_knobs_are_refused_and_nothing_applies(client, runner, knobs):
    before = runner.call_sync(lambda e: e.get_internal_state())
    r = client.post("/set_internal_state", content=json.dumps({"server_args": knobs}))
    assert r.status_code == 400, r.text
    assert "must be" in r.json()["error"]
    assert runner.call_sync(lambda e: e.get_internal_state()) == before
    _serves(client)


def test_one_failing_request_ends_with_an_error_and_the_engine_serves_on(
    client, runner, monkeypatch
):
    real = model_runner.sample

    def sample(logits, params, generators):
        if any(p.seed == 4242 for p in params):
            raise RuntimeError("injected sampling failure")
        return real(logits, params, generators)

    monkeypatch.setattr(model_runner, "sample", sample)
    bad = {"text": "x", "sampling_params": {"max_new_tokens": 4, "temperature": 0.5, "seed": 4242}}
    r = client.post("/generate", json=bad)
    assert r.status_code == 200, r.text
    reason = r.json()["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and "injected sampling failure" in reason["message"]
    assert reason["message"].startswith("error:")
    assert runner.alive and runner.call_sync(lambda e: e.step_failures) >= 1
    _serves(client)
    assert client.get("/health").status_code == 200


def test_a_reused_in_flight_rid_is_400_and_the_other_request_goes_on(client, runner):
    finals: list[TokenUpdate] = []
    done = threading.Event()

    def sink(u: TokenUpdate) -> None:
        if u.finished or u.error:
            finals.append(u)
            done.set()

    # Paused in place, the first request is in flight for as long as the test needs.
    assert client.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    try:
        params = SamplingParams(max_new_tokens=3, ignore_eos=True)
        runner.submit(GenerateInput("shared-rid", [1, 2, 3], params), sink)
        runner.call_sync(lambda e: None)  # the submit is taken before the next request
        r = client.post("/generate", json={**OK, "rid": "shared-rid"})
        assert r.status_code == 400 and "duplicate" in r.json()["error"]
    finally:
        assert client.post("/continue_generation").status_code == 200
    assert done.wait(30)
    assert finals[0].error is None
    assert finals[0].finish_reason == {"type": "length", "length": 3}


def test_body_size_limit_is_413(runner):
    settings = ServerSettings(max_body_bytes=1000)
    with TestClient(create_app(runner, settings)) as c:
        big = {"text": "a" * 2000, "sampling_params": {"max_new_tokens": 1}}
        r = c.post("/generate", json=big)
        assert r.status_code == 413 and "too large" in r.json()["error"]
        # No Content-Length (chunked): counted while reading.
        r = c.post("/generate", content=iter([b'{"text": "', b"a" * 2000, b'"}']))
        assert r.status_code == 413
        assert c.post("/generate", json=OK).status_code == 200
    assert ServerSettings().max_body_bytes == 1 << 20


def test_deeply_nested_json_is_400(client):
    r = client.post("/generate", content=b"[" * 100_000 + b"]" * 100_000)
    assert r.status_code == 400 and "nested" in r.json()["error"]
    _serves(client)


def test_start_profile_with_a_bad_output_dir_is_400(client, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    for out in (str(blocker / "sub"), "/proc/nope", "bad\x00dir"):
        r = client.post("/start_profile", json={"output_dir": out})
        assert r.status_code == 400, r.text
        assert "output_dir" in r.json()["error"]
    _serves(client)


def test_server_info_hides_the_internal_state_without_the_token(runner):
    settings = ServerSettings(host="0.0.0.0", admin_token="s3cret")
    with TestClient(create_app(runner, settings)) as c:
        info = c.get("/server_info").json()
        assert "internal_states" not in info and info["served_model_name"] == "tiny"
        info = c.get("/server_info", headers={"Authorization": "Bearer s3cret"}).json()
        assert info["internal_states"][0]["forward_ct"] >= 0
    # A token set on loopback guards it too.
    with TestClient(create_app(runner, ServerSettings(admin_token="s3cret"))) as c:
        assert "internal_states" not in c.get("/get_server_info").json()
