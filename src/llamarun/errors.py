"""Errors a user can cause. Each carries one finished sentence: what is wrong, where, and the fix."""


class LlamarunError(Exception):
    """Base class: the CLI prints these as `llamarun: error: ...` and exits with code 2."""


class CheckpointError(LlamarunError):
    """A checkpoint path, file or tensor is missing, corrupt or inconsistent."""


class TokenizerError(LlamarunError):
    """A tokenizer file is missing, unreadable or does not match the model."""


class ConfigError(LlamarunError):
    """An architecture or runtime setting is invalid."""


class RequestError(LlamarunError):
    """A generation request (API call, CLI flag or HTTP body) has an invalid value."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class DownloadError(LlamarunError):
    """A model could not be fetched or failed its checksum."""


class MemoryPlanError(LlamarunError):
    """The model does not fit the chosen device; the message lists the options that would fit."""


class DistributedError(LlamarunError):
    """A rank of a distributed run (--tp/--pp) failed or could not be reached; every rank exits."""
