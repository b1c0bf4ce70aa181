"""Tool calling without a server: the request's checks, each format's reader on literal model
outputs (several calls, malformed ones returned as text), streamed deltas joining to the final
answer, and forced calls from a random model that always parse and validate."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch
from test_chat import TextTokenizer
from tiny_tokenizers import write_hf_tokenizer

from llamarun.config import ModelArgs
from llamarun.errors import RequestError
from llamarun.llm import LLM
from llamarun.model import Transformer
from llamarun.sampling import SamplingParams
from llamarun.tokenizer import load_tokenizer
from llamarun.tokenizer.chat import ChatMLFormat, JinjaChatFormat
from llamarun.tools import ToolReader, ToolRequest, prepare_chat, tool_request
from llamarun.tools.formats import constraint
from llamarun.tools.render import tool_format

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 12},
                "unit": {"enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city", "unit"],
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
}
PARIS = '{"city": "Paris", "unit": "celsius"}'

# (format, model output, expected content, expected [(name, arguments)])
FREE_OUTPUTS = [
    (
        "hermes",
        f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>',
        None,
        [("get_weather", PARIS)],
    ),
    (
        "hermes",
        "Let me look.\n<tool_call>\n"
        f'{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
        "Let me look.\n",
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    (
        "hermes",
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": }\n</tool_call>',
        [],
    ),
    ("hermes", "Paris is sunny. Use <b>tags</b>!", "Paris is sunny. Use <b>tags</b>!", []),
    ("llama3", f'{{"name": "get_weather", "parameters": {PARIS}}}', None, [("get_weather", PARIS)]),
    (
        "llama3",
        f'<|python_tag|>{{"name": "get_weather", "parameters": {PARIS}}}',
        None,
        [("get_weather", PARIS)],
    ),
    (
        "llama3",
        f'{{"name": "get_time", "parameters": {{}}}}; {{"name": "get_weather", '
        f'"parameters": {PARIS}}}',
        None,
        [("get_time", "{}"), ("get_weather", PARIS)],
    ),
    (
        "llama3",
        '{"name": "get_weather", "parameters": "{\\"city\\": \\"Oslo\\"}"}',
        None,
        [("get_weather", '{"city": "Oslo"}')],
    ),  # arguments as a JSON string, as some models do
    (
        "llama3",
        '{"name": "get_weather", "parameters": {"city": "Par',
        '{"name": "get_weather", "parameters": {"city": "Par',
        [],
    ),
    ("llama3", "The capital of France is Paris.", "The capital of France is Paris.", []),
    ("llama3", '{"name": nope, "parameters": {}}', '{"name": nope, "parameters": {}}', []),
    (
        "mistral",
        f'[TOOL_CALLS][{{"name": "get_weather", "arguments": {PARIS}}}, '
        '{"name": "get_time", "arguments": {}}]',
        None,
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    (
        "mistral",
        f'[{{"name": "get_weather", "arguments": {PARIS}}}]',
        None,
        [("get_weather", PARIS)],
    ),  # [TOOL_CALLS] was a special token, so it is not in the text
    (
        "mistral",
        '[TOOL_CALLS][{"name": "get_time", "arguments": {]',
        '[TOOL_CALLS][{"name": "get_time", "arguments": {]',
        [],
    ),
    ("mistral", "No call [needed] here.", "No call [needed] here.", []),
]
CONSTRAINED_OUTPUTS = [
    (
        "generic",
        f'{{"tool_calls": [{{"name": "get_weather", "arguments": {PARIS}}}, '
        '{"name": "get_time", "arguments": {}}]}',
        None,
        [("get_weather", PARIS), ("get_time", "{}")],
    ),
    (
        "generic",
        f'{{"tool_call": {{"name": "get_weather", "arguments": {PARIS}}}}}',
        None,
        [("get_weather", PARIS)],
    ),
    (
        "generic",
        '{"response": "Paris is \\"la Ville Lumi\\u00e8re\\" \\ud83d\\ude00."}',
        'Paris is "la Ville Lumière" 😀.',
        [],
    ),
    (
        "hermes",
        f'<tool_call>\n{{"name": "get_weather", "arguments": {PARIS}}}\n</tool_call>',
        None,
        [("get_weather", PARIS)],
    ),
    # cut by the token budget: the unfinished call stays, as OpenAI's do
    (
        "generic",
        '{"tool_call": {"name": "get_weather", "arguments": {"city": "Pa',
        None,
        [("get_weather", '{"city": "Pa')],
    ),
]
READINGS = [(*o, False) for o in FREE_OUTPUTS] + [(*o, True) for o in CONSTRAINED_OUTPUTS]


@pytest.mark.parametrize("fmt, text, content, calls, constrained", READINGS)
def test_readers_on_literal_model_outputs(fmt, text, content, calls, constrained):
    got_content, got_calls = ToolReader(fmt, constrained).final(text)
    assert got_content == content
    assert [(c.name, c.arguments) for c in got_calls] == calls


def join_deltas(deltas) -> tuple[str, list[dict]]:
    """Reassemble deltas the way the openai client joins delta.tool_calls: by index, the id and
    name from the first, arguments concatenated."""
    content, calls = "", []
    for d in deltas:
        content += d.content or ""
        if d.index is None:
            continue
        if d.index == len(calls):
            assert d.id and d.name, "a call's first delta carries its id and name"
            calls.append({"id": d.id, "name": d.name, "arguments": ""})
        else:
            assert d.id is None and d.name is None, "id and name are sent once"
        calls[d.index]["arguments"] += d.arguments or ""
    return content, calls


@pytest.mark.parametrize("size", [1, 3, 1000])
@pytest.mark.parametrize("fmt, text, content, calls, constrained", READINGS)
def test_streamed_deltas_join_to_the_final_answer(fmt, text, content, calls, constrained, size):
    stream = ToolReader(fmt, constrained).stream()
    deltas = [d for i in range(0, len(text), size) for d in stream.push(text[i : i + size])]
    tail, final_content, final_calls = stream.finish()
    joined_content, joined_calls = join_deltas(deltas + tail)
    assert joined_content == (final_content or "") and final_content == content
    assert [(c["name"], c["arguments"]) for c in joined_calls] == calls
    assert [c["id"] for c in joined_calls] == [c.id for c in final_calls]


def test_constrained_calls_stream_before_the_answer_ends():
    stream = ToolReader("generic", constrained=True).stream()
    deltas = stream.push('{"tool_calls": [{"name": "get_weather", "arguments": {"ci')
    assert [(d.name, d.arguments) for d in deltas] == [("get_weather", ""), (None, '{"ci')]


@pytest.mark.parametrize(
    "tools, choice, param, words",
    [
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}],
            None,
            "tools[0].function.parameters",
            "type 'object'",
        ),
        (
            [{"type": "function", "function": {"name": "f", "parameters": [1]}}],
            None,
            "tools[0].function.parameters",
            "type 'object'",
        ),
        (
            [{"type": "function", "function": {"description": "no name"}}],
            None,
            "tools[0].function.name",
            "name",
        ),
        (
            [WEATHER],
            {"type": "function", "function": {"name": "get_stock"}},
            "tool_choice",
            "'get_stock', which is not among the tools ('get_weather')",
        ),
        ([WEATHER], "sometimes", "tool_choice", "one of auto, none, required"),
        ([], "required", "tool_choice", "no tools"),
        ([WEATHER, WEATHER], None, "tools", "two functions named 'get_weather'"),
    ],
)
def test_bad_tool_requests_name_the_parameter(tools, choice, param, words):
    with pytest.raises(RequestError) as info:
        tool_request(tools, choice)
    assert info.value.param == param and words in str(info.value)


def test_tool_request_defaults():
    request = tool_request([WEATHER, TIME])
    assert request.choice == "auto" and not request.parallel and not request.forced
    assert tool_request([WEATHER], parallel=True).parallel
    named = tool_request([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert named.forced and [t.name for t in named.callable] == ["get_time"]
    assert tool_request(None) is None and not tool_request([WEATHER], "none").active


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    torch.manual_seed(0)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=320)
    model = Transformer(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.3)
    model.eval().setup_caches(1, 1024)  # room for the generic format's tool listing
    return LLM(model, load_tokenizer(write_hf_tokenizer(tmp_path_factory.mktemp("hf"))))


@pytest.mark.parametrize("fmt", ["generic", "hermes", "llama3", "mistral"])
@pytest.mark.parametrize(
    "choice", ["required", {"type": "function", "function": {"name": "get_weather"}}]
)
def test_forced_calls_from_a_random_model_always_parse_and_validate(llm, fmt, choice):
    request = tool_request([WEATHER, TIME], choice, parallel=False)
    reader = ToolReader(fmt, constrained=True)
    for seed in (0, 1):
        rules = constraint(fmt, request, llm.tokenizer)
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=120, **rules)
        (out,) = llm.complete_batch(["Weather?"], params)
        content, calls = reader.final(out.text)
        assert out.finish_reason == "stop" and content is None and len(calls) == 1, out.text
        tool = {"get_weather": WEATHER, "get_time": TIME}[calls[0].name]
        jsonschema.validate(json.loads(calls[0].arguments), tool["function"]["parameters"])
        if isinstance(choice, dict):
            assert calls[0].name == "get_weather"


def test_a_generic_auto_answer_is_a_call_or_text(llm):
    request = ToolRequest(tool_request([WEATHER]).tools, "auto")
    params = SamplingParams(
        temperature=1.0, seed=0, max_new_tokens=100, **constraint("generic", request, llm.tokenizer)
    )
    (out,) = llm.complete_batch(["Hi"], params)
    content, calls = ToolReader("generic", constrained=True).final(out.text)
    assert (content is None) != (calls == [])


HERMES_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}"
    "{% endfor %}. Answer <tool_call>{...}</tool_call>.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.tool_calls %}"
    "{% for c in m.tool_calls %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": PARIS}},
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
]  # fmt: skip


def test_a_template_with_tools_gets_them_and_its_calls_as_objects():
    tok = TextTokenizer(bos="<|im_start|>", eos="<|im_end|>", add_bos=False)
    fmt = JinjaChatFormat(tok, HERMES_TEMPLATE)
    plan = prepare_chat(fmt, tok, HISTORY, tool_request([WEATHER, TIME]))
    assert tok.decode(plan.prompt_ids) == (
        "<|im_start|>system\nTools: get_weather get_time. Answer <tool_call>{...}</tool_call>."
        "<|im_end|>\n<|im_start|>user\nWeather in Paris?<|im_end|>\n<|im_start|>assistant\n"
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}'
        "</tool_call><|im_end|>\n<|im_start|>tool\n18 C, sunny<|im_end|>\n<|im_start|>assistant\n"
    )
    assert plan.reader.format_name == "hermes" and plan.constraint == {}  # auto answers freely


def test_a_format_without_tools_gets_the_generic_prompt_and_json_history():
    tok = TextTokenizer(bos="<|im_start|>", eos="<|im_end|>", add_bos=False)
    plan = prepare_chat(ChatMLFormat(tok), tok, HISTORY, tool_request([WEATHER], "required"))
    text = tok.decode(plan.prompt_ids)
    system = text[: text.index("<|im_end|>")]
    assert system.startswith("<|im_start|>system\nYou can call these tools")
    assert '"name": "get_weather"' in system and "To answer the user directly" not in system
    assert (
        '<|im_start|>assistant\n{"tool_calls": [{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "celsius"}, "id": "call_1"}]}<|im_end|>' in text
    )
    assert (
        '<|im_start|>user\n{"tool_response": {"tool": "get_weather", "content": "18 C, sunny", '
        '"tool_call_id": "call_1"}}<|im_end|>' in text
    )
    assert plan.reader.format_name == "generic" and "json_schema" in plan.constraint


PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.mark.parametrize("template", [PLAIN_TEMPLATE, HERMES_TEMPLATE])
def test_llm_chat_with_tools_returns_the_parsed_calls(llm, template):
    question = [{"role": "user", "content": "Weather in Paris?"}]
    params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=150)
    answer = llm.chat(
        question, params, chat_template=template, tools=[WEATHER], tool_choice="required"
    )
    assert answer.content is None and answer.finish_reason == "tool_calls"
    (call,) = answer.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER["function"]["parameters"])
    assert isinstance(llm.chat(question, params, chat_template=template), str)  # as before


LLAMA31_LIKE = (
    "{{ bos_token }}{% if tools %}<|start_header_id|>system<|end_header_id|>\n\nEnvironment: "
    "ipython\n{% for t in tools %}{{ t | tojson }}{% endfor %}<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}"
    "<|eot_id|>{% endfor %}{# calls start with <|python_tag|> #}"
)
MISTRAL_LIKE = (
    "{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}"
    "{% else %}[INST]{{ m.content }}[/INST]{% endif %}{% endfor %}"
)
SMOLLM2_LIKE = (  # mentions nothing of tools, so the probe tool never shows
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.mark.parametrize(
    "template, expected",
    [(HERMES_TEMPLATE, "hermes"), (LLAMA31_LIKE, "llama3"), (MISTRAL_LIKE, "mistral"),
     (SMOLLM2_LIKE, "generic"), ("{{ raise_exception('no tools here') }}", "generic")],
)  # fmt: skip
def test_the_tool_format_follows_what_the_template_renders(template, expected):
    tok = TextTokenizer(bos="<|begin_of_text|>", eos="<|eot_id|>")
    assert tool_format(JinjaChatFormat(tok, template)) == expected
    assert (
        tool_format(ChatMLFormat(TextTokenizer(bos="<|im_start|>", eos="<|im_end|>"))) == "generic"
    )
