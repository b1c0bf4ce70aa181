"""Chat formats render to literal text and ids; Jinja templates render as transformers does; a
chat turn ends at the format's end-of-turn token."""

import pytest
import torch

from llamarun.errors import RequestError, TokenizerError
from llamarun.llm import LLM
from llamarun.sampling import SamplingParams
from llamarun.tokenizer.chat import (
    ChatMLFormat,
    JinjaChatFormat,
    Llama2ChatFormat,
    Llama3ChatFormat,
    get_chat_format,
)

SPECIALS = (
    "<|im_end|>", "<|im_start|>", "<s>", "</s>",
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
)  # fmt: skip


class TextTokenizer:
    """Special tokens are ids 0..8 (in SPECIALS order), bytes are 9..264, so decode() shows every
    id of a prompt, special tokens included, and ids can be read off the text."""

    vocab_size, pad_id, adds_dummy_prefix = len(SPECIALS) + 256, -1, False

    def __init__(self, *, bos="<s>", eos="</s>", add_bos=True, extra_stops=()):
        self.bos_id, self.eos_id = SPECIALS.index(bos), SPECIALS.index(eos)
        self.add_bos = add_bos
        self.stop_ids = frozenset({self.eos_id, *map(SPECIALS.index, extra_stops)})

    def encode(self, text, *, bos=True, eos=False, special=False):
        ids = [self.bos_id] * bos
        while text:
            hit = next((s for s in SPECIALS if special and text.startswith(s)), None)
            if hit:
                ids.append(SPECIALS.index(hit))
                text = text[len(hit) :]
            else:
                ids += [b + len(SPECIALS) for b in text[0].encode()]
                text = text[1:]
        return ids + [self.eos_id] * eos

    def decode(self, ids):
        return b"".join(
            SPECIALS[i].encode() if i < len(SPECIALS) else self.token_bytes(i) for i in ids
        ).decode()

    def token_bytes(self, token_id):
        return bytes([token_id - len(SPECIALS)]) if token_id >= len(SPECIALS) else b""

    def token_to_id(self, piece):
        return SPECIALS.index(piece) if piece in SPECIALS else None


DIALOG = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": " Bye "},
]

# fmt: off
LLAMA2_IDS = [  # DIALOG in Meta's Llama 2 format with the Llama 2 tokenizer
    1,                       # <s>
    518, 25580, 29962,       # ▁[ INST ]
    3532, 14816, 29903, 6778, 13,  # ▁<< SY S >> \n
    3629, 11473, 29889, 13,  # Be ▁brief . \n
    29966, 829, 14816, 29903, 6778, 13, 13,  # < </ SY S >> \n \n
    18567,                   # Hi
    518, 29914, 25580, 29962,  # ▁[ / INST ]
    15043, 29991, 29871,     # ▁Hello ! ▁
    2,                       # </s>
    1,                       # <s>
    518, 25580, 29962, 2648, 29872, 518, 29914, 25580, 29962,  # ▁[ INST ] ▁By e ▁[ / INST ]
]
# fmt: on


def test_llama2_format_is_metas_inst_sys_layout():
    tok = TextTokenizer()
    ids = Llama2ChatFormat(tok).encode_dialog(DIALOG)
    assert tok.decode(ids) == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello! </s><s>[INST] Bye [/INST]"
    )
    assert ids[0] == 2 and ids.count(2) == 2  # two BOS: one per [INST] block
    assert ids.count(3) == 1 and ids[-1] != 3  # EOS closes the answered pair only


def test_llama2_format_literal_ids_with_the_llama2_tokenizer():
    pytest.importorskip("sentencepiece")
    from conftest import shared_model

    from llamarun.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_model("llama2-tokenizer/tokenizer.model"))
    ids = Llama2ChatFormat(tok).encode_dialog(DIALOG)
    assert ids == LLAMA2_IDS


def test_llama2_format_rejects_non_alternating_roles():
    fmt = Llama2ChatFormat(TextTokenizer())
    with pytest.raises(RequestError, match="alternating"):
        fmt.encode_dialog([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(RequestError, match="last message must be from the user"):
        fmt.encode_dialog(DIALOG[:3])


def test_llama3_format_is_metas_header_layout():
    tok = TextTokenizer(bos="<|begin_of_text|>", eos="<|end_of_text|>")
    fmt = Llama3ChatFormat(tok)
    ids = fmt.encode_dialog(DIALOG[1:3])
    assert tok.decode(ids) == (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert ids[:2] == [4, 6] and ids.count(8) == 2  # <|begin_of_text|> <|start_header_id|>, 2 eot
    assert fmt.stop_ids == {5, 8}  # <|end_of_text|> and <|eot_id|>


def test_llama3_format_literal_ids_with_the_llama3_tokenizer():
    from conftest import shared_model

    from llamarun.tokenizer import load_tokenizer

    tok = load_tokenizer(shared_model("llama3-tokenizer/tokenizer.model"))
    dialog = [
        {"role": "system", "content": "This is a test sentence."},
        {"role": "user", "content": "This is a response."},
    ]
    # fmt: off
    assert Llama3ChatFormat(tok).encode_dialog(dialog) == [
        128000,                              # <|begin_of_text|>
        128006, 9125, 128007, 271,           # <|start_header_id|> system <|end_header_id|> \n\n
        2028, 374, 264, 1296, 11914, 13,     # This is a test sentence.
        128009,                              # <|eot_id|>
        128006, 882, 128007, 271,            # <|start_header_id|> user <|end_header_id|> \n\n
        2028, 374, 264, 2077, 13,            # This is a response.
        128009,                              # <|eot_id|>
        128006, 78191, 128007, 271,          # <|start_header_id|> assistant <|end_header_id|> \n\n
    ]
    # fmt: on


def test_chatml_format():
    tok = TextTokenizer(add_bos=False)
    fmt = ChatMLFormat(tok)
    ids = fmt.encode_dialog(DIALOG[:2])
    assert tok.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ids[0] == 1 and ids.count(0) == 2  # <|im_start|> first, two <|im_end|>
    assert fmt.stop_ids == {0, 3}  # <|im_end|> as well as EOS </s>


SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA2_HF_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
# exercises trim_blocks/lstrip_blocks, loop controls, namespace, tojson and {% generation %}
FEATURES_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
<|im_start|>{{ message['role'] }} {{ message | tojson }}
    {% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}{% endif %}
<|im_end|>
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant ({{ ns.n }} turns in {{ strftime_now('%Y') }}, é "ok" <b>)
{% endif %}"""


@pytest.mark.parametrize(
    "template",
    [SMOLLM2_TEMPLATE, LLAMA2_HF_TEMPLATE, FEATURES_TEMPLATE],
    ids=["smollm2", "llama2_hf", "features"],
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_jinja_renders_like_transformers(tmp_path, template, add_generation_prompt):
    transformers = pytest.importorskip("transformers")
    from tiny_tokenizers import write_hf_tokenizer

    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(write_hf_tokenizer(tmp_path)),
        bos_token="<s>",
        eos_token="</s>",
        chat_template=template,
    )
    dialog = DIALOG[:3] if template is LLAMA2_HF_TEMPLATE or not add_generation_prompt else DIALOG
    expected = hf.apply_chat_template(
        dialog, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    fmt = JinjaChatFormat(TextTokenizer(), template)
    assert fmt.render(dialog, add_generation_prompt=add_generation_prompt) == expected


def test_jinja_ids_match_transformers_with_the_same_tokenizer_json(tmp_path):
    transformers = pytest.importorskip("transformers")
    from tiny_tokenizers import write_hf_tokenizer

    from llamarun.tokenizer import load_tokenizer

    path = write_hf_tokenizer(tmp_path)
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(path),
        bos_token="<s>",
        eos_token="</s>",
        chat_template=LLAMA2_HF_TEMPLATE,
    )
    expected = hf.apply_chat_template(
        DIALOG[:2], tokenize=True, add_generation_prompt=True, return_dict=False
    )
    ids = JinjaChatFormat(load_tokenizer(path), LLAMA2_HF_TEMPLATE).encode_dialog(DIALOG[:2])
    assert ids == expected
    assert ids[:2] != [0, 0] and ids.count(0) == 1  # one BOS (<s> is id 0)


def test_jinja_never_doubles_bos():
    tok = TextTokenizer(add_bos=True)
    writes_bos = JinjaChatFormat(tok, LLAMA2_HF_TEMPLATE).encode_dialog(DIALOG[1:2])
    no_bos = JinjaChatFormat(tok, SMOLLM2_TEMPLATE).encode_dialog(DIALOG[1:2])
    assert writes_bos[:2] == [2, *tok.encode("[", bos=False)]  # the template's <s>, no second
    assert no_bos[:2] == [2, 1]  # tokenizer wants BOS and the template has none: <s><|im_start|>


def test_jinja_raise_exception_becomes_request_error():
    fmt = JinjaChatFormat(TextTokenizer(), LLAMA2_HF_TEMPLATE)
    with pytest.raises(RequestError, match="roles must alternate"):
        fmt.encode_dialog([{"role": "assistant", "content": "hi"}])


def test_jinja_stop_ids_include_the_templates_end_of_turn_token():
    assert JinjaChatFormat(TextTokenizer(), SMOLLM2_TEMPLATE).stop_ids == {0, 3}
    assert JinjaChatFormat(TextTokenizer(), LLAMA2_HF_TEMPLATE).stop_ids == {3}


def test_get_chat_format_precedence(tmp_path):
    llama3_tok = TextTokenizer(bos="<|begin_of_text|>", eos="<|end_of_text|>")
    assert get_chat_format(llama3_tok, None).name == "llama3"  # header tokens
    assert get_chat_format(llama3_tok, SMOLLM2_TEMPLATE).name == "jinja"  # own template wins
    assert get_chat_format(llama3_tok, SMOLLM2_TEMPLATE, "chatml").name == "chatml"  # override
    path = tmp_path / "t.jinja"
    path.write_text(LLAMA2_HF_TEMPLATE)
    fmt = get_chat_format(llama3_tok, None, str(path))
    assert fmt.name == "jinja" and fmt.template == LLAMA2_HF_TEMPLATE
    with pytest.raises(RequestError, match="neither a template file nor a format name"):
        get_chat_format(llama3_tok, None, str(tmp_path / "missing.jinja"))


def test_base_model_without_template_gets_a_clear_error():
    class BaseTokenizer(TextTokenizer):
        def token_to_id(self, piece):
            return {"<s>": 2, "</s>": 3}.get(piece)

    with pytest.raises(TokenizerError, match="base model.*--chat-template"):
        get_chat_format(BaseTokenizer(), None)
    with pytest.raises(TokenizerError, match="special token <\\|im_start\\|>"):
        ChatMLFormat(BaseTokenizer())


def test_bad_template_and_bad_messages():
    with pytest.raises(TokenizerError, match="not valid Jinja"):
        JinjaChatFormat(TextTokenizer(), "{% for m in messages %}")
    fmt = ChatMLFormat(TextTokenizer())
    with pytest.raises(RequestError, match="role 'robot'"):
        fmt.encode_dialog([{"role": "robot", "content": "x"}])
    with pytest.raises(RequestError, match="content must be a string"):
        fmt.encode_dialog([{"role": "user", "content": 3}])
    with pytest.raises(RequestError, match="non-empty list"):
        fmt.encode_dialog([])


class ChatMLTokenizer(TextTokenizer):
    def token_to_id(self, piece):
        return SPECIALS.index(piece) if piece in SPECIALS[:4] else None


@pytest.fixture
def always_im_end_llm(tiny_model):
    # a zero final norm makes every logit 0, so greedy decoding always picks id 0: <|im_end|>
    torch.nn.init.zeros_(tiny_model.norm.weight)
    tiny_model.setup_caches(1, 128)
    return LLM(tiny_model, ChatMLTokenizer(add_bos=False), chat_template=SMOLLM2_TEMPLATE)


def test_chat_stops_at_end_of_turn_token_that_is_not_eos(always_im_end_llm):
    llm = always_im_end_llm
    params = SamplingParams(temperature=0, max_new_tokens=8)
    assert 0 not in llm.tokenizer.stop_ids  # EOS is </s>; <|im_end|> only ends a turn
    assert llm.chat([{"role": "user", "content": "Hi"}], params) == ""
    assert llm.last_stats.new_tokens == 1
    llm.complete("Hi", params)  # plain completion does not stop there
    assert llm.last_stats.new_tokens == 8


def test_chat_override_and_base_model_error(always_im_end_llm):
    llm = always_im_end_llm
    params = SamplingParams(temperature=0, max_new_tokens=4)
    assert llm.chat([{"role": "user", "content": "Hi"}], params, chat_template="llama2") == ""
    assert llm.last_stats.new_tokens == 4  # Llama 2 format stops at EOS only
    assert "chat_format" not in vars(llm)  # the override did not build the checkpoint's own
    llm.chat_template = None
    assert llm.chat_format.name == "chatml"  # inferred from <|im_start|>/<|im_end|>


@pytest.mark.parametrize(
    ("writer", "expected"),
    [("write_sentencepiece", "llama2"), ("write_tiktoken", "llama3"), ("write_hf_tokenizer", None)],
)
def test_meta_chat_format_follows_the_tokenizer_kind(tmp_path, writer, expected):
    import tiny_tokenizers

    from llamarun.tokenizer import load_tokenizer
    from llamarun.tokenizer.chat import meta_chat_format

    tok = load_tokenizer(getattr(tiny_tokenizers, writer)(tmp_path))
    if expected is None:  # neither Llama 2 nor Llama 3: the checkpoint's template, or an error
        assert meta_chat_format(tok, LLAMA2_HF_TEMPLATE).name == "jinja"
        with pytest.raises(TokenizerError, match="base model"):
            meta_chat_format(tok, None)
    else:
        assert meta_chat_format(tok, SMOLLM2_TEMPLATE).name == expected


@pytest.fixture
def llama2_llama(tiny_model, tmp_path):
    from tiny_tokenizers import write_sentencepiece

    from llamarun.llama import Llama
    from llamarun.tokenizer import load_tokenizer

    tiny_model.setup_caches(3, 128)
    return Llama(LLM(tiny_model, load_tokenizer(write_sentencepiece(tmp_path))))


def test_chat_completion_batches_dialogs_like_metas_llama2(llama2_llama):
    llama, tok = llama2_llama, llama2_llama.tokenizer
    dialogs = [DIALOG[:2], DIALOG[1:2], [{"role": "user", "content": "[INST] sneaky"}]]
    results = llama.chat_completion(dialogs, temperature=0, max_gen_len=6, logprobs=True)
    for dialog, result in zip(dialogs[:2], results):
        prompt = Llama2ChatFormat(tok).encode_dialog(dialog)
        (alone,), (logprobs,) = llama.generate([prompt], 6, temperature=0, logprobs=True)
        assert result["generation"] == {"role": "assistant", "content": tok.decode(alone)}
        assert result["tokens"] == [tok.decode([t]) for t in alone]
        assert result["logprobs"] == pytest.approx(logprobs, abs=1e-5)
    assert results[2]["generation"]["content"] == (
        "Error: special tags are not allowed as part of the prompt."
    )


def test_chat_completion_cuts_at_the_end_of_turn_token(always_im_end_llm):
    from llamarun.llama import Llama

    results = Llama(always_im_end_llm).chat_completion([DIALOG[1:2]], temperature=0, max_gen_len=5)
    assert results == [{"generation": {"role": "assistant", "content": ""}}]


def test_llama2_gguf_without_template_chats_in_metas_format_only():
    from conftest import shared_model

    from llamarun import load
    from llamarun.llama import Llama
    from llamarun.tokenizer.chat import meta_chat_format

    llm = load(shared_model("llama-2-tiny-random/llama-2-tiny-random.gguf"), max_seq_len=128)
    assert meta_chat_format(llm.tokenizer, llm.chat_template).encode_dialog(DIALOG) == LLAMA2_IDS
    (alone,), _ = Llama(llm).generate([LLAMA2_IDS], 4, temperature=0)
    (result,) = Llama(llm).chat_completion([DIALOG], temperature=0, max_gen_len=4)
    assert result["generation"]["content"] == llm.tokenizer.decode(alone)
    with pytest.raises(TokenizerError, match="base model"):  # the native API invents no format
        llm.chat(DIALOG)
