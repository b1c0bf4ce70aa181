"""Continuous batching: one thread owns the model's `Engine` and, between decode steps, admits
waiting requests into free slots (prefilling them) and retires finished or abandoned ones.
Each choice of each HTTP request is one `Job`; its tokens come back as `Event`s via `emit`.
With speculative decoding a request running alone gets several tokens a step; with more
requests running they all decode plainly, and the log says when that starts and ends."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from ..engine import StepOutput, TopLogprobs
from ..errors import DistributedError
from ..llm import LLM, TextStream
from ..sampling import SamplingParams

log = logging.getLogger("llamarun.server")


@dataclass
class Event:
    index: int  # choice index within its HTTP request
    text: str = ""  # text now safe to show (stop strings held back and cut)
    token_id: int | None = None  # None for a stop token, which is never shown
    logprob: float | None = None
    top_logprobs: TopLogprobs = field(default_factory=list)
    finish_reason: str | None = None  # "stop" or "length" on the job's last event
    error: Exception | None = None
    prompt_logprobs: list[tuple[float | None, TopLogprobs]] | None = None  # echo scoring only


@dataclass(eq=False)
class Job:
    index: int
    prompt_ids: list[int]
    params: SamplingParams
    stream: TextStream
    stop_ids: frozenset[int]  # besides the model's own (a chat format's end of turn)
    emit: Callable[[Event], None]  # thread-safe: hands the event to the request's event loop
    logprobs: int | None = None  # top alternatives per token; None: no logprobs
    score_prompt: bool = False  # also report the prompt's own logprobs (completions echo)
    cancelled: bool = False
    n_tokens: int = 0  # tokens sampled so far, stop token included
    cached_tokens: int = 0  # prompt tokens the prefix cache held when the job was admitted
    submitted_at: float = 0.0  # time.monotonic() when it reached the scheduler
    last_token_at: float | None = None


class Observer(Protocol):
    """What is told of each job's tokens, on the engine thread (server/metrics.py)."""

    def token(self, job: Job, now: float) -> None: ...

    def finished(self, job: Job) -> None: ...


class Scheduler:
    def __init__(self, llm: LLM, observer: Observer | None = None):
        self.llm = llm
        self.observer = observer
        self.engine = llm.engine
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.running: dict[int, Job] = {}  # slot -> job
        self.stopping = False
        # A lost rank of a distributed model: every later step would fail, so the loop ends,
        # the requests fail with it, and on_fatal (serve: stop uvicorn) ends the server.
        self.fatal: DistributedError | None = None
        self.on_fatal: Callable[[], None] | None = None
        self.thread = threading.Thread(target=self._loop, name="llamarun-engine", daemon=True)
        self._alone: bool | None = None  # whether the last step could speculate (None: idle)

    def start(self) -> None:
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            job.submitted_at = time.monotonic()
            self.inbox.put(job)
        if self.fatal is not None:  # the engine thread has ended: nobody else would answer
            self._fail_inbox(self.fatal)

    def cancel(self, jobs: list[Job]) -> None:
        """Free the jobs' slots at the next step (the client has gone)."""
        for job in jobs:
            job.cancelled = True
        self.inbox.put(None)  # wake the thread if it sleeps

    def stop(self) -> None:
        """Finish what was admitted or queued, then end the thread."""
        self.stopping = True
        self.inbox.put(None)
        self.thread.join()

    def _loop(self) -> None:
        while self.fatal is None:
            idle = not self.running and not self.waiting
            if idle and self.stopping and self.inbox.empty():
                return
            self._take_inbox(block=idle)
            try:
                self._retire_cancelled()
                self._admit()
                if self.running:
                    self._step()
            except DistributedError as e:
                self._end(e)
            except Exception as e:  # a bug, not a bad request: fail what is in flight, keep serving
                log.exception("engine loop failed")
                for slot in list(self.running):
                    self._fail(slot, e)

    def _end(self, error: DistributedError) -> None:
        self.fatal = error
        for slot in list(self.running):
            self._fail(slot, error)
        for job in self.waiting:
            job.emit(Event(job.index, error=error))
        self.waiting.clear()
        self._fail_inbox(error)
        if self.on_fatal is not None:
            self.on_fatal()

    def _fail_inbox(self, error: Exception) -> None:
        try:
            while True:
                job = self.inbox.get_nowait()
                if job is not None:
                    job.emit(Event(job.index, error=error))
        except queue.Empty:
            pass

    def _take_inbox(self, block: bool) -> None:
        try:
            item = self.inbox.get(block=block)
            while True:
                if item is not None:
                    self.waiting.append(item)
                item = self.inbox.get_nowait()
        except queue.Empty:
            pass

    def _retire_cancelled(self) -> None:
        self.waiting = deque(j for j in self.waiting if not j.cancelled)
        for slot, job in list(self.running.items()):
            if job.cancelled:
                self._release(slot)

    def _admit(self) -> None:
        while self.waiting:
            # the free row holding most of this prompt: a conversation's next turn finds its own
            slot = self.engine.pick_slot(self.waiting[0].prompt_ids)
            if slot is None:
                return
            job = self.waiting.popleft()
            self.running[slot] = job
            try:
                prompt_logprobs = self._score_prompt(slot, job) if job.score_prompt else None
                out = self.engine.add(
                    slot,
                    job.prompt_ids,
                    job.params,
                    logprobs=job.logprobs,
                    stop_ids=job.stop_ids,
                )
            except DistributedError:
                raise
            except Exception as e:  # fails this request only
                self._fail(slot, e)
                continue
            # a scored prompt was prefilled whole for its logprobs, whatever the cache held
            job.cached_tokens = 0 if job.score_prompt else self.engine.slots[slot].cached_tokens
            self._route(slot, out, prompt_logprobs)

    def _step(self) -> None:
        self._note_speculation()
        try:
            outs = self.engine.step()
        except DistributedError:
            raise
        except Exception as e:  # cannot tell whose row broke the step: fail the rows in it
            log.exception("decode step failed")
            for slot in list(self.running):
                self._fail(slot, e)
            return
        for out in outs:
            if out.slot in self.running:
                self._route(out.slot, out)

    def _note_speculation(self) -> None:
        spec = self.engine.speculator
        alone = len(self.running) == 1
        if spec is None or alone == self._alone:
            return
        if alone and self._alone is False:
            log.info("speculative decoding (%s) resumes: one request running", spec.describe())
        elif not alone:
            log.info(
                "speculative decoding (%s) paused: %d requests running decode plainly together",
                spec.describe(),
                len(self.running),
            )
        self._alone = alone

    def _route(self, slot: int, out: StepOutput, prompt_logprobs=None) -> None:
        job = self.running[slot]
        try:
            event = Event(job.index, prompt_logprobs=prompt_logprobs)
            job.n_tokens += out.token_id >= 0  # the stop token counts, as OpenAI's usage does
            event.text = job.stream.push(out)
            if out.shown_id is not None:
                event.token_id, event.logprob = out.shown_id, out.logprob
                event.top_logprobs = out.top_logprobs
            event.finish_reason = job.stream.finish_reason
            if self.observer is not None:
                self._observe(job, out)
            if event.finish_reason:
                self._release(slot)
            job.emit(event)
        except Exception as e:
            self._fail(slot, e)

    def _observe(self, job: Job, out: StepOutput) -> None:
        if out.token_id >= 0:
            now = time.monotonic()
            self.observer.token(job, now)
            job.last_token_at = now
        if job.stream.finish_reason:
            self.observer.finished(job)

    def _fail(self, slot: int, error: Exception) -> None:
        job = self.running.get(slot)
        self._release(slot)
        if job is not None:
            job.emit(Event(job.index, error=error))

    def _release(self, slot: int) -> None:
        self.running.pop(slot, None)
        self.engine.release(slot)

    def _score_prompt(self, slot: int, job: Job) -> list[tuple[float | None, TopLogprobs]]:
        """Logprob of each prompt token given the ones before it (the first has none)."""
        return self.engine.score(slot, job.prompt_ids, job.logprobs or 0)
