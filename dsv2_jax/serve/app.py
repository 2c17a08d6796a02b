"""The OpenAI-compatible HTTP API (FastAPI): /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics.

Requests become token ids (prompt text through the checkpoint's tokenizer; chat messages through its chat
template), are queued on the AsyncEngine, and stream back as text (SSE with `stream: true`). Stop strings end a
request early (its pages are freed at once); so does a client that goes away.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse

from dsv2_jax.serve.async_engine import AsyncEngine, Handle, Overloaded
from dsv2_jax.serve.chat_template import ChatTemplate
from dsv2_jax.serve.openai_api import APIError, ChatCompletionRequest, CompletionRequest
from dsv2_jax.serve.text_stream import TextStream

DISCONNECT_POLL_S = 0.2
COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def create_app(engine: AsyncEngine, tokenizer, model_name: str, chat_template: ChatTemplate | None,
               bos_id: int | None, eos_ids: tuple[int, ...]) -> FastAPI:
    app = FastAPI(title="dsv2 serve")
    sched = engine.scheduler
    created = int(time.time())

    @app.exception_handler(APIError)
    async def _api_error(_, e: APIError):
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_, e: RequestValidationError):
        err = e.errors()[0] if e.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        msg = f"{'.'.join(loc) or 'body'}: {err.get('msg', 'invalid request')}"
        return JSONResponse(APIError(400, msg, loc[0] if loc else None).body(), status_code=400)

    @app.get("/health")
    async def health():
        if engine.error is not None:
            return JSONResponse({"status": "error", "error": str(engine.error)}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(engine.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created,
                                            "owned_by": "dsv2-jax", "max_model_len": sched.max_model_len}]}

    def check_model(name):
        if name not in (None, model_name):
            raise APIError(404, f"model {name!r} does not exist; this server serves {model_name!r}", "model",
                           "not_found_error")

    def submit(ids: list[int], params) -> Handle:
        try:
            return engine.submit(ids, params)
        except ValueError as e:
            raise APIError(400, str(e), "prompt") from None
        except Overloaded as e:
            raise APIError(429, f"server overloaded: {e}; retry later", None, "rate_limit_error") from None

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http: HTTPRequest):
        body.check()
        check_model(body.model)
        if isinstance(body.prompt, list) and body.prompt and isinstance(body.prompt[0], int):
            ids = list(body.prompt)
        else:
            text = body.prompt[0] if isinstance(body.prompt, list) else body.prompt
            ids = ([bos_id] if bos_id is not None else []) + tokenizer.encode(text or "")
        params = body.sampling(body.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, eos_ids)
        return await respond(body, ids, params, http, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http: HTTPRequest):
        body.check()
        check_model(body.model)
        if chat_template is None:
            raise APIError(400, "this checkpoint has no chat_template in tokenizer_config.json; use /v1/completions",
                           "messages")
        text = chat_template.render([{"role": m.role, "content": m.text()} for m in body.messages])
        ids = tokenizer.encode(text)  # the template writes the bos token itself
        default_max = max(sched.max_model_len - len(ids), 1)
        params = body.sampling(body.max_completion_tokens or body.max_tokens, default_max, eos_ids)
        return await respond(body, ids, params, http, chat=True)

    async def respond(body, ids, params, http: HTTPRequest, chat: bool):
        handle = submit(ids, params)
        stream = TextStream(tokenizer, body.stops())
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        meta = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": int(time.time()),
                "model": model_name}
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(sse(handle, stream, meta, chat, include_usage, len(ids)),
                                     media_type="text/event-stream")
        n_out, reason = await collect(handle, stream, http)
        text = stream.text
        choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}
                  if chat else {"index": 0, "text": text, "finish_reason": reason, "logprobs": None})
        return {**meta, "object": "chat.completion" if chat else "text_completion", "choices": [choice],
                "usage": usage(len(ids), n_out)}

    async def collect(handle: Handle, stream: TextStream, http: HTTPRequest):
        """All tokens of a non-streamed request; aborts it if the client disconnects while waiting."""
        n_out = 0

        async def consume():
            nonlocal n_out
            async for tok in handle.tokens():
                n_out += 1
                stream.push(tok)
                if stream.stopped:
                    engine.abort(handle)
                    return

        task = asyncio.create_task(consume())
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await http.is_disconnected():
                    engine.abort(handle)
                    task.cancel()
                    raise APIError(499, "client disconnected")
            task.result()
            if handle.request.finish_reason == "error":
                raise APIError(500, f"engine failed: {engine.error}", None, "server_error")
        finally:
            if not task.done():
                task.cancel()
                engine.abort(handle)
        return n_out, finish_reason(handle, stream)

    async def sse(handle: Handle, stream: TextStream, meta: dict, chat: bool, include_usage: bool, n_prompt: int):
        n_out = 0

        def event(delta: str | None, reason: str | None = None, role: bool = False) -> str:
            if chat:
                d = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": d, "finish_reason": reason}
            else:
                choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            return f"data: {json.dumps({**meta, 'choices': [choice]})}\n\n"

        try:
            if chat:
                yield event(None, role=True)
            async for tok in handle.tokens():
                n_out += 1
                delta = stream.push(tok)
                if delta:
                    yield event(delta)
                if stream.stopped:
                    engine.abort(handle)
                    break
            tail = stream.flush()
            yield event(tail if tail else (None if chat else ""), finish_reason(handle, stream))
            if include_usage:
                yield f"data: {json.dumps({**meta, 'choices': [], 'usage': usage(n_prompt, n_out)})}\n\n"
            yield "data: [DONE]\n\n"
        finally:
            engine.abort(handle)  # a client gone mid-stream cancels this generator: free its pages now

    return app


def finish_reason(handle: Handle, stream: TextStream) -> str:
    if stream.stopped:
        return "stop"
    return "length" if handle.request.finish_reason == "length" else "stop"


def usage(n_prompt: int, n_out: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}
