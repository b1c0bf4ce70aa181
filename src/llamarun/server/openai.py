"""The OpenAI API: /v1/models, /v1/chat/completions and /v1/completions, behind the server's
--api-key. Each request becomes one `Job` per prompt and choice (jobs.py) and is answered with
JSON, or with server-sent events ending in `data: [DONE]` for stream=true."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import APIRouter, Depends, Request
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel

from .. import guided, tools
from ..errors import RequestError
from ..llm import LLM
from ..tokenizer import Tokenizer
from . import builders as b
from . import protocol as p
from .http_errors import APIError, error_response
from .jobs import emitter, make_jobs, run_jobs
from .scheduler import Event, Job
from .state import ServerState, get_state

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions


async def require_key(request: Request) -> None:
    api_key = get_state(request).api_key
    given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if api_key is not None and not secrets.compare_digest(given.encode(), api_key.encode()):
        raise APIError(
            401,
            "missing or incorrect API key: send the server's --api-key as the header 'Authorization: Bearer KEY'",
            code="invalid_api_key",
        )


router = APIRouter(prefix="/v1", dependencies=[Depends(require_key)])


@router.get("/models")
async def models(request: Request) -> p.ModelList:
    state = get_state(request)
    return p.ModelList(data=[p.ModelCard(id=state.model_name, created=state.created)])


@router.post("/chat/completions", response_model=None)
async def chat_completions(
    body: p.ChatCompletionRequest, request: Request
) -> p.ChatCompletion | EventSourceResponse:
    state = get_state(request)
    check_model(state, body.model)
    if state.no_chat is not None:
        raise RequestError(state.no_chat, param="messages")
    messages = [m.as_dict() for m in body.messages]
    offered = tools.tool_request(body.tools, body.tool_choice, body.parallel_tool_calls)
    constraint, source = body.constraint()
    try:
        answer = guided.make_guide(**constraint)
        plan = tools.prepare_chat(state.chat_format, state.tokenizer, messages, offered, answer)
    except RequestError as e:
        raise body.request_error(e, source) from e
    if plan.constraint is not None:  # the tools' format decides what the answer may be
        constraint, source = plan.constraint, None
    prompts = [plan.prompt_ids]
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    events: asyncio.Queue[Event] = asyncio.Queue()
    jobs = make_jobs(
        state.llm,
        prompts,
        body,
        max_tokens,
        emitter(events),
        stop_ids=frozenset(state.chat_format.stop_ids),
        logprobs=logprobs,
        lstrip=True,
        constraint=(constraint, source),
    )
    answer = _Answer(state, request, f"chatcmpl-{secrets.token_hex(12)}", prompts, jobs, events)
    answer.reader = plan.reader
    if body.stream:
        return EventSourceResponse(sse_stream(_chat_chunks(answer, _include_usage(body))))
    return await _chat_completion(answer, logprobs is not None and plan.reader is None)


@router.post("/completions", response_model=None)
async def completions(
    body: p.CompletionRequest, request: Request
) -> p.Completion | EventSourceResponse:
    state = get_state(request)
    check_model(state, body.model)
    prompts, prompt_texts = encode_prompts(state.llm, body.prompt)
    max_tokens = DEFAULT_COMPLETION_TOKENS if body.max_tokens is None else body.max_tokens
    scored = body.echo and body.logprobs is not None
    events: asyncio.Queue[Event] = asyncio.Queue()
    jobs = make_jobs(
        state.llm,
        prompts,
        body,
        max_tokens,
        emitter(events),
        logprobs=body.logprobs,
        score_prompt=scored,
    )
    answer = _Answer(state, request, f"cmpl-{secrets.token_hex(12)}", prompts, jobs, events)
    choice_of = _CompletionChoices(state.tokenizer, body, prompt_texts, jobs)
    if body.stream:
        return EventSourceResponse(
            sse_stream(_completion_chunks(answer, choice_of, _include_usage(body)))
        )
    return await _completion(answer, choice_of, body.logprobs is not None)


def check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(
            404,
            f"the model '{name}' does not exist: this server serves '{state.model_name}'",
            "model",
            "model_not_found",
        )


def encode_prompts(llm: LLM, prompt: str | list) -> tuple[list[list[int]], list[str]]:
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
    return ids, [x if isinstance(x, str) else llm.tokenizer.decode(x) for x in prompt]


async def sse_stream(chunks: AsyncIterator[BaseModel]) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            yield format_sse_event(data_str=chunk.model_dump_json())
    except Exception as e:  # the 200 status is already sent: report the error in the stream
        yield format_sse_event(data_str=json.dumps(error_response(e)[1]))
    yield format_sse_event(data_str="[DONE]")


def _include_usage(body: p.SamplingRequest) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


@dataclass
class _Answer:
    """One request's jobs on the engine, and what every part of its answer repeats."""

    state: ServerState
    request: Request
    id: str
    prompts: list[list[int]]
    jobs: list[Job]
    events: asyncio.Queue[Event]
    created: int = field(default_factory=lambda: int(time.time()))
    reader: tools.ToolReader | None = None  # a chat answer that may call tools

    def run(self, *, watch: bool) -> AsyncIterator[Event]:
        return run_jobs(self.state.scheduler, self.request, self.jobs, self.events, watch=watch)

    def usage(self) -> p.Usage:
        return b.usage(sum(map(len, self.prompts)), sum(j.n_tokens for j in self.jobs))


async def _chat_chunks(answer: _Answer, include_usage: bool) -> AsyncIterator[BaseModel]:
    def chunk(
        choices: list[p.ChatChunkChoice], usage: p.Usage | None = None
    ) -> p.ChatCompletionChunk:
        return p.ChatCompletionChunk(
            id=answer.id,
            created=answer.created,
            model=answer.state.model_name,
            choices=choices,
            usage=usage,
        )

    tokenizer = answer.state.tokenizer
    streams = {j.index: answer.reader.stream() for j in answer.jobs} if answer.reader else {}
    yield chunk(b.chat_role_choices(j.index for j in answer.jobs))
    async for ev in answer.run(watch=False):
        reason = ev.finish_reason
        if ev.index in streams:  # text and tool calls, read from the answer as it grows
            deltas = streams[ev.index].push(ev.text)
            if reason:
                tail, _, calls = streams[ev.index].finish()
                deltas, reason = deltas + tail, tools.finish_reason(reason, calls)
            for delta in deltas:
                yield chunk([b.chat_tool_choice(ev.index, delta)])
        else:
            lp = b.chat_logprobs(tokenizer, ev.token_id, ev.logprob, ev.top_logprobs)
            if ev.text or lp:
                yield chunk([b.chat_text_choice(ev.index, ev.text, lp)])
        if reason:
            yield chunk([b.chat_finish_choice(ev.index, reason)])
    if include_usage:
        yield chunk([], answer.usage())


async def _chat_completion(answer: _Answer, with_logprobs: bool) -> p.ChatCompletion:
    n, tokenizer = len(answer.jobs), answer.state.tokenizer
    texts, reasons, lps = [""] * n, [""] * n, [[] for _ in range(n)]
    async for ev in answer.run(watch=True):
        texts[ev.index] += ev.text
        reasons[ev.index] = ev.finish_reason or reasons[ev.index]
        lp = b.chat_logprobs(tokenizer, ev.token_id, ev.logprob, ev.top_logprobs)
        if lp is not None:
            lps[ev.index] += lp.content
    choices = []
    for i in range(n):
        message = p.AssistantMessage(content=texts[i])
        if answer.reader is not None:
            content, calls = answer.reader.final(texts[i])
            message = p.AssistantMessage(
                content=content, tool_calls=b.tool_calls(answer.reader.ids(calls))
            )
            reasons[i] = tools.finish_reason(reasons[i], calls)
        lp = p.ChoiceLogprobs(content=lps[i]) if with_logprobs else None
        choices.append(
            p.ChatChoice(index=i, message=message, finish_reason=reasons[i], logprobs=lp)
        )
    return p.ChatCompletion(
        id=answer.id,
        created=answer.created,
        model=answer.state.model_name,
        choices=choices,
        usage=answer.usage(),
    )


@dataclass
class _CompletionChoices:
    """Turns a job's events into completion choices, in order: with echo, a job's first event
    carries the prompt's text and scores; logprob text offsets count on from what the choice has
    sent so far."""

    tokenizer: Tokenizer
    body: p.CompletionRequest
    prompt_texts: list[str]
    jobs: list[Job]

    def __post_init__(self) -> None:
        self.offsets = [0] * len(self.jobs)  # characters of text sent so far, per choice
        self.echoed = [not self.body.echo] * len(self.jobs)

    def __call__(self, ev: Event) -> p.CompletionChoice:
        body, text, scores = self.body, ev.text, []
        if not self.echoed[ev.index]:  # a job's first event comes from its prefill
            self.echoed[ev.index] = True
            text = self.prompt_texts[ev.index // body.n] + text
            if ev.prompt_logprobs is not None:
                prompt_ids = self.jobs[ev.index].prompt_ids
                scores = [(t, lp, alts) for t, (lp, alts) in zip(prompt_ids, ev.prompt_logprobs)]
        if body.logprobs is not None and ev.token_id is not None:
            scores.append((ev.token_id, ev.logprob, ev.top_logprobs))
        lp = (
            b.completion_logprobs(self.tokenizer, scores, self.offsets[ev.index])
            if body.logprobs is not None
            else None
        )
        self.offsets[ev.index] += len(text)
        return p.CompletionChoice(
            index=ev.index, text=text, logprobs=lp, finish_reason=ev.finish_reason
        )


async def _completion_chunks(
    answer: _Answer, choice_of: _CompletionChoices, include_usage: bool
) -> AsyncIterator[BaseModel]:
    model = answer.state.model_name
    async for ev in answer.run(watch=False):
        yield p.Completion(
            id=answer.id, created=answer.created, model=model, choices=[choice_of(ev)]
        )
    if include_usage:
        yield p.Completion(
            id=answer.id, created=answer.created, model=model, choices=[], usage=answer.usage()
        )


async def _completion(
    answer: _Answer, choice_of: _CompletionChoices, with_logprobs: bool
) -> p.Completion:
    merged = [
        p.CompletionChoice(
            index=i, text="", logprobs=p.CompletionLogprobs() if with_logprobs else None
        )
        for i in range(len(answer.jobs))
    ]
    async for ev in answer.run(watch=True):
        part, whole = choice_of(ev), merged[ev.index]
        whole.text += part.text
        whole.finish_reason = part.finish_reason or whole.finish_reason
        if part.logprobs is not None:
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(whole.logprobs, name).extend(getattr(part.logprobs, name))
    return p.Completion(
        id=answer.id,
        created=answer.created,
        model=answer.state.model_name,
        choices=merged,
        usage=answer.usage(),
    )
