"""Meta-compatible face: `from llamarun import Llama` runs scripts written for Meta's `llama` package.

`generate` follows the reference loop step for step (prefill the shortest prompt, then force the
remaining prompt tokens row by row, per-row stop, cut at the first stop token), including its
sampling ops, so seeded runs draw the same tokens and log-probs match. One process, any shard count.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .build import load
from .errors import RequestError
from .llm import LLM
from .sampling import sample_top_p_meta
from .tokenizer.chat import UNSAFE_ERROR, has_special_tags, meta_chat_format


class Llama:
    @staticmethod
    def build(
        ckpt_dir: str | Path,
        tokenizer_path: str | Path | None = None,
        max_seq_len: int | None = None,
        max_batch_size: int = 4,
        model_parallel_size: int
        | None = None,  # accepted for compatibility: shards merge in one process
        seed: int = 1,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> Llama:
        """Load any supported checkpoint (folder or file); no torchrun or NCCL needed."""
        llm = load(
            ckpt_dir,
            tokenizer=tokenizer_path,
            device=device,
            dtype=dtype,
            max_seq_len=max_seq_len,
            max_batch_size=max_batch_size,
        )
        return Llama(llm, seed=seed)

    def __init__(self, llm: LLM, seed: int = 1):
        self.llm = llm
        self.model = llm.model
        self.tokenizer = llm._need_tokenizer()
        self.generator = torch.Generator(device=llm.device).manual_seed(seed)

    @torch.inference_mode()
    def generate(
        self,
        prompt_tokens: list[list[int]],
        max_gen_len: int,
        temperature: float = 0.6,
        top_p: float = 0.9,
        logprobs: bool = False,
        echo: bool = False,
    ) -> tuple[list[list[int]], list[list[float]] | None]:
        """Reference semantics: returns (tokens, logprobs) per prompt, cut at the first stop token
        and at max_gen_len; with echo, the prompt is included and logprobs[i][j] (j >= 1) is
        log p(prompt token j | tokens before it)."""
        model, device = self.model, self.llm.device
        prompt_tokens = [list(map(int, p)) for p in _to_lists(prompt_tokens)]
        bsz = len(prompt_tokens)
        if not bsz or any(not p for p in prompt_tokens):
            raise RequestError("every prompt needs at least one token", param="prompt_tokens")
        if bsz > model.max_batch_size:
            raise RequestError(
                f"{bsz} prompts but max_batch_size is {model.max_batch_size}: build with a larger max_batch_size",
                param="max_batch_size",
            )
        if not 0 <= temperature or not 0 < top_p <= 1:
            raise RequestError(
                f"temperature must be >= 0 and top_p in (0, 1], got {temperature} and {top_p}",
                param="temperature",
            )
        vocab = model.args.vocab_size
        if any(not 0 <= t < vocab for p in prompt_tokens for t in p):
            raise RequestError(f"prompt token ids must be in 0..{vocab - 1}", param="prompt_tokens")
        min_prompt_len = min(len(t) for t in prompt_tokens)
        max_prompt_len = max(len(t) for t in prompt_tokens)
        if max_prompt_len > model.max_seq_len:
            raise RequestError(
                f"a prompt has {max_prompt_len} tokens but max_seq_len is {model.max_seq_len}: shorten it or build with a larger max_seq_len",
                param="max_seq_len",
            )
        total_len = min(model.max_seq_len, max_gen_len + max_prompt_len)

        tokens = torch.zeros((bsz, total_len), dtype=torch.long, device=device)
        input_text_mask = torch.zeros((bsz, total_len), dtype=torch.bool, device=device)
        for k, t in enumerate(prompt_tokens):
            tokens[k, : len(t)] = torch.tensor(t, dtype=torch.long, device=device)
            input_text_mask[k, : len(t)] = True
        token_logprobs = torch.zeros((bsz, total_len), dtype=torch.float, device=device)
        stop_ids = torch.tensor(sorted(self.tokenizer.stop_ids), dtype=torch.long, device=device)
        eos_reached = torch.zeros(bsz, dtype=torch.bool, device=device)

        self.llm.engine.forget(range(bsz))  # this loop writes cache rows 0..bsz-1 itself

        def forward(start: int, end: int) -> torch.Tensor:
            input_pos = torch.arange(start, end, device=device).expand(bsz, -1)
            return model(tokens[:, start:end], input_pos, all_logits=True)  # (B, T, V)

        prev_pos = 0
        if min_prompt_len == total_len:
            logits = forward(0, total_len)
            token_logprobs[:, 1:] = -F.cross_entropy(
                logits[:, :-1].transpose(1, 2), tokens[:, 1:], reduction="none"
            )
        for cur_pos in range(min_prompt_len, total_len):
            if logprobs:
                logits = forward(prev_pos, cur_pos)
                last = logits[:, -1]
            else:
                input_pos = torch.arange(prev_pos, cur_pos, device=device).expand(bsz, -1)
                step = self.llm.engine.decode if cur_pos - prev_pos == 1 else model
                last = step(tokens[:, prev_pos:cur_pos], input_pos)  # (B, V)
            if temperature > 0:
                probs = torch.softmax(last / temperature, dim=-1)
                next_token = sample_top_p_meta(probs, top_p, self.generator)
            else:
                next_token = torch.argmax(last, dim=-1)
            next_token = next_token.reshape(-1)
            next_token = torch.where(input_text_mask[:, cur_pos], tokens[:, cur_pos], next_token)
            tokens[:, cur_pos] = next_token
            if logprobs:
                token_logprobs[:, prev_pos + 1 : cur_pos + 1] = -F.cross_entropy(
                    logits.transpose(1, 2), tokens[:, prev_pos + 1 : cur_pos + 1], reduction="none"
                )
            eos_reached |= (~input_text_mask[:, cur_pos]) & torch.isin(next_token, stop_ids)
            prev_pos = cur_pos
            if bool(eos_reached.all()):
                break

        all_logprobs = token_logprobs.tolist() if logprobs else None
        out_tokens, out_logprobs = [], []
        for i, toks in enumerate(tokens.tolist()):
            start = 0 if echo else len(prompt_tokens[i])
            end = len(prompt_tokens[i]) + max_gen_len
            toks = toks[start:end]
            probs = all_logprobs[i][start:end] if logprobs else None
            cut = next((j for j, t in enumerate(toks) if t in self.tokenizer.stop_ids), None)
            if cut is not None:
                toks = toks[:cut]
                probs = probs[:cut] if logprobs else None
            out_tokens.append(toks)
            out_logprobs.append(probs)
        return out_tokens, (out_logprobs if logprobs else None)

    def text_completion(
        self,
        prompts: list[str],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
        echo: bool = False,
    ) -> list[dict]:
        if max_gen_len is None:
            max_gen_len = self.model.max_seq_len - 1
        # Meta's line is bos=True; every Meta/Llama tokenizer says so itself, while models whose
        # tokenizer says no (SmolLM2's GGUF, some Hugging Face configs) are fed what llama.cpp
        # and transformers feed them.
        bos = self.tokenizer.add_bos
        prompt_tokens = [self.tokenizer.encode(x, bos=bos, eos=False) for x in prompts]
        tokens, token_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs, echo
        )
        if logprobs:
            return [
                {
                    "generation": self.tokenizer.decode(t),
                    "tokens": [self.tokenizer.decode([x]) for x in t],
                    "logprobs": lp,
                }
                for t, lp in zip(tokens, token_logprobs)
            ]
        return [{"generation": self.tokenizer.decode(t)} for t in tokens]

    def chat_completion(
        self,
        dialogs: list[list[dict]],
        temperature: float = 0.6,
        top_p: float = 0.9,
        max_gen_len: int | None = None,
        logprobs: bool = False,
    ) -> list[dict]:
        """Meta's chat_completion: all dialogs as one batch, each answered as
        {"generation": {"role": "assistant", "content": ...}} (+ "tokens", "logprobs").
        Format: Llama 2 for SentencePiece tokenizers, Llama 3 for Llama 3's, else the checkpoint's."""
        if max_gen_len is None:
            max_gen_len = self.model.max_seq_len - 1
        fmt = meta_chat_format(self.tokenizer, self.llm.chat_template)
        prompt_tokens = [fmt.encode_dialog(dialog) for dialog in dialogs]
        # Meta's Llama 2 reference refuses dialogs that contain its [INST]/<<SYS>> tags
        unsafe = [fmt.name == "llama2" and has_special_tags(dialog) for dialog in dialogs]
        tokens, token_logprobs = self.generate(
            prompt_tokens, max_gen_len, temperature, top_p, logprobs
        )
        results = []
        for i, toks in enumerate(tokens):
            # the turn also ends at the format's end-of-turn token when it is not a stop id
            cut = next((j for j, t in enumerate(toks) if t in fmt.stop_ids), len(toks))
            toks = toks[:cut]
            content = UNSAFE_ERROR if unsafe[i] else self.tokenizer.decode(toks)
            result = {"generation": {"role": "assistant", "content": content}}
            if logprobs:
                result["tokens"] = [self.tokenizer.decode([t]) for t in toks]
                result["logprobs"] = token_logprobs[i][:cut]
            results.append(result)
        return results


def _to_lists(prompt_tokens) -> list:
    if isinstance(prompt_tokens, torch.Tensor):
        return prompt_tokens.tolist()
    return [p.tolist() if isinstance(p, torch.Tensor) else p for p in prompt_tokens]
