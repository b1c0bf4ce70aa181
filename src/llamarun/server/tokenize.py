"""POST /tokenize and POST /detokenize, as llama.cpp's server has them: {"content": text} ->
{"tokens": [ids]} (with_pieces: [{"id", "piece"}]), {"tokens": [ids]} -> {"content": text}.
add_special (default false) adds the BOS the model's prompts start with; parse_special (default
true) reads special-token text such as <|im_end|> as its id. Errors in OpenAI's shape, as
llama.cpp's server answers them."""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import BaseModel

from ..errors import RequestError
from .state import get_state

router = APIRouter()  # behind the server's --api-key, as app.py includes it


class TokenizeRequest(BaseModel):
    content: str
    add_special: bool = False
    parse_special: bool = True
    with_pieces: bool = False


class DetokenizeRequest(BaseModel):
    tokens: list[int]


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict:
    tokenizer = get_state(request).tokenizer
    ids = tokenizer.encode(
        body.content, bos=body.add_special and tokenizer.add_bos, special=body.parse_special
    )
    if not body.with_pieces:
        return {"tokens": ids}
    pieces = [tokenizer.token_bytes(i).decode("utf-8", errors="replace") for i in ids]
    return {"tokens": [{"id": i, "piece": piece} for i, piece in zip(ids, pieces)]}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict:
    state = get_state(request)
    vocab = state.llm.model.args.vocab_size
    bad = [t for t in body.tokens if not 0 <= t < vocab]
    if bad:
        raise RequestError(
            f"tokens {bad[:5]} are outside the vocabulary (0..{vocab - 1})", param="tokens"
        )
    return {"content": state.tokenizer.decode(body.tokens)}
