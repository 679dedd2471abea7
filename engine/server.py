"""HTTP API of the reference engine: SGLang's native API, over the scheduler thread.

The routes mirror SGLang 0.5's server (DESIGN §3) so its clients, load generators and benchmark
scripts work unchanged. Handlers never touch the engine: generation goes through the runner's
inbox and comes back on a per-request asyncio queue; control commands run *on the scheduler
thread* (``runner.call``), between steps, and their refusals become 4xx JSON ``{"error": ...}``.

Admin endpoints (pause, flush, weights, profile, internal state) need a bearer token when the
server listens on a non-loopback address; ``serve`` refuses to start there without one.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, fields
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from schedscope import __version__
from schedscope.engine.control_errors import ControlError
from schedscope.engine.runner import EngineRunner, GenerateInput, TokenUpdate
from schedscope.engine.sampling import SamplingParams

ENV_ADMIN_TOKEN = "SCHEDSCOPE_ADMIN_TOKEN"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 30000
DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any real prompt batch, far below harm

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}")
_SAMPLING_KEYS = {f.name for f in fields(SamplingParams)}
_SAMPLING_TYPES: dict[str, tuple[type, ...]] = {
    "max_new_tokens": (int,),
    "temperature": (int, float),
    "top_p": (int, float),
    "top_k": (int,),
    "ignore_eos": (bool,),
    "stop_token_ids": (list,),
    "seed": (int,),
}


class ApiError(Exception):
    """A bad request: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class ServerSettings:
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    admin_token: str | None = None
    # Cap on one streaming request's wait for a token; the engine being paused is not an
    # error, so this is long.
    request_timeout_s: float = 3600.0
    # Bodies past this are refused with 413 while reading, before they are held in memory.
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES

    @property
    def requires_token(self) -> bool:
        return not is_loopback(self.host)


def is_loopback(host: str) -> bool:
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: may resolve anywhere, treat as exposed


def check_bind(settings: ServerSettings) -> None:
    """Refuse to expose admin endpoints without a token."""
    if settings.requires_token and not settings.admin_token:
        raise ValueError(
            f"refusing to listen on non-loopback address {settings.host!r} without an admin "
            f"token: pass --admin-token or set ${ENV_ADMIN_TOKEN}"
        )


# ---------------------------------------------------------------------------------------------
# Request parsing (SGLang's GenerateReqInput, the parts the engine implements)
# ---------------------------------------------------------------------------------------------


def parse_sampling_params(raw: Any) -> SamplingParams:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ApiError("sampling_params must be a JSON object")
    unknown = sorted(set(raw) - _SAMPLING_KEYS)
    if unknown:
        raise ApiError(f"unknown sampling_params {unknown}; supported: {sorted(_SAMPLING_KEYS)}")
    for key, value in raw.items():
        if value is None and key == "seed":
            continue
        ok_types = _SAMPLING_TYPES[key]
        if isinstance(value, bool) and bool not in ok_types:
            raise ApiError(f"sampling_params.{key} must be a number, got {value!r}")
        if not isinstance(value, ok_types):
            raise ApiError(f"sampling_params.{key} has the wrong type: {value!r}")
    if "stop_token_ids" in raw and not all(
        isinstance(t, int) and not isinstance(t, bool) for t in raw["stop_token_ids"]
    ):
        raise ApiError("sampling_params.stop_token_ids must be a list of integers")
    params = SamplingParams(**raw)
    try:
        params.validate()
    except ValueError as exc:
        raise ApiError(f"invalid sampling_params: {exc}") from None
    return params


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in value
    )


def parse_prompts(body: dict[str, Any], encode: Any) -> tuple[list[list[int]], bool]:
    """The prompt(s) as token ids, and whether the request was a batch (list)."""
    text, ids = body.get("text"), body.get("input_ids")
    if (text is None) == (ids is None):
        raise ApiError("exactly one of 'text' or 'input_ids' is required")
    if text is not None:
        if isinstance(text, str):
            return [encode(text)], False
        if isinstance(text, list) and text and all(isinstance(t, str) for t in text):
            return [encode(t) for t in text], True
        raise ApiError("'text' must be a string or a non-empty list of strings")
    if _is_ids(ids) and ids:
        return [ids], False
    if isinstance(ids, list) and ids and all(_is_ids(x) and x for x in ids):
        return list(ids), True
    raise ApiError("'input_ids' must be a non-empty list of integers (or a list of such lists)")


# ---------------------------------------------------------------------------------------------
# Responses
# ---------------------------------------------------------------------------------------------


def _meta(rid: str, u: TokenUpdate, started: float) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "id": rid,
        "finish_reason": u.finish_reason if u.finished else None,
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": len(u.output_ids),
        "cached_tokens": u.cached_tokens,
    }
    if u.finished:
        meta["e2e_latency"] = time.perf_counter() - started
    return meta


def _frame(obj: Any) -> bytes:
    # One line of JSON after exactly one space: what SGLang's clients split on.
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"


DONE_FRAME = b"data: [DONE]\n\n"


def _json(obj: Any, status: int = 200) -> JSONResponse:
    return JSONResponse(obj, status_code=status)


def _error(message: str, status: int) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------


def create_app(runner: EngineRunner, settings: ServerSettings | None = None) -> FastAPI:
    settings = settings or ServerSettings()
    check_bind(settings)
    app = FastAPI(title="schedscope reference engine", version=__version__)
    app.state.runner = runner
    app.state.settings = settings

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(str(exc), exc.status)

    @app.exception_handler(ControlError)
    async def _control_error(_: Request, exc: ControlError) -> JSONResponse:
        return _error(str(exc), exc.status)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(f"invalid request: {exc.errors()}", 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(str(exc.detail), exc.status_code)

    async def admin(request: Request) -> None:
        if not settings.requires_token:
            return
        header = request.headers.get("authorization", "")
        token = header[7:] if header.lower().startswith("bearer ") else ""
        expected = settings.admin_token or ""
        if not token or not hmac.compare_digest(token.encode(), expected.encode()):
            raise ApiError(
                "admin endpoint: send 'Authorization: Bearer <admin token>' "
                "(the server is bound to a non-loopback address)",
                401,
            )

    async def body_of(request: Request, *, required: bool = True) -> dict[str, Any]:
        raw = await _read_capped(request, settings.max_body_bytes)
        if not raw.strip():
            if required:
                raise ApiError("a JSON object body is required")
            return {}
        try:
            body = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError, and UnicodeDecodeError for non-UTF-8
            raise ApiError(f"body is not valid JSON: {exc}") from None
        except RecursionError:
            raise ApiError("body is nested too deeply") from None
        if not isinstance(body, dict):
            raise ApiError("body must be a JSON object")
        return body

    # -- generation ----------------------------------------------------------------------------

    @app.post("/generate")
    async def generate(request: Request) -> Response:
        body = await body_of(request)
        prompts, batched = parse_prompts(body, runner.tokenizer.encode)
        params = parse_sampling_params(body.get("sampling_params"))
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise ApiError("'stream' must be a boolean")
        if stream and batched:
            raise ApiError("streaming a batch of prompts is not supported; send one prompt")
        for ids in prompts:
            runner.check_prompt(ids, params)  # raises ControlError (400) with the limit
        rid_in = body.get("rid")
        base_rid = rid_in if isinstance(rid_in, str) and rid_in else uuid.uuid4().hex
        # W3C trace context: an invalid traceparent is ignored (the spec's rule), and
        # tracestate only means something next to a valid one.
        traceparent = request.headers.get("traceparent")
        if traceparent is not None and not _TRACEPARENT.fullmatch(traceparent.strip().lower()):
            traceparent = None
        tracestate = request.headers.get("tracestate") if traceparent else None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()

        def start(i: int, ids: list[int]) -> tuple[str, asyncio.Queue[TokenUpdate]]:
            rid = base_rid if not batched else f"{base_rid}-{i}"
            queue: asyncio.Queue[TokenUpdate] = asyncio.Queue()
            inp = GenerateInput(rid, list(ids), params, traceparent, tracestate, stream)
            runner.submit(inp, lambda u: loop.call_soon_threadsafe(queue.put_nowait, u))
            return rid, queue

        if stream:
            rid, queue = start(0, prompts[0])
            return StreamingResponse(
                _stream(request, runner, rid, queue, started, settings.request_timeout_s),
                media_type="text/event-stream",
            )
        handles = [start(i, ids) for i, ids in enumerate(prompts)]
        outs = []
        done: set[str] = set()  # ended in the engine (or never entered it): never abort these
        try:
            for rid, queue in handles:
                try:
                    last = await _wait_final(queue, settings.request_timeout_s)
                except ApiError:
                    # NOTE: an error update means the engine already ended this rid, or never
                    # took it (a duplicate rid names *another* client's request).
                    done.add(rid)
                    raise
                done.add(rid)
                outs.append(
                    {
                        "text": runner.tokenizer.decode(last.output_ids),
                        "output_ids": last.output_ids,
                        "meta_info": _meta(rid, last, started),
                    }
                )
        except TimeoutError:
            for rid, _ in handles:
                runner.abort(rid)
            raise ApiError("request timed out", 504) from None
        except (asyncio.CancelledError, ApiError):
            for rid, _ in handles:  # the client went away, or one prompt failed
                if rid not in done:
                    runner.abort(rid)
            raise
        return _json(outs if batched else outs[0])

    # -- info ----------------------------------------------------------------------------------

    @app.get("/health")
    async def health() -> Response:
        if not runner.alive:
            return _error(f"scheduler thread is not running: {runner.failure or 'stopped'}", 503)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        return await health()

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return _json(
            {
                "object": "list",
                "data": [
                    {
                        "id": runner.model_name,
                        "object": "model",
                        "created": int(runner.started_wall),
                        "owned_by": "schedscope",
                        "root": runner.model_name,
                        "max_model_len": runner.context_length,
                    }
                ],
            }
        )

    @app.get("/model_info")
    async def model_info() -> JSONResponse:
        return _json(runner.model_info())

    async def server_info(request: Request) -> JSONResponse:
        info = dict(runner.server_info())
        info.update(host=settings.host, port=settings.port, version=__version__)
        # The internal state is what /get_internal_state guards: only with the same token.
        authorized = True
        if settings.admin_token:
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            authorized = bool(token) and hmac.compare_digest(
                token.encode(), settings.admin_token.encode()
            )
        if authorized:
            try:
                await admin(request)
            except ApiError:
                authorized = False
        if authorized:
            info["internal_states"] = [await runner.call(lambda eng: eng.get_internal_state())]
        return _json(info)

    app.get("/server_info")(server_info)
    app.get("/get_server_info")(server_info)

    # -- control (admin) -----------------------------------------------------------------------

    guard = [Depends(admin)]

    @app.post("/pause_generation", dependencies=guard)
    async def pause_generation(request: Request) -> JSONResponse:
        body = await body_of(request, required=False)
        mode = body.get("mode", "abort")
        if not isinstance(mode, str):
            raise ApiError("'mode' must be one of abort, retract, in_place")
        await runner.call(lambda eng: eng.pause_generation(mode))
        return _json({"success": True, "message": f"Generation paused (mode {mode})."})

    @app.post("/continue_generation", dependencies=guard)
    async def continue_generation(request: Request) -> JSONResponse:
        await runner.call(lambda eng: eng.continue_generation())
        return _json({"success": True, "message": "Generation continued."})

    @app.api_route("/flush_cache", methods=["POST", "GET"], dependencies=guard)
    async def flush_cache(request: Request) -> JSONResponse:
        timeout_s = _float_query(request, "timeout", 0.0)
        deadline = time.monotonic() + timeout_s
        # SGLang's timeout: wait for the engine to go fully idle, then flush once (so a wait
        # is not a stream of refusals in the telemetry).
        while time.monotonic() < deadline:
            if await runner.call(lambda eng: eng.busy_reason()) is None:
                break
            await asyncio.sleep(0.02)
        await runner.call(lambda eng: eng.flush_cache())
        return _json({"success": True, "message": "Cache flushed."})

    @app.post("/release_memory_occupation", dependencies=guard)
    async def release_memory_occupation() -> JSONResponse:
        await runner.call(lambda eng: eng.release_memory())
        return _json({"success": True, "message": "Memory released."})

    @app.post("/update_weights_from_disk", dependencies=guard)
    async def update_weights_from_disk(request: Request) -> JSONResponse:
        body = await body_of(request)
        path = body.get("model_path")
        if not isinstance(path, str) or not path:
            raise ApiError("'model_path' (a local safetensors file or directory) is required")
        if "://" in path:
            raise ApiError("only local paths are supported (the engine never downloads)")
        msg = await runner.call(lambda eng: eng.update_weights(path))
        return _json({"success": True, "message": msg, "num_paused_requests": 0})

    @app.post("/start_profile", dependencies=guard)
    async def start_profile(request: Request) -> JSONResponse:
        body = await body_of(request, required=False)
        out_dir = body.get("output_dir")
        num_steps = body.get("num_steps")
        activities = body.get("activities")
        if out_dir is not None and not isinstance(out_dir, str):
            raise ApiError("'output_dir' must be a string")
        if num_steps is not None and (
            isinstance(num_steps, bool) or not isinstance(num_steps, int)
        ):
            raise ApiError("'num_steps' must be an integer")
        if activities is not None and not (
            isinstance(activities, list) and all(isinstance(a, str) for a in activities)
        ):
            raise ApiError("'activities' must be a list of strings (CPU, GPU)")
        pid = await runner.call(lambda eng: eng.start_profile(out_dir, num_steps, activities))
        return _json({"success": True, "message": "Start profiling.", "profile_id": pid})

    @app.post("/stop_profile", dependencies=guard)
    async def stop_profile() -> JSONResponse:
        result = await runner.call(lambda eng: eng.stop_profile())
        return _json(
            {
                "success": True,
                "message": "Stop profiling.",
                "path": result.path,
                "steps": result.steps,
            }
        )

    @app.get("/get_internal_state", dependencies=guard)
    async def get_internal_state() -> JSONResponse:
        return _json([await runner.call(lambda eng: eng.get_internal_state())])

    @app.post("/set_internal_state", dependencies=guard)
    async def set_internal_state(request: Request) -> JSONResponse:
        body = await body_of(request)
        # SGLang wraps the knobs in "server_args"; a flat object is accepted too.
        changes = body.get("server_args", body)
        if not isinstance(changes, dict) or not changes:
            raise ApiError("send the knobs to change as a JSON object")
        state = await runner.call(lambda eng: eng.set_internal_state(changes))
        return _json([{"updated": True, "server_args": state}])

    return app


async def _read_capped(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise ApiError(f"request body too large: {declared} bytes > {limit}", 413)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():  # a lying or absent Content-Length: count as we go
        size += len(chunk)
        if size > limit:
            raise ApiError(f"request body too large: more than {limit} bytes", 413)
        chunks.append(chunk)
    return b"".join(chunks)


def _float_query(request: Request, name: str, default: float) -> float:
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ApiError(f"query parameter {name!r} must be a number, got {raw!r}") from None
    if value < 0:
        raise ApiError(f"query parameter {name!r} must be >= 0")
    return value


async def _wait_final(queue: asyncio.Queue[TokenUpdate], timeout_s: float) -> TokenUpdate:
    while True:
        update = await asyncio.wait_for(queue.get(), timeout_s)
        if update.error:
            raise ApiError(update.error, update.error_code)
        if update.finished:
            return update


async def _stream(
    request: Request,
    runner: EngineRunner,
    rid: str,
    queue: asyncio.Queue[TokenUpdate],
    started: float,
    timeout_s: float,
) -> AsyncIterator[bytes]:
    finished = False
    try:
        while not finished:
            try:
                update = await asyncio.wait_for(queue.get(), timeout_s)
            except TimeoutError:
                yield _frame(
                    {"error": {"message": "request timed out", "type": "timeout", "code": 504}}
                )
                break
            if update.error:
                finished = True  # the engine ended it, or never took it (duplicate rid)
                kind = "invalid_request" if update.error_code < 500 else "engine_error"
                yield _frame(
                    {"error": {"message": update.error, "type": kind, "code": update.error_code}}
                )
                break
            finished = update.finished
            yield _frame(
                {
                    "text": runner.tokenizer.decode(update.output_ids),
                    "output_ids": update.output_ids,
                    "meta_info": _meta(rid, update, started),
                }
            )
        yield DONE_FRAME
    finally:
        if not finished:
            runner.abort(rid)  # the client went away (or timed out): free its KV


def serve(runner: EngineRunner, settings: ServerSettings) -> None:
    """Run uvicorn in this thread until interrupted; the runner is stopped on the way out."""
    import uvicorn

    check_bind(settings)
    app = create_app(runner, settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        access_log=False,
        # Benchmark clients open a new connection per request: keep the backlog deep.
        backlog=2048,
        timeout_keep_alive=5,
    )
    try:
        uvicorn.Server(config).run()
    finally:
        runner.stop()
