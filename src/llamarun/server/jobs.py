"""A request's life on the engine thread, for any API: `make_jobs` checks each prompt against the
context and makes one `Job` per prompt and choice (`Generation` one job for one answer),
`run_jobs` submits them and yields their events on the request's event loop (where `emitter`
delivers them), cancelling what is left when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fastapi import Request

from .. import tools
from ..errors import RequestError
from ..llm import LLM, TextStream
from ..sampling import SamplingParams
from ..tokenizer.chat import Message
from . import protocol as p
from .scheduler import Event, Job, Scheduler
from .state import ServerState


def make_jobs(
    llm: LLM,
    prompts: list[list[int]],
    body: p.SamplingRequest,
    max_tokens: int | None,
    emit: Callable[[Event], None],
    *,
    stop_ids: frozenset[int] = frozenset(),
    lstrip: bool = False,
    constraint: tuple[dict, str | None] | None = None,
    **job_args,
) -> list[Job]:
    """One job per prompt and choice; max_tokens None: all the context the prompt leaves.
    constraint: SamplingParams keywords for the output and the request field they came from,
    default the body's own (`constraint()`); compiled here, so a schema or grammar that cannot
    work is a 400 before any token."""
    body.log_ignored()
    constraint, source = body.constraint() if constraint is None else constraint
    jobs = []
    for prompt_ids in prompts:
        wanted = token_budget(llm, prompt_ids, max_tokens)
        for choice in range(body.n):
            params = body.to_sampling_params(wanted, choice, constraint, source)
            if not jobs:
                try:  # once per request: every choice and prompt shares the compiled grammar
                    llm.engine.compile(params)
                except RequestError as e:
                    raise body.request_error(e, source) from e
            stream = TextStream(llm.tokenizer, params.stop, lstrip=lstrip)
            jobs.append(Job(len(jobs), prompt_ids, params, stream, stop_ids, emit, **job_args))
    return jobs


def token_budget(
    llm: LLM, prompt_ids: list[int], max_tokens: int | None, param: str = "max_tokens"
) -> int:
    """New tokens a prompt may have: `max_tokens`, or None for all the context it leaves; more
    than the context leaves is a RequestError naming the API's `param`."""
    llm.engine.check_prompt(prompt_ids)
    budget = llm.max_seq_len - len(prompt_ids)
    wanted = budget if max_tokens is None else max_tokens
    if wanted > budget:
        raise RequestError(
            f"this model's context is {llm.max_seq_len} tokens, but the prompt has {len(prompt_ids)} tokens and {param} "
            f"is {wanted} ({len(prompt_ids) + wanted} in total): shorten the prompt or set {param} to at most {budget}",
            param=param,
        )
    return wanted


def chat_plan(
    state: ServerState,
    messages: list[Message],
    offered: tools.ToolRequest | None,
    answer: SamplingParams | None = None,
) -> tools.ChatPlan:
    """The prompt of a dialog offering `offered`'s tools (tools.prepare_chat), with the reader
    of the calls in the answer; answer: SamplingParams whose constraint (a JSON schema) the
    text answer keeps beside the tools."""
    if state.no_chat is not None:
        raise RequestError(state.no_chat, param="messages")
    guide = answer.guide if answer is not None else None
    return tools.prepare_chat(state.chat_format, state.tokenizer, messages, offered, guide)


@dataclass(eq=False)
class Generation:
    """One prompt and one answer on the engine thread: what the Responses, Anthropic and ollama
    routes run (OpenAI's choices, echo and logprobs stay with openai.py's make_jobs). reader:
    how the answer's text splits into content and tool calls (None: all text)."""

    scheduler: Scheduler
    request: Request
    job: Job
    events: asyncio.Queue[Event]
    reader: tools.ToolReader | None = None
    # the final content and calls, set as `deltas` ends
    streamed: tuple[str | None, list[tools.ToolCall]] = field(default_factory=lambda: ("", []))

    @classmethod
    def start(
        cls,
        state: ServerState,
        request: Request,
        prompt_ids: list[int],
        params: SamplingParams,
        *,
        chat: bool,
        reader: tools.ToolReader | None = None,
    ) -> Generation:
        """chat: the prompt is a rendered dialog, so the answer ends at the format's end of turn
        and its leading space is dropped, as the chat completions route does. A constraint in
        params is compiled here, so one that cannot work is a RequestError before any token."""
        state.llm.engine.compile(params)
        events: asyncio.Queue[Event] = asyncio.Queue()
        stop_ids = frozenset(state.chat_format.stop_ids) if chat else frozenset()
        stream = TextStream(state.tokenizer, params.stop, lstrip=chat)
        job = Job(0, prompt_ids, params, stream, stop_ids, emitter(events))
        return cls(state.scheduler, request, job, events, reader)

    def answer(self, text: str, reason: str) -> tuple[str | None, list[tools.ToolCall], str]:
        """A finished answer's content (None: only calls), calls (with ids) and finish reason,
        "tool_calls" when it ended by itself with calls."""
        if self.reader is None:
            return text, [], reason
        content, calls = self.reader.final(text)
        return content, self.reader.ids(calls), tools.finish_reason(reason, calls)

    async def deltas(self) -> AsyncIterator[tuple[list[tools.Delta], str | None]]:
        """The streamed answer as (deltas, finish reason) per event: text pieces, and each call's
        id and name once, then fragments of its arguments; the finish reason with the last,
        when `streamed` holds the final content and calls (their ids those streamed)."""
        stream = self.reader.stream() if self.reader is not None else None
        text = ""
        async for ev in self.run(watch=False):
            reason = ev.finish_reason
            if stream is None:
                text += ev.text
                deltas = [tools.Delta(content=ev.text)] if ev.text else []
                if reason:
                    self.streamed = (text, [])
            else:
                deltas = stream.push(ev.text)
                if reason:
                    tail, content, calls = stream.finish()
                    deltas, reason = deltas + tail, tools.finish_reason(reason, calls)
                    self.streamed = (content, calls)
            yield deltas, reason

    def run(self, *, watch: bool) -> AsyncIterator[Event]:
        return run_jobs(self.scheduler, self.request, [self.job], self.events, watch=watch)

    @property
    def prompt_tokens(self) -> int:
        return len(self.job.prompt_ids)

    @property
    def completion_tokens(self) -> int:
        return self.job.n_tokens

    @property
    def cached_tokens(self) -> int:
        return self.job.cached_tokens

    @property
    def stop_string(self) -> str | None:
        """The stop string that ended the answer, if one did."""
        return self.job.stream.stop_string


def emitter(events: asyncio.Queue[Event]) -> Callable[[Event], None]:
    """A thread-safe `emit` for the engine thread that puts events on `events` in this loop."""
    loop = asyncio.get_running_loop()

    def emit(event: Event) -> None:
        try:
            loop.call_soon_threadsafe(events.put_nowait, event)
        except RuntimeError:  # the loop has closed: nobody is listening any more
            pass

    return emit


async def run_jobs(
    scheduler: Scheduler,
    request: Request,
    jobs: list[Job],
    events: asyncio.Queue[Event],
    *,
    watch: bool,
) -> AsyncIterator[Event]:
    """Events of `jobs` until all finish. Cancels them when the client leaves: a streaming
    response is cancelled by Starlette; otherwise (watch=True) poll for the disconnect."""
    scheduler.submit(jobs)
    remaining = len(jobs)
    try:
        while remaining:
            try:
                event = await (asyncio.wait_for(events.get(), 0.5) if watch else events.get())
            except TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            if event.error is not None:
                raise event.error
            remaining -= event.finish_reason is not None
            yield event
    finally:
        if remaining:
            scheduler.cancel(jobs)
