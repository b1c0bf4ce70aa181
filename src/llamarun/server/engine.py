"""Continuous batching: one thread owns the model's `Engine` and, between decode steps, admits
waiting requests into free slots (prefilling them) and retires finished or abandoned ones.
Each choice of each HTTP request is one `Job`; its tokens come back as `Event`s via `emit`."""

from __future__ import annotations

import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generate import LLM, PREFILL_CHUNK, StepOutput, TextStream
from ..sampling import SamplingParams

log = logging.getLogger("llamarun.server")

TopLogprobs = list[tuple[int, float]]  # (token id, logprob), best first


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
    stop_ids: frozenset[int]
    emit: Callable[[Event], None]  # thread-safe: hands the event to the request's event loop
    logprobs: int | None = None  # top alternatives per token; None: no logprobs
    score_prompt: bool = False  # also report the prompt's own logprobs (completions echo)
    cancelled: bool = False
    n_tokens: int = 0  # tokens sampled so far, stop token included


class Scheduler:
    def __init__(self, llm: LLM):
        self.llm = llm
        self.engine = llm.engine
        self.inbox: queue.Queue[Job | None] = queue.Queue()
        self.waiting: deque[Job] = deque()
        self.running: dict[int, Job] = {}  # slot -> job
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="llamarun-engine", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, jobs: list[Job]) -> None:
        for job in jobs:
            self.inbox.put(job)

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
        while True:
            idle = not self.running and not self.waiting
            if idle and self.stopping and self.inbox.empty():
                return
            self._take_inbox(block=idle)
            try:
                self._retire_cancelled()
                self._admit()
                if self.running:
                    self._step()
            except Exception as e:  # a bug, not a bad request: fail what is in flight, keep serving
                log.exception("engine loop failed")
                for slot in list(self.running):
                    self._fail(slot, e)

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
        for slot in self.engine.free_slots():
            job = self.waiting.popleft() if self.waiting else None
            if job is None:
                return
            self.running[slot] = job
            try:
                prompt_logprobs = self._score_prompt(slot, job) if job.score_prompt else None
                out = self.engine.add(slot, job.prompt_ids, job.params, logprobs=job.logprobs)
            except Exception as e:  # fails this request only
                self._fail(slot, e)
                continue
            self._route(slot, out, prompt_logprobs)

    def _step(self) -> None:
        try:
            outs = self.engine.step()
        except Exception as e:  # cannot tell whose row broke the step: fail the rows in it
            log.exception("decode step failed")
            for slot in list(self.running):
                self._fail(slot, e)
            return
        for out in outs:
            if out.slot in self.running:
                self._route(out.slot, out)

    def _route(self, slot: int, out: StepOutput, prompt_logprobs=None) -> None:
        job = self.running[slot]
        try:
            event = Event(job.index, prompt_logprobs=prompt_logprobs)
            if out.token_id < 0:  # max_tokens=0: nothing sampled
                event.finish_reason = "length"
            elif out.token_id in job.stop_ids:
                job.n_tokens += 1
                event.finish_reason = "stop"
            else:
                job.n_tokens += 1
                event.text = job.stream.feed(out.token_id)
                event.token_id, event.logprob, event.top_logprobs = (
                    out.token_id,
                    out.logprob,
                    out.top_logprobs,
                )
                event.finish_reason = "stop" if job.stream.stopped else out.finish_reason
            if event.finish_reason:
                event.text += job.stream.finish()
                self._release(slot)
            job.emit(event)
        except Exception as e:
            self._fail(slot, e)

    def _fail(self, slot: int, error: Exception) -> None:
        job = self.running.get(slot)
        self._release(slot)
        if job is not None:
            job.emit(Event(job.index, error=error))

    def _release(self, slot: int) -> None:
        self.running.pop(slot, None)
        self.engine.release(slot)

    @torch.inference_mode()
    def _score_prompt(self, slot: int, job: Job) -> list[tuple[float | None, TopLogprobs]]:
        """Logprob of each prompt token given the ones before it (the first has none)."""
        self.engine.check_prompt(job.prompt_ids)
        model, ids, k = self.llm.model, job.prompt_ids, job.logprobs or 0
        device = self.engine.device
        scores: list[tuple[float | None, TopLogprobs]] = [(None, [])]
        for start in range(0, len(ids), PREFILL_CHUNK):
            chunk = ids[start : start + PREFILL_CHUNK]
            tokens = torch.tensor([chunk], device=device)
            input_pos = torch.arange(start, start + len(chunk), device=device)[None]
            logp = torch.log_softmax(
                model(tokens, input_pos, torch.tensor([slot], device=device), all_logits=True)[
                    0
                ].float(),
                -1,
            )
            targets = ids[start + 1 : start + len(chunk) + 1]  # the token each position predicts
            picked = logp[
                torch.arange(len(targets)), torch.tensor(targets, dtype=torch.long)
            ].tolist()
            top = torch.topk(logp[: len(targets)], k) if k else None
            for i, lp in enumerate(picked):
                alts = (
                    list(zip(top.indices[i].tolist(), top.values[i].tolist()))
                    if top is not None
                    else []
                )
                scores.append((lp, alts))
        return scores
