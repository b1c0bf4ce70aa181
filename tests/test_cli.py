"""`llamarun generate` and the Meta-compatible `Llama.build` on tiny checkpoints in every format."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from tiny import llamarun_state, write_meta
from tiny_llama2c import write_llama2c
from tiny_tokenizers import write_sentencepiece

from llamarun import Llama
from llamarun.cli import main
from llamarun.config import ModelArgs
from llamarun.model import Transformer


@pytest.fixture
def meta_dir(tiny_model, tiny_args, tmp_path):
    directory = write_meta(llamarun_state(tiny_model), tiny_args, tmp_path / "ckpt", shards=2)
    write_sentencepiece(directory)
    return directory


def test_generate_streams_text_to_stdout_and_stats_to_stderr(meta_dir, capsys):
    assert main(["generate", str(meta_dir), "-p", "hello world", "-n", "8", "-t", "0"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert re.search(r"\d+ new tokens, \d+ prompt tokens; prefill .* decode .* load", err)


def test_a_float16_kv_cache_generates_the_same_greedy_text(meta_dir, capsys):
    argv = ["generate", str(meta_dir), "-p", "hello world", "-n", "8", "-t", "0"]
    assert main(argv) == 0
    expected = capsys.readouterr().out
    assert main([*argv, "--kv-cache-dtype", "float16"]) == 0
    assert capsys.readouterr().out == expected


def test_generate_batch_prints_each_prompt_with_its_completion(meta_dir, capsys):
    assert (
        main(
            [
                "generate",
                str(meta_dir),
                "-p",
                "one",
                "-p",
                "two three",
                "-n",
                "4",
                "-t",
                "0",
                "--quiet",
            ]
        )
        == 0
    )
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert lines[0].startswith("[0] one") and lines[1].startswith("[1] two three")
    assert err == ""


def test_greedy_generate_is_deterministic_and_matches_the_api(meta_dir, capsys):
    main(["generate", str(meta_dir), "-p", "abc", "-n", "6", "-t", "0", "--quiet"])
    first = capsys.readouterr().out
    main(["generate", str(meta_dir), "-p", "abc", "-n", "6", "-t", "0", "--quiet"])
    assert capsys.readouterr().out == first
    llama = Llama.build(meta_dir, max_seq_len=64, max_batch_size=2)
    [result] = llama.text_completion(["abc"], temperature=0, max_gen_len=6)
    # the CLI keeps the continuation's leading space; Meta's decode() of the new tokens drops it
    assert first.rstrip("\n").strip() == result["generation"].strip()


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "/no/such/model", "-p", "x"], "/no/such/model does not exist"),
        (["generate", "{dir}", "-p", "x", "-t", "-1"], "temperature must be >= 0"),
        (["generate", "{dir}", "-p", "x", "--top-p", "2"], "top_p must be in (0, 1]"),
        (["generate", "{dir}", "-p", "word " * 80, "--max-seq-len", "16"], "max_seq_len is 16"),
        (["generate", "{dir}"], "give a prompt"),
        (["generate", "{dir}", "-p", "x", "--speculate-k", "3"], "--speculate-k sets how many"),
        (
            ["generate", "{dir}", "-p", "x", "--speculate", "lookup", "--speculate-k", "0"],
            "--speculate-k must be an integer from 1 to 16, got 0",
        ),
        (
            ["generate", "{dir}", "-p", "x", "--speculate", "lookup", "--draft", "int8"],
            "--speculate lookup and --draft are two ways",
        ),
        (["generate", "{dir}", "-p", "x", "--draft", "/no/draft"], "/no/draft does not exist"),
    ],
)
def test_bad_input_is_one_sentence_and_exit_code_2(meta_dir, capsys, argv, needle):
    argv = [a.replace("{dir}", str(meta_dir)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamarun: error: ") and needle in err
    assert "Traceback" not in err


@pytest.mark.parametrize("flags", [["--speculate", "lookup"], ["--draft", "int8"]])
def test_speculative_generate_prints_the_same_text_and_its_acceptance(meta_dir, capsys, flags):
    argv = ["generate", str(meta_dir), "-p", "abc abc abc abc", "-n", "24", "-t", "0"]
    assert main(argv) == 0
    expected = capsys.readouterr().out
    assert main([*argv, *flags]) == 0
    out, err = capsys.readouterr()
    assert out == expected
    assert re.search(
        r"speculation .*: \d+% of \d+ drafted tokens kept, [\d.]+ tokens per forward", err
    )


def test_a_draft_with_another_vocabulary_exits_2_naming_both_sizes(meta_dir, tmp_path, capsys):
    args = ModelArgs(dim=16, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=64, max_seq_len=32)
    other = Transformer(args)
    draft = write_llama2c(tmp_path / "draft.bin", other)
    assert main(["generate", str(meta_dir), "-p", "x", "--draft", str(draft)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamarun: error: the draft model") and "64 tokens" in err
    assert "320" in err


def test_an_unknown_speculation_method_is_a_usage_error_naming_the_flag(meta_dir, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["generate", str(meta_dir), "-p", "x", "--speculate", "ngram"])
    assert exit.value.code == 2 and "--speculate" in capsys.readouterr().err


def test_python_dash_m_runs_the_cli():
    done = subprocess.run(
        [sys.executable, "-m", "llamarun", "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0 and "generate" in done.stdout


def test_generate_constrained_by_each_flag(meta_dir, tmp_path, capsys):
    schema = {"type": "object", "properties": {"n": {"enum": [1, 2]}}, "required": ["n"]}
    (tmp_path / "schema.json").write_text(json.dumps(schema))
    (tmp_path / "yes_no.gbnf").write_text('root ::= "yes" | "no"\n')
    base = ["generate", str(meta_dir), "-p", "hello", "-n", "40", "-t", "0", "--quiet"]

    def output(*flags: str) -> str:
        assert main([*base, *flags]) == 0
        return capsys.readouterr().out.rstrip("\n")

    assert json.loads(output("--json-schema", str(tmp_path / "schema.json")))["n"] in (1, 2)
    assert json.loads(output("--json-schema", json.dumps(schema)))["n"] in (1, 2)
    assert output("--json", "-n", "3").startswith("{")  # any object: too open to finish here
    assert re.fullmatch(r"[0-9]{3}", output("--regex", "[0-9]{3}"))
    assert output("--grammar", str(tmp_path / "yes_no.gbnf")) in ("yes", "no")


@pytest.mark.parametrize(
    "flags,needle",
    [
        (["--json-schema", '{"type": "frob"}'], "invalid JSON schema"),
        (["--json-schema", "/no/schema.json"], "cannot read --json-schema /no/schema.json"),
        (["--regex", "[a-"], "invalid regex"),
        (["--json", "--regex", "a"], "at most one constraint"),
    ],
)
def test_bad_constraint_flags_are_one_sentence(meta_dir, capsys, flags, needle):
    assert main(["generate", str(meta_dir), "-p", "x", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llamarun: error: ") and needle in err and "Traceback" not in err


def test_a_constrained_request_decodes_plainly_beside_speculation(meta_dir, capsys):
    argv = ["generate", str(meta_dir), "-p", "hello", "-n", "12", "-t", "0", "--regex", "[0-9]{6}"]
    assert main(argv) == 0
    expected = capsys.readouterr().out
    assert main([*argv, "--speculate", "lookup", "--speculate-k", "4"]) == 0
    out, err = capsys.readouterr()
    assert out == expected and re.fullmatch(r"[0-9]{6}\n", out)
    assert "of 0 drafted tokens kept" in err  # the grammar's masks apply one token at a time
