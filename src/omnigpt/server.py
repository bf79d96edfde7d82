"""`omnigpt serve`: the OpenAI API over HTTP (FastAPI + uvicorn), a web chat page, health and metrics.

    service = Service(ServeConfig(port=8000))
    service.load("runs/chat")                  # or in a thread: /health answers 503 until ready
    app = create_app(service)                  # then uvicorn.run(app, ...), as `serve()` does

Handlers only check a request, turn it into engine work (`api.py`) and relay the engine's events
(`engine.py`) back as JSON or server-sent events; the engine thread does all the model's work, so
`/health` and `/metrics` answer while the model computes. Routes:

    POST /v1/chat/completions   POST /v1/completions   POST /v1/audio/transcriptions
    POST /v1/images/generations GET /v1/models         GET /health   GET /metrics   GET / (chat page)
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import logging
import threading
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path
from typing import Annotated

from fastapi import FastAPI, File, Form, UploadFile
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException

from omnigpt import api
from omnigpt.api import ApiError, ChatRequest, CompletionRequest, ImageRequest, Limits, Meta
from omnigpt.config import GenerationOptions, ServeConfig
from omnigpt.engine import Busy, Engine, Failed, Finished, Job, Piece, Request, Ticket
from omnigpt.errors import OmnigptError
from omnigpt.quantize import weights_of
from omnigpt.synthetic import TRANSCRIBE_PROMPT
from omnigpt.tokenizer import ASSISTANT, Tokenizer

log = logging.getLogger("omnigpt.server")

# -- the model behind the API ---------------------------------------------------------------------


class Metrics:
    """The Prometheus metrics of one server (its own registry)."""

    def __init__(self, service: Service):
        self.registry = r = CollectorRegistry()
        running = Gauge("omnigpt_requests_running", "requests being decoded", registry=r)
        running.set_function(lambda: service.engine.running if service.engine else 0)
        waiting = Gauge("omnigpt_requests_waiting", "requests waiting for a slot", registry=r)
        waiting.set_function(lambda: service.engine.waiting if service.engine else 0)
        self.ttft = Histogram(
            "omnigpt_time_to_first_token_seconds",
            "from a request's arrival at the engine to its first token",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.generated = Counter(
            "omnigpt_generated_tokens", "tokens generated (all requests)", registry=r
        )
        self.prompt = Counter("omnigpt_prompt_tokens", "prompt tokens read", registry=r)
        self.rejected = Counter(
            "omnigpt_rejected_requests", "requests refused, by reason", ["reason"], registry=r
        )
        self.requests = Counter(
            "omnigpt_http_requests", "HTTP requests answered", ["route", "status"], registry=r
        )
        self.latency = Histogram(
            "omnigpt_http_request_seconds", "time to answer a request in full", ["route"],
            registry=r,
        )  # fmt: skip


class Service:
    """One model served: loading, then an engine; what the handlers ask for."""

    def __init__(self, config: ServeConfig):
        self.config = config
        self.state, self.error = "loading", ""
        self.engine: Engine | None = None
        self.model = self.tokenizer = None
        self.name, self.guidance, self.instruction = "", 1.0, TRANSCRIBE_PROMPT
        self.metrics = Metrics(self)
        self.limits = Limits(config.max_image_pixels, config.max_running)

    def load(
        self,
        path: str,
        device: str = "auto",
        start_engine: bool = True,
        quantization: str | None = None,
    ) -> None:
        """Loads a model as `generate` and `chat` do; `/health` turns 200 when done."""
        from omnigpt.hardware import pick_device
        from omnigpt.imagine import learned_unconditional
        from omnigpt.load import load_model

        try:
            model, tokenizer = load_model(path, pick_device(device), quantization=quantization)
            guidance = 1.0
            if tokenizer.images is not None and learned_unconditional(path):
                guidance = 3.0
            name = self.config.name or Path(path).resolve().name
            self.attach(model, tokenizer, name, guidance, start_engine)
        except Exception as e:  # shown by /health and the log; the server keeps answering
            self.state, self.error = "failed", str(e)
            log.error("cannot load %s: %s", path, e)

    def attach(
        self,
        model,
        tokenizer: Tokenizer,
        name: str,
        guidance: float = 1.0,
        start_engine: bool = True,
    ) -> None:
        """Serves a loaded model under `name` (guidance: the default for drawing). Without
        `start_engine`, the caller runs `self.engine.run()` in a thread of its choosing."""
        tokenizer.token_texts()  # computed once now, not inside a request
        self.model, self.tokenizer, self.name, self.guidance = (
            model.eval(),
            tokenizer,
            name,
            guidance,
        )
        self.engine = Engine(
            model,
            tokenizer,
            self.config.max_running,
            self.config.max_waiting,
            on_tokens=self.metrics.generated.inc,
            start=start_engine,
        )
        self.logprobs = api.LogprobWriter(tokenizer)
        self.state = "ready"
        log.info("serving %s: %s", name, model.describe())

    def close(self) -> None:
        if self.engine is not None:
            self.engine.close()

    # -- what handlers ask -------------------------------------------------------------------

    def ready(self, model: str | None = None) -> None:
        """503 until the model is loaded; 404 for a model name this server does not serve."""
        if self.state == "loading":
            raise ApiError(503, "the model is still loading", headers={"Retry-After": "5"})
        if self.state == "failed":
            raise ApiError(503, f"the model failed to load: {self.error}")
        if model is not None and model != self.name:
            raise ApiError(
                404, f"The model `{model}` does not exist (this server serves `{self.name}`)",
                "model", "model_not_found",
            )  # fmt: skip

    def submit(self, work: Request | Job, on_event) -> Ticket:
        try:
            ticket = self.engine.submit(work, on_event)
        except Busy as e:
            self.metrics.rejected.labels("busy").inc()
            raise ApiError(503, f"the server is busy ({e}); retry later",
                           code="server_busy", headers={"Retry-After": "1"}) from None  # fmt: skip
        except OmnigptError as e:
            raise ApiError(400, str(e)) from None
        if isinstance(work, Request):
            self.metrics.prompt.inc(len(work.prompt))
        return ticket

    def capabilities(self) -> dict:
        model = self.model
        return {
            "chat": self.tokenizer.token_id(ASSISTANT) is not None,
            "completions": True,
            "image_input": getattr(model, "vision", None) is not None,
            "audio_input": getattr(model, "audio", None) is not None,
            "image_output": self.tokenizer.images is not None,
        }


class Relay:
    """Engine events (from the engine thread) into this request's event loop, tagged by ticket."""

    def __init__(self):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def to(self, tag: int):
        return lambda event: self.loop.call_soon_threadsafe(self.queue.put_nowait, (tag, event))

    async def get(self):
        return await self.queue.get()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _error_event(failed: Failed) -> dict:
    return ApiError(failed.status, failed.message).body


# -- the app ---------------------------------------------------------------------------------------


def create_app(service: Service) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.to_thread(service.close)

    app = FastAPI(title="omnigpt", docs_url="/docs", redoc_url=None, lifespan=lifespan)
    app.state.service = service
    app.add_middleware(Gate, service=service)
    metrics = service.metrics

    @app.exception_handler(ApiError)
    async def api_error(request, e: ApiError):
        if e.status in (400, 404, 413):
            metrics.rejected.labels(
                {400: "invalid", 404: "not_found", 413: "too_large"}[e.status]
            ).inc()
        return JSONResponse(e.body, e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        first = e.errors()[0]
        where = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(where) or None
        if first.get("type") == "extra_forbidden":
            message = f"Unrecognized request argument supplied: {param}"
        elif first.get("type") == "json_invalid":
            message, param = "the body is not valid JSON", None
        else:
            message = f"{param}: {first.get('msg')}" if param else str(first.get("msg"))
        metrics.rejected.labels("invalid").inc()
        return JSONResponse(ApiError(400, message, param).body, 400)

    @app.exception_handler(HTTPException)
    async def http_error(request, e: HTTPException):
        message = e.detail if isinstance(e.detail, str) else "error"
        if e.status_code == 404:
            message = f"no route {request.url.path}"
        return JSONResponse(ApiError(e.status_code, message).body, e.status_code)

    @app.get("/health")
    async def health():
        if service.state == "ready":
            return {"status": "ok", "model": service.name}
        body = {"status": service.state, **({"error": service.error} if service.error else {})}
        return JSONResponse(body, 503)

    @app.get("/metrics")
    async def metrics_text():
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return (resources.files("omnigpt") / "web" / "chat.html").read_text(encoding="utf-8")

    @app.get("/v1/models")
    async def models():
        service.ready()
        return {"object": "list", "data": [_model_card(service)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        service.ready(name)
        return _model_card(service)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: HttpRequest):
        service.ready(body.model)
        work = await asyncio.to_thread(
            api.chat_work, body, service.model, service.tokenizer, service.limits
        )
        relay, tickets = _submit(service, [work])
        meta = Meta.new("chatcmpl", service.name)
        if body.stream:
            stream = _chat_stream(service, meta, tickets, relay, body.n, _with_usage(body))
            return _event_stream(stream)
        texts, reasons, logprobs, counts = await _collect(service, tickets, relay, request)
        choices = [
            api.chat_choice(
                i,
                texts[i],
                reasons[i],
                service.logprobs.chat(logprobs[i]) if work.logprobs is not None else None,
            )  # fmt: skip
            for i in range(body.n)
        ]
        return api.chat_response(meta, choices, api.usage(counts[0], sum(counts[1:])))

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HttpRequest):
        service.ready(body.model)
        works = await asyncio.to_thread(
            api.completion_work, body, service.model, service.tokenizer, service.limits
        )
        relay, tickets = _submit(service, works)
        meta = Meta.new("cmpl", service.name)
        if body.stream:
            stream = _completion_stream(service, meta, tickets, relay, body.n, _with_usage(body))
            return _event_stream(stream)
        texts, reasons, logprobs, counts = await _collect(service, tickets, relay, request)
        choices = []
        for i, text in enumerate(texts):
            lp = None
            if body.logprobs is not None:
                lp = service.logprobs.completion(logprobs[i], 0)
            choices.append(api.completion_choice(i, text, reasons[i], lp))
        return api.completion_object(meta, choices, api.usage(counts[0], sum(counts[1:])))

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(
        request: HttpRequest,
        file: Annotated[UploadFile, File()],
        model: Annotated[str, Form()],
        response_format: Annotated[str, Form()] = "json",
        temperature: Annotated[float, Form()] = 0.0,
        language: Annotated[str | None, Form()] = None,  # ignored: the model hears what it hears
        prompt: Annotated[str | None, Form()] = None,
    ):
        service.ready(model)
        if response_format not in ("json", "text"):
            raise ApiError(400, "response_format must be json or text", "response_format")
        if prompt:
            raise ApiError(
                400, "prompt is not supported: the model has its own instruction", "prompt"
            )
        if not 0 <= temperature <= 2:
            raise ApiError(400, "temperature must be from 0 to 2", "temperature")
        data = await file.read()
        work = await asyncio.to_thread(
            api.transcription_work, data, service.model, service.tokenizer, service.instruction
        )
        if temperature:
            work.opts = GenerationOptions(
                max_new_tokens=work.opts.max_new_tokens, temperature=temperature,
                token_healing=False,
            )  # fmt: skip
        relay, tickets = _submit(service, [work])
        texts, _, _, counts = await _collect(service, tickets, relay, request)
        text = texts[0].strip()
        if response_format == "text":
            return Response(text, media_type="text/plain")
        total = counts[0] + counts[1]
        tokens = {"input_tokens": counts[0], "output_tokens": counts[1], "total_tokens": total}
        return {"text": text, "usage": {"type": "tokens", **tokens}}

    @app.post("/v1/images/generations")
    async def images(body: ImageRequest, request: HttpRequest):
        service.ready(body.model)
        codec = service.tokenizer.images
        if codec is None:
            raise ApiError(
                400, "this model does not draw (its tokenizer has no image codes)", "model"
            )
        size = f"{codec.width}x{codec.height}"
        if body.size not in (None, "auto", size):
            raise ApiError(400, f"this model draws {size} images only", "size")
        opts = GenerationOptions(temperature=1.0, seed=body.seed, num_samples=body.n)

        def draw(model):
            from omnigpt.imagine import imagine

            return imagine(model, service.tokenizer, [body.prompt], opts, service.guidance)

        relay = Relay()
        service.submit(Job(draw), relay.to(0))
        _, event = await relay.get()
        if isinstance(event, Failed):
            raise ApiError(event.status, event.message, "prompt" if event.status == 400 else None)
        pictures = await asyncio.to_thread(lambda: [_png(im) for im in event.result])
        prompt_tokens = len(service.tokenizer.encode(body.prompt, allow_special=False)) + 1
        out_tokens = body.n * codec.tokens
        return {
            "created": int(time.time()),
            "data": [{"b64_json": p} for p in pictures],
            "usage": {
                "input_tokens": prompt_tokens,
                "output_tokens": out_tokens,
                "total_tokens": prompt_tokens + out_tokens,
            },
        }

    return app


def _submit(service: Service, works: list[Request]) -> tuple[Relay, list[Ticket]]:
    """Submits a request's engine work, its events tagged by position; all or none."""
    relay, tickets = Relay(), []
    try:
        for tag, work in enumerate(works):
            tickets.append(service.submit(work, relay.to(tag)))
    except ApiError:
        for t in tickets:
            t.cancel()
        raise
    return relay, tickets


def _with_usage(body) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


def _model_card(service: Service) -> dict:
    return {
        "id": service.name,
        "object": "model",
        "created": 0,
        "owned_by": "omnigpt",
        "max_model_len": service.model.config.block_size,
        "weights": weights_of(service.model),
        "capabilities": service.capabilities(),
    }


def _png(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(events, media_type="text/event-stream", headers=headers)


def _first_token(service: Service, ticket: Ticket, seen: set) -> None:
    if id(ticket) not in seen and ticket.first_token is not None:
        seen.add(id(ticket))
        service.metrics.ttft.observe(ticket.first_token)


async def _events(service: Service, tickets: list[Ticket], relay: Relay):
    """(ticket number, event) as the engine sends them, until every answer of `tickets` finished
    or one failed (that Failed is the last). The time to each ticket's first token is recorded."""
    left, seen = sum(t.work.n for t in tickets), set()
    while left:
        tag, event = await relay.get()
        _first_token(service, tickets[tag], seen)
        yield tag, event
        if isinstance(event, Failed):
            return
        left -= isinstance(event, Finished)


async def _collect(service: Service, tickets: list[Ticket], relay: Relay, request: HttpRequest):
    """A whole answer: texts, finish reasons and logprobs per choice (choices of ticket k follow
    those of ticket k-1), and [prompt tokens, completion tokens of each choice]. A client that
    leaves has its tickets cancelled."""
    n = [t.work.n for t in tickets]
    base = [sum(n[:k]) for k in range(len(n))]
    texts, reasons, made = [""] * sum(n), [""] * sum(n), [0] * sum(n)
    logprobs: list[list] = [[] for _ in range(sum(n))]
    watcher = asyncio.create_task(_watch_disconnect(request, tickets))
    try:
        async for tag, event in _events(service, tickets, relay):
            if isinstance(event, Failed):
                raise ApiError(event.status, event.message)
            i = base[tag] + event.index
            if isinstance(event, Piece):
                texts[i] += event.text
                logprobs[i] += event.logprobs or []
            elif isinstance(event, Finished):
                reasons[i], made[i] = event.reason, event.completion_tokens
    finally:
        watcher.cancel()
        for t in tickets:
            t.cancel()
    prompt_tokens = sum(len(t.work.prompt) for t in tickets)
    return texts, reasons, logprobs, [prompt_tokens, *made]


async def _watch_disconnect(request: HttpRequest, tickets: list[Ticket]) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for t in tickets:
        t.cancel()


async def _chat_stream(service, meta, tickets, relay, n, include_usage):
    """chat.completion.chunk events: the role first, text as it comes, each choice's finish, the
    usage (when asked), then [DONE]. Leaving early (a client gone) cancels the request."""
    try:
        for i in range(n):
            role = api.chat_delta(i, {"role": "assistant", "content": ""})
            yield _sse(api.chat_chunk(meta, [role], None, include_usage))
        made, failed = 0, False
        async for _, event in _events(service, tickets, relay):
            if isinstance(event, Failed):
                yield _sse(_error_event(event))
                failed = True
            elif isinstance(event, Piece):
                lp = service.logprobs.chat(event.logprobs) if event.logprobs is not None else None
                delta = api.chat_delta(event.index, {"content": event.text}, lp)
                yield _sse(api.chat_chunk(meta, [delta], None, include_usage))
            elif isinstance(event, Finished):
                made += event.completion_tokens
                end = api.chat_delta(event.index, {}, None, event.reason)
                yield _sse(api.chat_chunk(meta, [end], None, include_usage))
        if include_usage and not failed:
            usage = api.usage(len(tickets[0].work.prompt), made)
            yield _sse(api.chat_chunk(meta, [], usage, True))
        yield "data: [DONE]\n\n"
    finally:
        for t in tickets:
            t.cancel()


async def _completion_stream(service, meta, tickets, relay, n, include_usage):
    """text_completion chunks (choice index: prompt × n + answer), usage when asked, [DONE]."""
    try:
        offsets: dict[int, int] = {}
        made, failed = 0, False
        async for tag, event in _events(service, tickets, relay):
            if isinstance(event, Failed):
                yield _sse(_error_event(event))
                failed = True
                continue
            index = tag * n + event.index
            if isinstance(event, Piece):
                lp = None
                if event.logprobs is not None:
                    lp = service.logprobs.completion(event.logprobs, offsets.get(index, 0))
                offsets[index] = offsets.get(index, 0) + len(event.text)
                choice = api.completion_choice(index, event.text, None, lp)
            else:
                made += event.completion_tokens
                choice = api.completion_choice(index, "", event.reason)
            chunk = api.completion_object(meta, [choice], None, chunk=True)
            if include_usage:
                chunk["usage"] = None
            yield _sse(chunk)
        if include_usage and not failed:
            prompt = sum(len(t.work.prompt) for t in tickets)
            yield _sse(api.completion_object(meta, [], api.usage(prompt, made), chunk=True))
        yield "data: [DONE]\n\n"
    finally:
        for t in tickets:
            t.cancel()


# -- what every request passes through -------------------------------------------------------------


ROUTES = {
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/audio/transcriptions",
    "/v1/images/generations",
    "/v1/models",
    "/health",
    "/metrics",
    "/",
}


class Gate:
    """ASGI middleware in front of every route: the API key (401), the body limit (413), one
    access-log line and the request metrics per request. A body is read whole here (up to the
    limit) and handed on."""

    def __init__(self, app, service: Service):
        self.app, self.service = app, service
        self.limit = int(service.config.max_body_mb * 1_000_000)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), [0]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refuse(scope)
            if refusal is None:
                body, refusal = await self._read(receive)
            if refusal is not None:
                await self._answer(refusal, send_status)
                return
            await self.app(scope, _replay(body, receive), send_status)
        finally:
            seconds = time.perf_counter() - start
            path = scope["path"]
            route = path if path in ROUTES else "other"
            metrics = self.service.metrics
            metrics.requests.labels(route, str(status[0])).inc()
            metrics.latency.labels(route).observe(seconds)
            client = scope.get("client") or ("-", 0)
            log.info('%s:%s "%s %s" %d %.3fs', client[0], client[1], scope["method"], path,
                     status[0], seconds)  # fmt: skip

    def _refuse(self, scope) -> ApiError | None:
        headers = dict(scope["headers"])
        key = self.service.config.api_key
        if key and scope["path"].startswith("/v1/"):
            given = headers.get(b"authorization", b"").decode("latin-1")
            if given != f"Bearer {key}":
                self.service.metrics.rejected.labels("unauthorized").inc()
                return ApiError(401, "a valid API key is needed (Authorization: Bearer KEY)",
                                code="invalid_api_key")  # fmt: skip
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return self._too_large()
        return None

    def _too_large(self) -> ApiError:
        self.service.metrics.rejected.labels("too_large").inc()
        mb = self.service.config.max_body_mb
        return ApiError(413, f"the request body is over the server's limit of {mb:g} MB")

    async def _read(self, receive) -> tuple[bytes, ApiError | None]:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return b"", None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                return b"", self._too_large()
            if not message.get("more_body"):
                return b"".join(chunks), None

    @staticmethod
    async def _answer(error: ApiError, send) -> None:
        body = json.dumps(error.body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        headers += [(k.lower().encode(), v.encode()) for k, v in error.headers.items()]
        await send({"type": "http.response.start", "status": error.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _replay(body: bytes, receive):
    """A receive that gives the app the body read already, then waits on the client."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


# -- running it -------------------------------------------------------------------------------------


def serve(
    model: str, config: ServeConfig, device: str = "auto", quantization: str | None = None
) -> None:
    """Serves `model` until Ctrl-C or SIGTERM: the port opens at once (uvicorn in a thread), the
    model loads and the engine runs on this, the main thread; /health turns 200 once it is loaded."""
    import signal

    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    service = Service(config)
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(service),
            host=config.host,
            port=config.port,
            access_log=False,  # Gate writes one line per request
            log_level="info",
            timeout_graceful_shutdown=5,
        )
    )
    web = threading.Thread(target=server.run, name="omnigpt-http", daemon=True)
    web.start()
    while not server.started and web.is_alive():
        time.sleep(0.05)
    if not server.started:
        raise OmnigptError(f"could not serve on {config.host}:{config.port} (see the log above)")
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        service.load(model, device, start_engine=False, quantization=quantization)
        if service.engine is not None:
            service.engine.run()
        else:  # a model that failed to load: /health says why until the server is stopped
            web.join()
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        service.close()
        web.join(10)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt
