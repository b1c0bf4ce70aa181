"""A request's life on the engine thread, for any API: `make_jobs` checks each prompt against the
context and makes one `Job` per prompt and choice, `run_jobs` submits them and yields their
events on the request's event loop (where `emitter` delivers them), cancelling what is left when
the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from fastapi import Request

from ..errors import RequestError
from ..llm import LLM, TextStream
from . import protocol as p
from .scheduler import Event, Job, Scheduler


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
        llm.engine.check_prompt(prompt_ids)
        budget = llm.max_seq_len - len(prompt_ids)
        wanted = budget if max_tokens is None else max_tokens
        if wanted > budget:
            raise RequestError(
                f"this model's context is {llm.max_seq_len} tokens, but the prompt has {len(prompt_ids)} tokens and max_tokens "
                f"is {wanted} ({len(prompt_ids) + wanted} in total): shorten the prompt or set max_tokens to at most {budget}",
                param="max_tokens",
            )
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
