"""An OpenAI-compatible HTTP server over the engine (FastAPI + uvicorn: the `serve` extra).

    GET  /v1/models                  the base and every adapter name
    POST /v1/completions             {"model": adapter or base, "prompt", "max_tokens", "temperature",
    POST /v1/chat/completions         "top_p", "seed", "stop", "stream"}  (chat: "messages" instead of "prompt")
    POST /v1/load_lora_adapter       vLLM's {"lora_name", "lora_path"}: paths inside the adapters folder only
    POST /v1/unload_lora_adapter     {"lora_name"}
    GET  /health, /metrics           liveness; Prometheus text (queue, batch, tokens/s, pool hits/misses)

One engine thread steps the batch; handlers only queue requests and read their tokens, so a bad
request is refused before it reaches the batch and never touches the others. A client that goes
away mid-stream aborts its request, which frees its batch slot, KV blocks and adapter reference.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

from fastapi import Depends, FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException

from loraforge.core.errors import AdapterError
from loraforge.serve.engine import Engine, Request, RequestError, SamplingParams, is_utf8
from loraforge.serve.pool import AdapterBusyError, UnknownAdapterError


class EngineLoop:
    """The thread that steps the engine while it has work and sleeps otherwise."""

    def __init__(self, engine: Engine):
        self.engine, self.wake, self.stopped = engine, threading.Event(), False
        self.thread = threading.Thread(target=self._run, name="loraforge-engine", daemon=True)

    def _run(self) -> None:
        while not self.stopped:
            if not self.engine.has_work():
                self.wake.wait(0.05)
                self.wake.clear()
                continue
            try:
                self.engine.step()
            except Exception as exc:  # noqa: BLE001  a bug must fail the batch, not kill the server
                self.engine.fail_all(f"{type(exc).__name__}: {exc}")


class ApiError(Exception):
    def __init__(self, status: int, message: str):
        self.status, self.message = status, message


class Message(BaseModel):
    role: str
    content: str


class CompletionBody(BaseModel):
    model: str
    prompt: str | list[str] | None = None
    messages: list[Message] | None = None
    max_tokens: int = 16
    temperature: float = 1.0  # OpenAI's default
    top_p: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    ignore_eos: bool = False  # vLLM's extension: run to max_tokens (benchmarks)


class LoadBody(BaseModel):
    lora_name: str
    lora_path: str = Field(default="")


def create_app(engine: Engine, api_key: str | None = None, max_body_bytes: int = 1 << 20) -> FastAPI:
    loop_thread = EngineLoop(engine)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        loop_thread.thread.start()
        yield
        loop_thread.stopped = True

    async def check_key(request: HttpRequest) -> None:
        given = request.headers.get("authorization", "")
        if api_key is not None and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise ApiError(401, "missing or wrong API key (send 'Authorization: Bearer <key>')")

    app = FastAPI(title="loraforge", lifespan=lifespan, dependencies=[Depends(check_key)])
    app.add_middleware(BodyLimit, limit=max_body_bytes)
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def api_error(_: HttpRequest, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(HTTPException)  # FastAPI's own refusals (unknown route, wrong method) in our shape
    async def http_error(_: HttpRequest, exc: HTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: HttpRequest, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        return _error(422, f"invalid request: {first.get('msg', 'bad body')} at {'.'.join(map(str, first.get('loc', ())))}")

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        names = [engine.model_name, *engine.pool.names()]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "loraforge",
                                            "parent": None if n == engine.model_name else engine.model_name}
                                           for n in names]}

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        pool, kv = engine.pool, engine.kv
        lines = {
            "loraforge_queue_length": len(engine.waiting) + len(engine._inbox),
            "loraforge_running_batch_size": len(engine.running),
            "loraforge_generated_tokens_total": engine.generated_tokens,
            "loraforge_preemptions_total": engine.preemptions,
            "loraforge_tokens_per_second": round(engine.tokens_per_second(), 3),
            "loraforge_pool_hits_total": pool.hits,
            "loraforge_pool_misses_total": pool.misses,
            "loraforge_pool_evictions_total": pool.evictions,
            "loraforge_pool_loaded_adapters": len(pool.slot_of),
            "loraforge_kv_blocks_free": kv.free_blocks,
            "loraforge_kv_blocks_total": kv.num_blocks,
        }
        return PlainTextResponse("".join(f"{k} {v}\n" for k, v in lines.items()))

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadBody) -> dict[str, str]:
        await _pool_call(engine.pool.register, body.lora_name, body.lora_path)
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: LoadBody) -> dict[str, str]:
        await _pool_call(engine.pool.unregister, body.lora_name)
        return {"status": "ok", "lora_name": body.lora_name}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Any:
        prompt = body.prompt
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise ApiError(400, "prompt must be a string or a list of exactly one string")
            prompt = prompt[0]
        if prompt is None:
            raise ApiError(422, "invalid request: 'prompt' is required")
        return await _generate(body, prompt, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: CompletionBody) -> Any:
        if not body.messages:
            raise ApiError(422, "invalid request: 'messages' must be a non-empty list")
        if not getattr(engine.tokenizer, "chat_template", None):
            raise ApiError(400, "the base model's tokenizer has no chat template: use /v1/completions")
        messages = [m.model_dump() for m in body.messages]
        if not all(is_utf8(m["role"] + m["content"]) for m in messages):
            raise ApiError(400, "messages are not valid Unicode (a lone surrogate such as \\ud800)")
        try:
            ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        except Exception as exc:  # noqa: BLE001  the template refuses these messages (raise_exception, bad roles)
            raise ApiError(400, f"the chat template refused these messages: {exc}") from exc
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        return await _generate(body, list(ids), chat=True)

    async def _generate(body: CompletionBody, prompt: str | list[int], chat: bool) -> Any:
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[str] = asyncio.Queue()

        def on_event(_: Request, delta: str) -> None:  # runs on the engine thread
            loop.call_soon_threadsafe(events.put_nowait, delta)

        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        try:
            params = SamplingParams(body.max_tokens, body.temperature, body.top_p, body.seed, stop, body.ignore_eos)
            adapter = None if body.model == engine.model_name else body.model
            req = await asyncio.to_thread(engine.add_request, prompt, adapter, params, on_event)
        except UnknownAdapterError as exc:
            raise ApiError(404, str(exc)) from exc
        except (RequestError, AdapterError) as exc:
            raise ApiError(400, str(exc)) from exc
        loop_thread.wake.set()
        meta = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex[:24]}", "created": int(time.time()),
                "model": body.model}

        async def deltas() -> AsyncIterator[str]:
            try:
                while True:
                    delta = await events.get()
                    if delta:
                        yield delta
                    elif req.finish_reason is not None:
                        return
            finally:
                if req.finish_reason is None:  # the client went away: free its slot and blocks
                    engine.abort(req)
                    loop_thread.wake.set()

        if body.stream:
            return StreamingResponse(_sse(deltas(), req, meta, chat), media_type="text/event-stream")
        text = "".join([d async for d in deltas()])
        if req.finish_reason.startswith("refused"):  # its adapter was unloaded while it waited
            raise ApiError(409, f"request {req.finish_reason}")
        if req.finish_reason.startswith("error"):
            raise ApiError(500, f"generation failed ({req.finish_reason})")
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}} if chat
                  else {"index": 0, "text": text, "logprobs": None})
        usage = {"prompt_tokens": len(req.prompt_ids), "completion_tokens": len(req.output_ids),
                 "total_tokens": len(req.prompt_ids) + len(req.output_ids)}
        return {**meta, "object": "chat.completion" if chat else "text_completion",
                "choices": [{**choice, "finish_reason": req.finish_reason}], "usage": usage}

    return app


async def _sse(deltas: AsyncIterator[str], req: Request, meta: dict, chat: bool) -> AsyncIterator[str]:
    """Server-sent events, one per text delta, then the finish reason and [DONE]."""
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None) -> str:
        choice = {"index": 0, "delta": {"content": text} if text is not None else {}} if chat else \
            {"index": 0, "text": text or "", "logprobs": None}
        return f"data: {json.dumps({**meta, 'object': obj, 'choices': [{**choice, 'finish_reason': finish}]})}\n\n"

    async for delta in deltas:
        yield chunk(delta, None)
    yield chunk(None, req.finish_reason)
    yield "data: [DONE]\n\n"


async def _pool_call(fn: Any, *args: Any) -> None:
    try:
        await asyncio.to_thread(fn, *args)
    except UnknownAdapterError as exc:
        raise ApiError(404, str(exc)) from exc
    except AdapterBusyError as exc:
        raise ApiError(409, str(exc)) from exc
    except AdapterError as exc:
        raise ApiError(400, str(exc)) from exc


def _json_problem(body: bytes) -> str | None:
    """Why `body` is not UTF-8 JSON, or None if it is."""
    try:
        json.loads(body.decode("utf-8"))  # decoded first: json.loads would guess UTF-16 or UTF-32 from bytes
    except UnicodeDecodeError as exc:
        return f"the body is not valid UTF-8 ({exc.reason} at byte {exc.start})"
    except RecursionError:
        return "the JSON body is nested too deeply"
    except ValueError as exc:  # syntax, and integers longer than Python's 4300-digit limit
        return f"the body is not valid JSON: {exc}"
    return None


def _error(status: int, message: str) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}}, status_code=status)


class BodyLimit:
    """ASGI middleware: a request body over `limit` bytes gets 413 before any handler reads it, and one
    that is not UTF-8 JSON (or nests too deeply for the parser) a 400 that says which, in place of
    FastAPI's bare 'error parsing the body'."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size, more = size + len(chunks[-1]), message.get("more_body", False)
            if size > self.limit:
                return await _error(413, f"request body larger than {self.limit} bytes")(scope, receive, send)
        body, replayed = b"".join(chunks), False
        problem = _json_problem(body) if scope["method"] == "POST" and body else None
        if problem:
            return await _error(400, problem)(scope, receive, send)

        async def replay() -> dict:
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: disconnects reach the streaming response
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)
