"""OpenAI-compatible routes on FastAPI: /v1/models, /v1/completions, /v1/chat/completions and
/health. Each request becomes one `Job` per choice for the engine thread (server/engine.py) and
reads their events from one asyncio queue, answering with JSON or server-sent events."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel

from ..errors import RequestError, TokenizerError
from ..llm import LLM
from . import protocol as p
from .http_errors import APIError, add_error_handlers, error_response
from .jobs import emitter, make_jobs, run_jobs
from .scheduler import Event, Job, Scheduler

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


def create_app(
    llm: LLM, *, model_name: str, api_key: str | None = None, chat_format=None
) -> FastAPI:
    """chat_format: renders chat messages (default: the model's own, `llm.chat_format`)."""
    tokenizer = llm.tokenizer
    if tokenizer is None:
        raise TokenizerError("the server needs a tokenizer: pass --tokenizer PATH")
    no_chat = None  # why /v1/chat/completions is refused, for a base model
    if chat_format is None:
        try:
            chat_format = llm.chat_format
        except TokenizerError:
            no_chat = (
                "this model has no chat template or chat tokens, so it only continues text: use "
                "/v1/completions, or restart the server with --chat-template NAME|FILE"
            )
    scheduler = Scheduler(llm)
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.stop)  # uvicorn has already let in-flight requests finish

    async def check_key(request: Request) -> None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if api_key is not None and not secrets.compare_digest(given.encode(), api_key.encode()):
            raise APIError(
                401,
                "missing or incorrect API key: send the server's --api-key as the header 'Authorization: Bearer KEY'",
                code="invalid_api_key",
            )

    app = FastAPI(title="llamarun", lifespan=lifespan)
    app.state.scheduler = scheduler
    v1 = [Depends(check_key)]

    add_error_handlers(app)

    @app.get("/health")
    async def health() -> dict:
        return {
            "status": "ok",
            "running": len(scheduler.running),
            "waiting": len(scheduler.waiting) + scheduler.inbox.qsize(),
        }

    @app.get("/v1/models", dependencies=v1)
    async def models() -> p.ModelList:
        return p.ModelList(data=[p.ModelCard(id=model_name, created=created)])

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise APIError(
                404,
                f"the model '{name}' does not exist: this server serves '{model_name}'",
                "model",
                "model_not_found",
            )

    def usage(prompts: list[list[int]], jobs: list[Job]) -> p.Usage:
        return p.usage(sum(map(len, prompts)), sum(j.n_tokens for j in jobs))

    def chat_logprobs(event: Event) -> p.ChoiceLogprobs | None:
        return p.chat_logprobs(tokenizer, event.token_id, event.logprob, event.top_logprobs)

    async def sse_stream(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
        try:
            async for chunk in chunks:
                yield format_sse_event(data_str=chunk.model_dump_json())
        except Exception as e:  # the 200 status is already sent: report the error in the stream
            yield format_sse_event(data_str=json.dumps(error_response(e)[1]))
        yield format_sse_event(data_str="[DONE]")

    @app.post("/v1/chat/completions", dependencies=v1)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        check_model(body.model)
        if no_chat is not None:
            raise RequestError(no_chat, param="messages")
        prompts = [
            list(
                chat_format.encode_dialog(
                    [m.as_dict() for m in body.messages], add_generation_prompt=True
                )
            )
        ]
        events: asyncio.Queue[Event] = asyncio.Queue()
        max_tokens = (
            body.max_completion_tokens
            if body.max_completion_tokens is not None
            else body.max_tokens
        )
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        jobs = make_jobs(
            llm,
            prompts,
            body,
            max_tokens,
            emitter(events),
            stop_ids=frozenset(chat_format.stop_ids),
            logprobs=logprobs,
            lstrip=True,
        )
        rid, now = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())

        def chunk(
            choices: list[p.ChatChunkChoice], usage: p.Usage | None = None
        ) -> p.ChatCompletionChunk:
            return p.ChatCompletionChunk(
                id=rid, created=now, model=model_name, choices=choices, usage=usage
            )

        async def chunks() -> AsyncIterator[BaseModel]:
            yield chunk(p.chat_role_choices(j.index for j in jobs))
            async for ev in run_jobs(scheduler, request, jobs, events, watch=False):
                lp = chat_logprobs(ev)
                if ev.text or lp:
                    yield chunk([p.chat_text_choice(ev.index, ev.text, lp)])
                if ev.finish_reason:
                    yield chunk([p.chat_finish_choice(ev.index, ev.finish_reason)])
            if body.stream_options and body.stream_options.include_usage:
                yield chunk([], usage(prompts, jobs))

        if body.stream:
            return EventSourceResponse(sse_stream(chunks()))
        texts, reasons, lps = [""] * len(jobs), [""] * len(jobs), [[] for _ in jobs]
        async for ev in run_jobs(scheduler, request, jobs, events, watch=True):
            texts[ev.index] += ev.text
            reasons[ev.index] = ev.finish_reason or reasons[ev.index]
            if (lp := chat_logprobs(ev)) is not None:
                lps[ev.index] += lp.content
        choices = [
            p.ChatChoice(
                index=i,
                message=p.AssistantMessage(content=texts[i]),
                finish_reason=reasons[i],
                logprobs=None if logprobs is None else p.ChoiceLogprobs(content=lps[i]),
            )
            for i in range(len(jobs))
        ]
        return p.ChatCompletion(
            id=rid, created=now, model=model_name, choices=choices, usage=usage(prompts, jobs)
        )

    def encode_prompts(prompt: str | list) -> tuple[list[list[int]], list[str]]:
        """Token ids of each prompt, and its text for echo."""
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise RequestError(
                "prompt is an empty list: give a string, a list of strings or token ids",
                param="prompt",
            )
        if isinstance(prompt[0], int):
            prompt = [prompt]
        ids = [llm.encode(x) if isinstance(x, str) else list(x) for x in prompt]
        return ids, [x if isinstance(x, str) else tokenizer.decode(x) for x in prompt]

    @app.post("/v1/completions", dependencies=v1)
    async def completions(body: p.CompletionRequest, request: Request):
        check_model(body.model)
        prompts, prompt_texts = encode_prompts(body.prompt)
        events: asyncio.Queue[Event] = asyncio.Queue()
        max_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
        scored = body.echo and body.logprobs is not None
        jobs = make_jobs(
            llm,
            prompts,
            body,
            max_tokens,
            emitter(events),
            logprobs=body.logprobs,
            score_prompt=scored,
        )
        rid, now = f"cmpl-{secrets.token_hex(12)}", int(time.time())
        offsets = [0] * len(jobs)  # characters of text sent so far, per choice
        echoed = [not body.echo] * len(jobs)

        def choice_of(ev: Event) -> p.CompletionChoice:
            text, scores = ev.text, []
            if not echoed[ev.index]:  # a job's first event comes from its prefill
                echoed[ev.index] = True
                text = prompt_texts[ev.index // body.n] + text
                if ev.prompt_logprobs is not None:
                    scores = [
                        (t, lp, alts)
                        for t, (lp, alts) in zip(jobs[ev.index].prompt_ids, ev.prompt_logprobs)
                    ]
            if body.logprobs is not None and ev.token_id is not None:
                scores.append((ev.token_id, ev.logprob, ev.top_logprobs))
            lp = (
                p.completion_logprobs(tokenizer, scores, offsets[ev.index])
                if body.logprobs is not None
                else None
            )
            offsets[ev.index] += len(text)
            return p.CompletionChoice(
                index=ev.index, text=text, logprobs=lp, finish_reason=ev.finish_reason
            )

        async def chunks() -> AsyncIterator[BaseModel]:
            async for ev in run_jobs(scheduler, request, jobs, events, watch=False):
                yield p.Completion(id=rid, created=now, model=model_name, choices=[choice_of(ev)])
            if body.stream_options and body.stream_options.include_usage:
                yield p.Completion(
                    id=rid, created=now, model=model_name, choices=[], usage=usage(prompts, jobs)
                )

        if body.stream:
            return EventSourceResponse(sse_stream(chunks()))
        merged = [
            p.CompletionChoice(
                index=i,
                text="",
                logprobs=p.CompletionLogprobs() if body.logprobs is not None else None,
            )
            for i in range(len(jobs))
        ]
        async for ev in run_jobs(scheduler, request, jobs, events, watch=True):
            part, whole = choice_of(ev), merged[ev.index]
            whole.text += part.text
            whole.finish_reason = part.finish_reason or whole.finish_reason
            if part.logprobs is not None:
                for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                    getattr(whole.logprobs, name).extend(getattr(part.logprobs, name))
        return p.Completion(
            id=rid, created=now, model=model_name, choices=merged, usage=usage(prompts, jobs)
        )

    return app
