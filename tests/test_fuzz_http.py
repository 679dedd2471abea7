"""Bad input on the reference engine's HTTP API (issue 10): random JSON and bytes to every
endpoint that takes a body get a 2xx or a 4xx with a JSON error, never a 5xx or a hang; admin
endpoints exposed beyond loopback refuse requests without the token."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("torch")
from fastapi.testclient import TestClient

from schedscope.engine.config import EngineConfig
from schedscope.engine.control import ControlledEngine
from schedscope.engine.emitter import NullEmitter
from schedscope.engine.runner import EngineRunner
from schedscope.engine.server import ServerSettings, create_app

FUZZ = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12,
)
# Small or wrong-typed max_new_tokens only: a valid huge one is a legitimate long request.
small_or_bad = (
    st.integers(-5, 4)
    | st.text(max_size=4)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.none()
    | st.booleans()
)
sampling = st.dictionaries(
    st.sampled_from(
        ["max_new_tokens", "temperature", "top_p", "top_k", "ignore_eos", "stop", "seed", "bogus"]
    ),
    small_or_bad | json_values,
    max_size=4,
).map(lambda d: {**d, "max_new_tokens": d.get("max_new_tokens", 2)})
generate_bodies = st.fixed_dictionaries(
    {},
    optional={
        "text": st.text(max_size=20) | st.lists(st.text(max_size=8), max_size=3) | json_values,
        "input_ids": st.lists(st.integers(-(2**40), 2**40), max_size=6) | json_values,
        "sampling_params": sampling | json_values.filter(lambda v: not isinstance(v, dict)),
        "stream": st.booleans() | json_values,
        "lora_path": json_values,
        "rid": json_values,
    },
).map(lambda b: b if "stream" in b and b["stream"] is not True else {**b, "stream": False})


@pytest.fixture(scope="module")
def client():
    cfg = EngineConfig(max_total_tokens=512, max_running_requests=4)
    engine = ControlledEngine.create(cfg, emitter=NullEmitter())
    runner = EngineRunner(engine).start()
    # Bound the wait for tokens: a fuzzed request must never hang the test.
    app = create_app(runner, ServerSettings(request_timeout_s=30.0))
    with TestClient(app, raise_server_exceptions=False) as c:
        yield c
    runner.stop()


def check(resp) -> None:
    assert resp.status_code < 500, (resp.status_code, resp.text[:300])
    if resp.status_code >= 400:
        assert "error" in resp.json()


@FUZZ
@given(generate_bodies)
def test_generate_never_answers_5xx(client, body) -> None:
    check(client.post("/generate", json=body))


BODY_PATHS = ("/generate", "/set_internal_state", "/update_weights_from_disk")


@FUZZ
@given(st.text(max_size=60).map(str.encode))
def test_bodies_that_are_not_json_get_4xx(client, raw: bytes) -> None:
    for path in BODY_PATHS:
        check(client.post(path, content=raw, headers={"content-type": "application/json"}))


def test_a_body_that_is_not_utf8_gets_4xx(client) -> None:
    for path in BODY_PATHS:
        check(client.post(path, content=b"\x80{", headers={"content-type": "application/json"}))


@FUZZ
@given(json_values, st.sampled_from(["abort", "retract", "in_place", "sideways", 3, None]))
def test_admin_endpoints_never_answer_5xx(client, body, mode) -> None:
    check(client.post("/set_internal_state", json=body))
    check(client.post("/update_weights_from_disk", json=body))
    resp = client.post("/pause_generation", json={"mode": mode})
    check(resp)
    if resp.status_code == 200:  # leave the engine running for the next example
        assert client.post("/continue_generation").status_code == 200
    check(client.post("/flush_cache", params={"timeout": json.dumps(body)[:20]}))


def test_exposed_admin_endpoints_need_the_token() -> None:
    cfg = EngineConfig(max_total_tokens=512, max_running_requests=4)
    engine = ControlledEngine.create(cfg, emitter=NullEmitter())
    runner = EngineRunner(engine).start()
    app = create_app(runner, ServerSettings(host="0.0.0.0", admin_token="s3cret"))
    try:
        with TestClient(app, raise_server_exceptions=False) as c:
            for path in ("/get_internal_state",):
                assert c.get(path).status_code in (401, 403)
                bad = {"Authorization": "Bearer wrong"}
                assert c.get(path, headers=bad).status_code in (401, 403)
                good = {"Authorization": "Bearer s3cret"}
                assert c.get(path, headers=good).status_code == 200
            assert c.post("/pause_generation", json={"mode": "abort"}).status_code in (401, 403)
            assert c.get("/health").status_code == 200  # not an admin endpoint
    finally:
        runner.stop()
