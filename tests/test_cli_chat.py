"""`llamarun chat`: -p, piped stdin, history and its trimming, and the interactive loop driven
through a pseudo-terminal. A tiny random Hugging Face checkpoint keeps the fast tests fast; the
real SmolLM2-135M-Instruct checks (marked slow) answer real questions."""

import io
import json
import sys

import pytest
import torch
from conftest import shared_model
from tiny import hf_config, llamarun_state, meta_to_hf, write_hf_state
from tiny_tokenizers import TEXT

import llamarun
from llamarun.cli import main
from llamarun.cli.chat import Chat
from llamarun.config import ModelArgs
from llamarun.errors import RequestError
from llamarun.model import Transformer
from llamarun.sampling import SamplingParams

TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
GREEDY = SamplingParams(temperature=0, max_new_tokens=12)
FLAGS = ["-t", "0", "-n", "12"]
SMOLLM2 = "smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"


def write_tiny_chat_model(directory, chat_template=TEMPLATE):
    args = ModelArgs(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, hidden_dim=128, vocab_size=320, max_seq_len=128
    )
    torch.manual_seed(0)
    model = Transformer(args)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.1)
    config = hf_config(args, bos_token_id=0, eos_token_id=1)  # the tiny tokenizer's <s> </s>
    write_hf_state(meta_to_hf(llamarun_state(model), args), config, directory)
    write_ascii_tokenizer(directory, chat_template)
    return directory


def write_ascii_tokenizer(directory, chat_template):
    """A byte-level BPE whose alphabet is only the ASCII seen in training, so that whatever the
    random model picks reads as text (ids 0, 1: <s>, </s>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<s>", "</s>"], show_progress=False
    )
    tok.train_from_iterator([TEXT, "user: assistant: system: 0123456789 ?!"] * 20, trainer=trainer)
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return write_tiny_chat_model(tmp_path_factory.mktemp("tiny_chat"))


@pytest.fixture(scope="module")
def tiny_llm(tiny_dir):
    return llamarun.load(tiny_dir)


def user(text):
    return {"role": "user", "content": text}


def test_prompt_flag_answers_once(tiny_dir, tiny_llm, capsys):
    assert main(["chat", str(tiny_dir), "-p", "Hi", *FLAGS]) == 0
    assert capsys.readouterr().out == tiny_llm.chat([user("Hi")], GREEDY) + "\n"


def test_prompt_flag_with_a_constraint_answers_within_it(tiny_dir, capsys):
    # this tokenizer's alphabet has no "{", so a regex over its words stands in for a schema
    assert main(["chat", str(tiny_dir), "-p", "Hi", *FLAGS, "--regex", "(Lily|Tom) (sat|ran)"]) == 0
    assert capsys.readouterr().out in ("Lily sat\n", "Lily ran\n", "Tom sat\n", "Tom ran\n")


def test_piped_stdin_answers_each_line_and_keeps_the_history(
    tiny_dir, tiny_llm, capsys, monkeypatch
):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hi\nTell me more\n/reset\nHi\n"))
    system = {"role": "system", "content": "Be kind."}
    assert main(["chat", str(tiny_dir), "--system", "Be kind.", *FLAGS]) == 0
    first = tiny_llm.chat([system, user("Hi")], GREEDY)
    second = tiny_llm.chat(
        [system, user("Hi"), {"role": "assistant", "content": first}, user("Tell me more")], GREEDY
    )
    assert second != tiny_llm.chat([system, user("Tell me more")], GREEDY)  # history matters
    assert capsys.readouterr().out == f"{first}\n{second}\n{first}\n"  # /reset forgot both turns


def test_base_model_is_refused_with_a_clear_message(tmp_path, capsys):
    path = write_tiny_chat_model(tmp_path, chat_template=None)
    assert main(["chat", str(path), "-p", "Hi"]) == 2
    assert "base model" in capsys.readouterr().err
    assert main(["chat", str(path), "-p", "Hi", "--chat-template", "chatml"]) == 2
    assert "<|im_start|>" in capsys.readouterr().err
    template = tmp_path / "plain.jinja"
    template.write_text(TEMPLATE)
    assert main(["chat", str(path), "-p", "Hi", "--chat-template", str(template), *FLAGS]) == 0
    assert capsys.readouterr().out.endswith("\n")


def test_history_drops_oldest_turns_but_keeps_the_system_prompt(tiny_llm):
    err = io.StringIO()
    chat = Chat(tiny_llm, GREEDY, system="Be kind.", out=io.StringIO(), err=err)
    for i in range(8):  # each turn is ~25 tokens of 128; room for the answer is 12
        chat.answer(f"Message number {i} is here.")
    assert chat.history[0] == {"role": "system", "content": "Be kind."}
    assert chat.history[-2] == user("Message number 7 is here.")
    assert user("Message number 0 is here.") not in chat.history
    assert "dropped the oldest 2 message(s)" in err.getvalue()
    assert len(tiny_llm.chat_format.encode_dialog(chat.history)) <= tiny_llm.max_seq_len
    with pytest.raises(RequestError, match="does not fit the context of 128 tokens"):
        chat.answer("word " * 200)


def spawn_chat(path, *flags):
    pexpect = pytest.importorskip("pexpect")
    child = pexpect.spawn(
        sys.executable,
        ["-m", "llamarun", "chat", str(path), *flags],
        encoding="utf-8",
        codec_errors="replace",
        timeout=120,
        dimensions=(24, 200),
    )
    child.expect_exact(">>> ")
    return child


def test_interactive_session_in_a_terminal(tiny_dir, tiny_llm):
    answer = tiny_llm.chat([user("Hi")], GREEDY)
    child = spawn_chat(tiny_dir, *FLAGS)
    child.sendintr()  # Ctrl-C at the prompt: a fresh prompt
    child.expect_exact(">>> ")
    child.sendline("Hi")
    child.expect_exact(">>> ")
    assert answer in child.before.replace("\r\n", "\n")
    child.sendline("/reset")
    child.expect_exact("[history cleared]")
    child.expect_exact(">>> ")
    child.sendline("Hi")
    child.expect_exact(">>> ")
    assert answer in child.before.replace("\r\n", "\n")  # the same first answer after /reset
    child.sendline("/exit")
    child.expect(pytest.importorskip("pexpect").EOF)
    child.close()
    assert child.exitstatus == 0


class InterruptingOutput(io.StringIO):
    """stdout that receives Ctrl-C (KeyboardInterrupt) while the third piece of an answer prints."""

    def __init__(self):
        super().__init__()
        self.pieces = 0

    def write(self, text):
        if text != "\n":
            self.pieces += 1
            if self.pieces == 3:
                raise KeyboardInterrupt
        return super().write(text)


def test_ctrl_c_stops_the_answer_and_ctrl_d_leaves(tiny_llm, monkeypatch):
    lines = iter(["Hi", "More"])

    def fake_input(prompt):
        line = next(lines, None)
        if line is None:
            raise EOFError  # Ctrl-D
        return line

    monkeypatch.setattr("builtins.input", fake_input)
    err = io.StringIO()
    chat = Chat(tiny_llm, GREEDY, out=InterruptingOutput(), err=err)
    assert chat.interactive() == 0
    full = tiny_llm.chat([user("Hi")], GREEDY)
    partial = chat.history[1]["content"]
    assert "[answer stopped]" in err.getvalue()
    assert partial and full.startswith(partial) and len(partial) < len(full)
    assert chat.history[2] == user("More") and len(chat.history) == 4  # the session went on
    assert tiny_llm.engine.free_slots() == [0]  # the stopped answer gave back its cache row


@pytest.mark.slow
def test_smollm2_answers_through_the_cli(capsys):
    path = shared_model(SMOLLM2)
    assert main(["chat", str(path), "-p", "What is the capital of France?", "-t", "0"]) == 0
    assert capsys.readouterr().out == "The capital of France is Paris.\n"


@pytest.mark.slow
def test_smollm2_keeps_context_across_turns(capsys, monkeypatch):
    path = shared_model(SMOLLM2)
    monkeypatch.setattr(sys, "stdin", io.StringIO("What is the capital of France?\nAnd Germany?\n"))
    assert main(["chat", str(path), "-t", "0", "-n", "30"]) == 0
    first, second = capsys.readouterr().out.splitlines()
    assert first == "The capital of France is Paris."
    # alone, "And Germany?" gets an answer about the German language
    assert second == "The capital of Germany is Berlin."


@pytest.mark.slow
def test_smollm2_ctrl_c_stops_an_answer_and_the_session_goes_on():
    pexpect = pytest.importorskip("pexpect")
    child = spawn_chat(shared_model(SMOLLM2), "-t", "0", "-n", "400")
    child.sendline("Write a long story about a dragon.")
    child.expect_exact("dragon.\r\n")  # the terminal's echo of the line
    child.expect(r"\w+ \w+ \w+")  # the answer is streaming
    child.sendintr()
    child.expect_exact("[answer stopped]")
    child.expect_exact(">>> ")
    child.sendline("What is the capital of France?")
    child.expect_exact(">>> ")
    child.sendline("/exit")
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


@pytest.mark.slow
def test_smollm2_chat_completion():
    from llamarun import Llama

    llama = Llama.build(shared_model(SMOLLM2), max_seq_len=256, max_batch_size=2)
    dialogs = [[user("What is the capital of France?")], [user("What is 2 + 2?")]]
    results = llama.chat_completion(dialogs, temperature=0, max_gen_len=30)
    assert results[0] == {
        "generation": {"role": "assistant", "content": "The capital of France is Paris."}
    }
    assert "4" in results[1]["generation"]["content"]
