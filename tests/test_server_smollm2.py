"""`llamarun serve` with the real SmolLM2-135M-Instruct (Q4_1), driven by the official `openai`,
`anthropic` and `ollama` clients: answers, streaming equals non-streaming at temperature 0, usage
equal to the tokenizer's count, the prefix cache (cached_tokens, warm equals cold, eviction under
a small pool), a tool call through each API (greedy; SmolLM2's template has no tools, so the
generic tool format) and each API's error for a prompt past the context. One server for the module:
one cache row and a 6 MB pool (8 pages of 16 positions, 0.74 MB each for SmolLM2): one system
turn fits, two do not, so eviction happens."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys

import anthropic
import ollama
import openai
import pytest
from conftest import shared_model

from llamarun.loaders import load_checkpoint, read_header
from llamarun.tokenizer.chat import get_chat_format

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")
SMOLLM2 = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
NAME = "smollm2"
QUESTION = "What is the capital of France?"
END_OF_TURN = 2  # <|im_end|>: a prefill chunk ends after it, so a whole turn is reused
SYSTEM = (
    "You are a careful geography tutor. Answer in one short sentence, name the country and its "
    "capital, avoid lists, never use markdown, and do not add greetings or closing remarks. "
    "If a question is not about geography, say so politely in one sentence. Use the English "
    "names of places, give no population figures, prefer the official capital where a country "
    "has several seats of government, and answer questions about cities with their country."
)

MUSIC = "You answer questions about music history in a friendly tone. " * 6  # > 2 chunks


@pytest.fixture(scope="module")
def server():
    model = shared_model(SMOLLM2)
    cmd = [sys.executable, "-m", "llamarun", "serve", str(model), "--port", "0"]
    cmd += ["--model-name", NAME, "--max-batch-size", "1", "--max-seq-len", "512"]
    cmd += ["--prefix-cache-mb", "6", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=dict(os.environ))
    try:
        for line in proc.stderr:
            if found := re.search(r"(http://\S+)/v1", line):
                break
        else:
            pytest.fail(f"the server exited with code {proc.wait()} before it printed its URL")
        yield found.group(1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # alive until asked to stop
    finally:
        proc.kill()


@pytest.fixture(scope="module")
def count():
    """Prompt tokens of a dialog as the model's own chat format renders it."""
    ckpt = load_checkpoint(read_header(shared_model(SMOLLM2)))
    chat_format = get_chat_format(ckpt.tokenizer, ckpt.chat_template)
    return lambda dialog: list(chat_format.encode_dialog(dialog))


@pytest.fixture(scope="module")
def oai(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def claude(server) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=server, api_key="none", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def llama(server) -> ollama.Client:
    return ollama.Client(host=server, timeout=300)


def user(text: str = QUESTION) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_responses_answer_stream_and_count(oai, count):
    out = oai.responses.create(model=NAME, input=QUESTION, max_output_tokens=16, temperature=0)
    assert "Paris" in out.output_text
    with oai.responses.stream(
        model=NAME, input=QUESTION, max_output_tokens=16, temperature=0
    ) as stream:
        deltas = [e.delta for e in stream if e.type == "response.output_text.delta"]
        final = stream.get_final_response()
    assert "".join(deltas) == final.output_text == out.output_text
    assert out.usage.input_tokens == final.usage.input_tokens == len(count(user()))


def test_anthropic_messages_answer_stream_and_count(claude, count):
    ask = dict(model=NAME, max_tokens=16, messages=user(), extra_body={"temperature": 0})
    out = claude.messages.create(**ask)
    assert "Paris" in out.content[0].text
    with claude.messages.stream(**ask) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == final.content[0].text == out.content[0].text
    counted = claude.messages.count_tokens(model=NAME, messages=user()).input_tokens
    assert out.usage.input_tokens == final.usage.input_tokens == counted == len(count(user()))
    system = claude.messages.count_tokens(model=NAME, system=SYSTEM, messages=user())
    assert system.input_tokens == len(count([{"role": "system", "content": SYSTEM}, *user()]))


def test_ollama_chat_generate_list_show(llama, count):
    options = {"temperature": 0, "num_predict": 16}
    out = llama.chat(model=NAME, messages=user(), options=options)
    assert "Paris" in out.message.content and out.prompt_eval_count == len(count(user()))
    parts = list(llama.chat(model=NAME, messages=user(), options=options, stream=True))
    assert "".join(p.message.content for p in parts) == out.message.content
    generated = llama.generate(model=NAME, prompt=QUESTION, options=options)
    assert generated.response == out.message.content  # the same prompt through the template
    assert [m.model for m in llama.list().models] == [NAME]
    shown = llama.show(NAME)
    assert shown.modelinfo["llama.block_count"] == 30 and shown.details.quantization_level == "Q4_1"


def test_the_prefix_cache_is_exact_reuses_the_system_turn_and_evicts(oai, count):
    def ask(system: str, question: str, **kwargs):
        messages = [{"role": "system", "content": system}, *user(question)]
        out = oai.chat.completions.create(model=NAME, messages=messages, max_tokens=12, **kwargs)
        return out, count(messages)

    first, first_ids = ask(SYSTEM, "Where is Lima?", temperature=0)
    warm, warm_ids = ask(SYSTEM, "Where is Oslo?", temperature=0)
    system_turn = warm_ids.index(END_OF_TURN) + 1  # under the 128-token chunk: one chunk
    assert first_ids[:system_turn] == warm_ids[:system_turn] and system_turn > 64
    assert warm.usage.prompt_tokens_details.cached_tokens == system_turn
    seeded_warm, _ = ask(SYSTEM, "Where is Oslo?", temperature=1.0, seed=11)
    # another conversation takes the only row and both chunks of the pool: Oslo is cold again
    ask(MUSIC, "Who was Bach?")
    cold, _ = ask(SYSTEM, "Where is Oslo?", temperature=0)
    assert cold.usage.prompt_tokens_details.cached_tokens == 0
    assert cold.choices[0].message.content == warm.choices[0].message.content
    ask(MUSIC, "Who was Bach?")
    seeded_cold, _ = ask(SYSTEM, "Where is Oslo?", temperature=1.0, seed=11)
    assert seeded_cold.choices[0].message.content == seeded_warm.choices[0].message.content


def test_each_api_calls_a_tool(oai, claude, llama):
    city = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    about = "Get the current weather in a city"
    ask = user("Use the get_weather tool for Paris.")
    tool = {"type": "function", "name": "get_weather", "description": about, "parameters": city}
    out = oai.responses.create(
        model=NAME, input=ask, tools=[tool], tool_choice="required", temperature=0
    )
    (call,) = out.output
    assert call.type == "function_call" and json.loads(call.arguments) == {"city": "Paris"}
    tool = {"name": "get_weather", "description": about, "input_schema": city}
    message = claude.messages.create(
        model=NAME,
        max_tokens=32,
        messages=ask,
        tools=[tool],
        tool_choice={"type": "any"},
        extra_body={"temperature": 0},
    )
    assert message.stop_reason == "tool_use" and message.content[0].input == {"city": "Paris"}
    tool = {
        "type": "function",
        "function": {"name": "get_weather", "description": about, "parameters": city},
    }
    answer = llama.chat(model=NAME, messages=ask, tools=[tool], options={"temperature": 0})
    (call,) = answer.message.tool_calls  # ollama has no tool_choice: the model chose to call
    assert call.function.name == "get_weather" and call.function.arguments == {"city": "Paris"}


def test_a_prompt_past_the_context_is_each_apis_own_400(oai, claude, llama):
    long = "word " * 600
    with pytest.raises(openai.BadRequestError) as info:
        oai.responses.create(model=NAME, input=long, max_output_tokens=4)
    assert "512" in info.value.body["message"]
    with pytest.raises(anthropic.BadRequestError) as info:
        claude.messages.create(model=NAME, max_tokens=4, messages=user(long))
    assert info.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(ollama.ResponseError) as info:
        llama.chat(model=NAME, messages=user(long))
    assert info.value.status_code == 400 and "512" in info.value.error
