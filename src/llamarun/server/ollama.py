"""ollama's native API, so apps written for ollama work unchanged: GET /api/version, /api/tags,
/api/ps, POST /api/show, /api/chat and /api/generate. Chat and generate stream newline-delimited
JSON by default (`"stream": false` for one object); `options` map onto SamplingParams with
ollama's defaults. Each request is one `Generation` on the shared scheduler; failures answer as
ollama does, {"error": "..."}, in a stream as a last line of that shape.

Counts: prompt_eval_count is the whole prompt (the prefix cache only changes how much of it was
computed, which prompt_eval_duration shows); eval_count the new tokens. repeat_penalty applies to
the whole text so far: repeat_last_n is not honoured.

/api/chat's `tools` go through the chat completions route's tool calling (llamarun.tools), with
tool_choice auto as ollama has no other: the answer's calls are message.tool_calls (arguments as
objects), streamed whole in one line before the last; earlier calls and `tool` messages (with
tool_name) are the conversation's. `format` is "json" (any JSON object) or a JSON schema."""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import tools
from ..errors import RequestError
from ..sampling import SamplingParams
from .http_errors import APIError, Failure, error_route, failure_of
from .jobs import Generation, chat_plan, token_budget
from .state import ServerState, get_state, require_key

log = logging.getLogger("llamarun.server")
# (text, calls, final) -> the API's own fields of one answer object
Part = Callable[[str, list[tools.ToolCall], bool], dict]
VERSION = "0.9.0"  # the ollama API this follows: apps gate features on the version they see
NDJSON = "application/x-ndjson"
# ollama's sampling defaults (its docs' Modelfile parameters), where a request's options are silent
DEFAULTS = {"temperature": 0.8, "top_p": 0.9, "top_k": 40}
OPTIONS = {  # ollama option -> SamplingParams field
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "seed": "seed",
    "repeat_penalty": "repetition_penalty",
    "presence_penalty": "presence_penalty",
    "frequency_penalty": "frequency_penalty",
}


def ollama_error(f: Failure) -> dict:
    return {"error": f.message}


router = APIRouter(
    prefix="/api", dependencies=[Depends(require_key)], route_class=error_route(ollama_error)
)


# ---- wire types ------------------------------------------------------------------------------


class Options(BaseModel):
    model_config = ConfigDict(extra="allow")  # num_ctx, num_gpu, mirostat, ...: logged, ignored

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    seed: int | None = None
    num_predict: int | None = None
    stop: list[str] | None = None
    repeat_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_name: str | None = None

    def as_dict(self, i: int) -> dict:
        """The message as the chat format takes it: calls with ids and arguments as JSON text."""
        m: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.tool_name:
            m["name"] = self.tool_name
        calls = []
        for k, call in enumerate(self.tool_calls or ()):
            function = call.get("function")
            if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                raise RequestError(
                    f"messages[{i}].tool_calls[{k}] needs a function with a name",
                    param=f"messages.{i}.tool_calls",
                )
            arguments = function.get("arguments", {})
            text = arguments if isinstance(arguments, str) else json.dumps(arguments)
            calls.append(
                {
                    "id": call.get("id") or f"call_{i}_{k}",
                    "type": "function",
                    "function": {"name": function["name"], "arguments": text},
                }
            )
        if calls:
            m["tool_calls"] = calls
        return m


class GenerateBase(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1)
    stream: bool = True
    options: Options | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: float | str | None = None

    def constraint(self) -> dict:
        """SamplingParams keywords for `format`: "json" any JSON object, a dict its schema."""
        if self.format in (None, ""):
            return {}
        if self.format == "json":
            return {"json_schema": True}
        if isinstance(self.format, dict):
            return {"json_schema": self.format}
        raise RequestError(
            f'format must be "json" or a JSON schema, got {self.format!r}', param="format"
        )


class ChatRequest(GenerateBase):
    messages: list[ChatMessage] = []
    tools: list[dict[str, Any]] | None = None


class GenerateRequest(GenerateBase):
    prompt: str = ""
    system: str | None = None
    raw: bool = False
    context: list[int] | None = None
    images: list[str] | None = None


class ShowRequest(BaseModel):
    model: str | None = None
    name: str | None = None  # the older field name


# ---- routes ----------------------------------------------------------------------------------


@router.get("/version")
async def version() -> dict:
    return {"version": VERSION}


@router.get("/tags")
async def tags(request: Request) -> dict:
    return {"models": [model_entry(get_state(request))]}


@router.get("/ps")
async def ps(request: Request) -> dict:
    state = get_state(request)
    entry = model_entry(state) | {"expires_at": "2999-12-31T23:59:59Z", "size_vram": 0}
    return {"models": [entry | {"context_length": state.llm.max_seq_len}]}


@router.post("/show")
async def show(body: ShowRequest, request: Request) -> dict:
    state = get_state(request)
    check_model(state, body.model or body.name)
    args = state.llm.model.args
    return {
        "modelfile": f"FROM {state.llm.info.get('path', state.model_name)}\n",
        "parameters": "",
        "template": state.llm.chat_template or "",
        "details": details(state),
        "model_info": {
            "general.architecture": "llama",
            "general.parameter_count": args.n_params(),
            "llama.context_length": state.llm.max_seq_len,
            "llama.embedding_length": args.dim,
            "llama.block_count": args.n_layers,
            "llama.attention.head_count": args.n_heads,
            "llama.attention.head_count_kv": args.n_kv_heads,
            "llama.vocab_size": args.vocab_size,
        },
        "capabilities": ["completion"] if state.no_chat else ["completion", "chat"],
        "modified_at": modified_at(state),
    }


@router.post("/chat", response_model=None)
async def chat(body: ChatRequest, request: Request) -> dict | StreamingResponse:
    state = get_state(request)
    check_model(state, body.model)
    check_unsupported(body, images=any(m.images for m in body.messages))
    if state.no_chat is not None:
        raise RequestError(state.no_chat, param="messages")
    if not body.messages:  # ollama loads the model and answers at once
        return loaded(state, {"message": {"role": "assistant", "content": ""}})
    dialog = [m.as_dict(i) for i, m in enumerate(body.messages)]
    offered = tools.tool_request(body.tools)
    plan = chat_plan(state, dialog, offered, sampling_params(body, 1))
    gen = start(state, request, body, plan.prompt_ids, chat=True, plan=plan)

    def part(text: str, calls: list[tools.ToolCall], final: bool) -> dict:
        message = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [
                {"function": {"name": c.name, "arguments": c.arguments_object()}} for c in calls
            ]
        return {"message": message}

    return await answer(gen, body.stream, state, part)


@router.post("/generate", response_model=None)
async def generate(body: GenerateRequest, request: Request) -> dict | StreamingResponse:
    state = get_state(request)
    check_model(state, body.model)
    check_unsupported(body, images=bool(body.images))
    if not body.prompt and not body.context:
        return loaded(state, {"response": ""})
    templated = not body.raw and state.chat_format is not None
    if templated:
        dialog = [{"role": "system", "content": body.system}] if body.system else []
        dialog.append({"role": "user", "content": body.prompt})
        ids = list(state.chat_format.encode_dialog(dialog, add_generation_prompt=True))
    else:
        ids = state.llm.encode(body.prompt)
    tokenizer = state.tokenizer
    if body.context:  # the conversation so far, as an earlier answer's `context` gave it
        ids = list(body.context) + (ids[1:] if ids[:1] == [tokenizer.bos_id] else ids)
    gen = start(state, request, body, ids, chat=templated)

    def part(text: str, calls: list[tools.ToolCall], final: bool) -> dict:
        out = {"response": text}
        if final:  # what a later request continues from: the prompt and what was said
            out["context"] = ids + tokenizer.encode(gen.job.stream.text, bos=False)
        return out

    return await answer(gen, body.stream, state, part)


# ---- the pieces ------------------------------------------------------------------------------


def check_model(state: ServerState, name: str | None) -> None:
    if name is None:
        raise RequestError("model is required", param="model")
    if name not in (state.model_name, f"{state.model_name}:latest"):
        raise APIError(404, f"model '{name}' not found: this server serves '{state.model_name}'")


def check_unsupported(body: GenerateBase, *, images: bool = False) -> None:
    if images:
        raise RequestError("images are not supported: this server runs text models", param="images")


def sampling_params(body: GenerateBase, budget: int) -> SamplingParams:
    """ollama's options over its defaults, and `format`; num_predict -1 (or -2, or absent): the
    context left."""
    options = body.options
    given = options.model_dump(exclude_none=True) if options is not None else {}
    for name in (options.model_extra or {}) if options is not None else {}:
        log.info("ignored ollama option: %s", name)
    fields = {field: given[name] for name, field in OPTIONS.items() if name in given}
    fields = {**DEFAULTS, **fields, **body.constraint()}
    predict = given.get("num_predict")
    wanted = budget if predict is None or predict < 0 else min(predict, budget)
    try:
        return SamplingParams(**fields, max_new_tokens=wanted, stop=tuple(given.get("stop", ())))
    except RequestError as e:
        if "json_schema" not in fields:
            raise
        raise RequestError(f"format: {e}", param="format") from e


def start(
    state: ServerState,
    request: Request,
    body: GenerateBase,
    ids: list[int],
    *,
    chat: bool,
    plan: tools.ChatPlan | None = None,
) -> Generation:
    """plan: a chat's prompt with tools, whose format may constrain the answer and whose reader
    finds the calls in it."""
    budget = token_budget(state.llm, ids, None)
    params = sampling_params(body, budget)
    if plan is None:
        return Generation.start(state, request, ids, params, chat=chat)
    params = plan.sampling(params)
    return Generation.start(state, request, ids, params, chat=chat, reader=plan.reader)


def stamp() -> str:
    return datetime.now(timezone.utc).isoformat().replace("+00:00", "Z")


def loaded(state: ServerState, part: dict) -> dict:
    return {
        "model": state.model_name,
        "created_at": stamp(),
        **part,
        "done": True,
        "done_reason": "load",
    }


async def answer(
    gen: Generation, stream: bool, state: ServerState, part: Part
) -> dict | StreamingResponse:
    """The answer as NDJSON lines (stream) or one object."""
    t0 = time.perf_counter_ns()
    if stream:
        return StreamingResponse(lines(gen, state, part, t0), media_type=NDJSON)
    text, reason, first = "", "length", None
    async for ev in gen.run(watch=True):
        first = first or time.perf_counter_ns()
        text += ev.text
        reason = ev.finish_reason or reason
    content, calls, reason = gen.answer(text, reason)
    return {
        "model": state.model_name,
        "created_at": stamp(),
        **final(gen, part(content or "", calls, True), reason, t0, first),
    }


def final(gen: Generation, fields: dict, reason: str, t0: int, first: int | None) -> dict:
    """The last object: the part's fields, why it ended, the counts and durations (ns)."""
    now = time.perf_counter_ns()
    first = first or now
    return {
        **fields,
        "done": True,
        "done_reason": "stop" if reason == "tool_calls" else reason,
        "total_duration": now - t0,
        "load_duration": 0,
        "prompt_eval_count": gen.prompt_tokens,
        "prompt_eval_duration": first - t0,
        "eval_count": gen.completion_tokens,
        "eval_duration": now - first,
    }


async def lines(gen: Generation, state: ServerState, part: Part, t0: int) -> AsyncIterator[bytes]:
    def line(fields: dict) -> bytes:
        return (
            json.dumps({"model": state.model_name, "created_at": stamp(), **fields}) + "\n"
        ).encode()

    reason, first = "length", None
    try:
        async for deltas, finished in gen.deltas():
            first = first or time.perf_counter_ns()
            text = "".join(d.content for d in deltas if d.content)
            if text:
                yield line({**part(text, [], False), "done": False})
            reason = finished or reason
    except Exception as e:  # the status line has gone: the last line carries the error
        yield (json.dumps(ollama_error(failure_of(e))) + "\n").encode()
        return
    _, calls = gen.streamed
    if calls:  # whole, as ollama streams them
        yield line({**part("", calls, False), "done": False})
    yield line(final(gen, part("", [], True), reason, t0, first))


def model_entry(state: ServerState) -> dict:
    path = Path(state.llm.info.get("path", ""))
    size = path.stat().st_size if path.is_file() else 0
    # names the file and its version without reading it through: apps compare digests
    digest = hashlib.sha256(f"{path}:{size}:{modified_at(state)}".encode()).hexdigest()
    return {
        "name": state.model_name,
        "model": state.model_name,
        "modified_at": modified_at(state),
        "size": size,
        "digest": digest,
        "details": details(state),
    }


def details(state: ServerState) -> dict:
    info, args = state.llm.info, state.llm.model.args
    level = info.get("quantize") or info.get("stored") or info.get("dtype", "")
    return {
        "parent_model": "",
        "format": info.get("format", ""),
        "family": "llama",
        "families": ["llama"],
        "parameter_size": parameter_size(args.n_params()),
        "quantization_level": str(level).upper(),
    }


def modified_at(state: ServerState) -> str:
    path = Path(state.llm.info.get("path", ""))
    when = path.stat().st_mtime if path.exists() else state.created
    return datetime.fromtimestamp(when, timezone.utc).isoformat().replace("+00:00", "Z")


def parameter_size(n: int) -> str:
    """As ollama writes it: 135M, 7.2B."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return (
                f"{n / size:.1f}".removesuffix(".0") + unit
                if n < 100 * size
                else f"{n / size:.0f}{unit}"
            )
    return str(n)
