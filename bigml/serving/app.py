"""The HTTP application of `bigml serve`: FastAPI routes over a `ServedModel` and a `DynamicBatcher`.

FastAPI (on uvicorn) because it is the widely kept ASGI stack with request validation built in,
and because OpenAI's wire format (including /v1/completions, which LitServe's OpenAI spec lacks) is
a few response shapes; server-sent events are a plain StreamingResponse.

    GET  /health                  200 {"status": "ok", ...} (no key needed: for load balancers)
    GET  /metrics                 requests, latency percentiles, tokens/s, batches (JSON)
    GET  /v1/models               the one model served
    POST /v1/completions          causal LMs (OpenAI), stream=true for server-sent events
    POST /v1/chat/completions     causal LMs with a chat template (OpenAI)
    POST /v1/predict              task models: labels and probabilities, values, entity spans
    POST /v1/fill-mask            masked LMs: the top fills of each [MASK]

Every error is a JSON body {"error": {"message", "type", "param", "code"}} with a 4xx status for
bad requests (and 500 for a failure of the server, which keeps serving).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from bigml.serving.batching import DynamicBatcher
from bigml.serving.decoding import Sequence
from bigml.serving.metrics import ServerMetrics
from bigml.serving.model import ServedModel
from bigml.serving.protocol import (
    SSE_DONE,
    ChatRequest,
    CompletionRequest,
    FillMaskRequest,
    PredictRequest,
    RequestError,
    envelope,
    error_body,
    new_id,
    sse,
    usage,
)

log = logging.getLogger("bigml")
UNTIMED = ("/health", "/metrics")
OPEN = ("/health",)


@dataclass
class ServeOptions:
    max_batch_size: int = 8
    batch_wait_ms: float = 10.0
    workers: int = 1
    api_key: str | None = None


class Observe:
    """ASGI middleware: the bearer-token check, and every request's status and latency (to the last
    byte of the body, so streamed responses are timed whole) counted in ServerMetrics."""

    def __init__(self, app, metrics: ServerMetrics, api_key: str | None):
        self.app, self.metrics, self.api_key = app, metrics, api_key

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if self.api_key and path not in OPEN and not self._authorized(scope):
            body = JSONResponse(error_body("missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                           "authentication_error", code="invalid_api_key"), status_code=401,
                                headers={"WWW-Authenticate": "Bearer"})
            self.metrics.request_done(path, 401, 0.0, timed=False)
            return await body(scope, receive, send)
        t0 = time.perf_counter()
        status = {"code": 500}
        counted = path not in UNTIMED
        if counted:
            self.metrics.in_flight += 1

        async def observed_send(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            if counted:
                self.metrics.in_flight -= 1
            self.metrics.request_done(path, status["code"], time.perf_counter() - t0, timed=counted)

    def _authorized(self, scope) -> bool:
        for name, value in scope.get("headers", []):
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False


def create_app(served: ServedModel, options: ServeOptions) -> FastAPI:
    metrics = ServerMetrics()
    batcher = DynamicBatcher(served.run, max_batch_size=options.max_batch_size, wait_ms=options.batch_wait_ms,
                             workers=options.workers)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="bigml serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.metrics, app.state.batcher, app.state.served = metrics, batcher, served

    # -- errors: one JSON shape --------------------------------------------------------------------
    @app.exception_handler(RequestError)
    async def request_error(_, exc: RequestError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", []) if x != "body"]
        kind = err.get("type", "")
        if kind == "json_invalid":
            message, param = "the request body is not valid JSON", None
        elif kind == "extra_forbidden":
            message, param = f"unknown field {'.'.join(loc)!r}", ".".join(loc)
        elif kind == "missing":
            message, param = f"{'.'.join(loc)} is required", ".".join(loc)
        else:
            message, param = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid')}", ".".join(loc) or None
        return JSONResponse(error_body(message, param=param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def server_error(_, exc: Exception):
        log.exception("request failed")
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}: {exc}", "server_error"), status_code=500)

    def require(endpoint: str) -> None:
        if endpoint not in served.endpoints:
            offered = ", ".join(ROUTES[e] for e in served.endpoints) or "none"
            raise RequestError(f"this model ({served.task.name.replace('_', ' ')}) does not answer {ROUTES[endpoint]}; "
                               f"it answers {offered}", status=404, code="unsupported_endpoint")

    # -- the service ------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "model": served.name, "task": served.task.name,
                "endpoints": [ROUTES[e] for e in served.endpoints]}

    @app.get("/metrics")
    async def get_metrics():
        return metrics.snapshot(batcher)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": served.name, "object": "model", "created": int(metrics.started),
                                            "owned_by": "bigml"}]}

    # -- text generation --------------------------------------------------------------------------
    async def generate(kind: str, rid: str, prepared: tuple[dict, list[Sequence], int], stream: bool,
                       include_usage: bool, chat: bool):
        settings, rows, prompt_tokens = prepared
        key = ("generate", tuple(sorted(settings.items())))
        if not stream:
            await batcher.submit(key, rows, size=len(rows))
            completion = sum(r.completion_tokens for r in rows)
            metrics.tokens(prompt_tokens, completion)
            choices = [_choice(i, r, chat) for i, r in enumerate(rows)]
            return JSONResponse(envelope(kind, rid, served.name, choices, usage(prompt_tokens, completion)))
        return StreamingResponse(stream_events(kind, rid, key, rows, prompt_tokens, include_usage, chat),
                                 media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def stream_events(kind, rid, key, rows, prompt_tokens, include_usage, chat):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        for i, row in enumerate(rows):
            row.on_delta = lambda text, i=i: loop.call_soon_threadsafe(queue.put_nowait, (i, text))
        job = asyncio.ensure_future(batcher.submit(key, rows, size=len(rows)))
        job.add_done_callback(lambda _: queue.put_nowait(None))
        chunk_kind = f"{kind}.chunk" if chat else kind
        finished = False
        try:
            if chat:
                yield sse(envelope(chunk_kind, rid, served.name, [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(len(rows))]))
            while True:
                event = await queue.get()
                if event is None:
                    break
                i, text = event
                delta = {"index": i, "delta": {"content": text}} if chat else {"index": i, "text": text}
                yield sse(envelope(chunk_kind, rid, served.name, [{**delta, "logprobs": None, "finish_reason": None}]))
            if job.exception() is not None:
                yield sse(error_body(f"generation failed: {job.exception()}", "server_error"))
            else:
                completion = sum(r.completion_tokens for r in rows)
                metrics.tokens(prompt_tokens, completion)
                for i, r in enumerate(rows):
                    end = {"index": i, "delta": {}} if chat else {"index": i, "text": ""}
                    yield sse(envelope(chunk_kind, rid, served.name, [{**end, "logprobs": None, "finish_reason": r.finish_reason}]))
                if include_usage:
                    yield sse(envelope(chunk_kind, rid, served.name, [], usage(prompt_tokens, completion)))
            yield SSE_DONE
            finished = True
        finally:
            if not finished:  # the client went away (Starlette cancels this generator): stop decoding its rows
                metrics.cancelled += 1
                for r in rows:
                    r.cancelled.set()
                job.cancel()

    if "completions" in served.endpoints:
        @app.post("/v1/completions")
        async def completions(req: CompletionRequest):
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await generate("text_completion", new_id("cmpl"), served.completion_rows(req), req.stream,
                                  include_usage, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(req: ChatRequest):
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return await generate("chat.completion", new_id("chatcmpl"), served.chat_rows(req), req.stream,
                                  include_usage, chat=True)
    else:
        @app.post("/v1/completions")
        async def no_completions():
            require("completions")

        @app.post("/v1/chat/completions")
        async def no_chat():
            require("chat_completions")

    # -- task heads and masked LMs --------------------------------------------------------------
    @app.post("/v1/predict")
    async def predict(req: PredictRequest):
        require("predict")
        texts = served.texts(req.input)
        pairs = served.texts(req.text_pair, "text_pair") if req.text_pair is not None else None
        if pairs is not None and len(pairs) != len(texts):
            raise RequestError(f"text_pair has {len(pairs)} texts for {len(texts)} inputs", "text_pair")
        n_tokens = served.check_lengths(texts, pairs, served.max_length)
        answers = await batcher.submit(("predict", pairs is not None), (texts, pairs), size=len(texts))
        metrics.tokens(n_tokens, 0)
        return {"object": "list", "model": served.name, "task": served.task.name,
                "data": [{"index": i, **a} for i, a in enumerate(answers)], "usage": usage(n_tokens, 0)}

    @app.post("/v1/fill-mask")
    async def fill_mask(req: FillMaskRequest):
        require("fill_mask")
        if not 1 <= req.top_k <= 100:
            raise RequestError(f"top_k must be between 1 and 100 (got {req.top_k})", "top_k")
        texts = served.fill_texts(req.input)
        n_tokens = served.check_lengths(texts, None, served.context)
        fills = await batcher.submit(("fill_mask", int(req.top_k)), texts, size=len(texts))
        metrics.tokens(n_tokens, 0)
        return {"object": "list", "model": served.name, "data": [{"index": i, "fills": f} for i, f in enumerate(fills)],
                "usage": usage(n_tokens, 0)}

    app.add_middleware(Observe, metrics=metrics, api_key=options.api_key)
    return app


ROUTES = {"completions": "/v1/completions", "chat_completions": "/v1/chat/completions", "predict": "/v1/predict",
          "fill_mask": "/v1/fill-mask"}


def _choice(i: int, row: Sequence, chat: bool) -> dict[str, Any]:
    if chat:
        return {"index": i, "message": {"role": "assistant", "content": row.text}, "logprobs": None,
                "finish_reason": row.finish_reason}
    return {"index": i, "text": row.text, "logprobs": None, "finish_reason": row.finish_reason}
