"""The kernel_ext exception hierarchy.

Every error the library raises derives from :class:`KernelExtError` and from the builtin
it behaves like (``ValueError``, ``OSError``, ...), so callers can catch either. Errors are
always chained (``raise ... from e``). The magics turn them into short ``UsageError`` messages.
"""

from __future__ import annotations

__all__ = [
    "KernelExtError",
    "GGUFError",
    "GGUFFormatError",
    "GGUFUnsupportedError",
    "IntegrityError",
    "SignatureError",
    "ModelNotFoundError",
    "MemoryBudgetError",
    "ModelLoadError",
    "RequestBudgetError",
    "ContextOverflowError",
    "RequestMemoryError",
    "LoadTimeoutError",
    "OptionError",
    "PromptError",
    "TemplateError",
    "ProviderError",
    "TransientProviderError",
    "ProviderOutOfMemoryError",
    "BreakerOpenError",
    "RateLimitedError",
    "AllProvidersFailedError",
    "CheckpointError",
    "CheckpointCorruptError",
    "CheckpointLeaseError",
]


class KernelExtError(Exception):
    """Root of every error raised by kernel_ext."""


# --- GGUF files --------------------------------------------------------------------------------
class GGUFError(KernelExtError):
    """Something is wrong with a GGUF file."""


class GGUFFormatError(GGUFError, ValueError):
    """The file is not a well-formed GGUF file.

    ``field`` names what was being read and ``offset`` the byte offset where it starts.
    """

    def __init__(self, message: str, *, field: str | None = None, offset: int | None = None,
                 path: str | None = None) -> None:
        self.field = field
        self.offset = offset
        self.path = path
        where = []
        if field is not None:
            where.append(f"field {field!r}")
        if offset is not None:
            where.append(f"byte offset {offset}")
        prefix = f"{path}: " if path else ""
        suffix = f" ({', '.join(where)})" if where else ""
        super().__init__(f"{prefix}{message}{suffix}")


class GGUFUnsupportedError(GGUFError, NotImplementedError):
    """A well-formed file that uses an architecture or tensor type we cannot load."""


class IntegrityError(KernelExtError, ValueError):
    """A file's SHA-256 does not match its pin."""


class SignatureError(IntegrityError):
    """A model's signature is missing (when required), invalid or not trusted."""


# --- models and memory -------------------------------------------------------------------------
class ModelNotFoundError(KernelExtError, LookupError):
    """No model with that name or path."""


class MemoryBudgetError(KernelExtError, RuntimeError):
    """Loading would exceed the memory budget; the message gives the numbers and the options."""


class ModelLoadError(KernelExtError, RuntimeError):
    """Loading a valid file failed in a later stage (conversion, weights); names the stage."""


class LoadTimeoutError(ModelLoadError, TimeoutError):
    """A load took longer than ``KernelExt.load_timeout``; nothing of it stays loaded."""


# --- requests ----------------------------------------------------------------------------------
class OptionError(KernelExtError, ValueError):
    """A generation option is out of range or of the wrong type (the user's mistake: refused
    before any provider is called, never counted by a breaker).

    ``option`` names the option (``temperature``, ``timeout``...); ``requirement`` says what it
    accepts and what it got, so each front end can name the option its own way.
    """

    def __init__(self, option: str, requirement: str) -> None:
        self.option = option
        self.requirement = requirement
        super().__init__(f"{option} {requirement}")


# --- prompts -----------------------------------------------------------------------------------
class PromptError(KernelExtError, ValueError):
    """A ``{placeholder}`` in a prompt cannot be filled."""


class RequestBudgetError(MemoryBudgetError, PromptError):
    """A request refused before any work: too long for the context or too big for memory.

    A :class:`MemoryBudgetError` (alerts hook memory refusals) and a :class:`PromptError` (the
    user's own request: breakers never count it). The numbers are attributes too.
    """

    def __init__(self, message: str, **numbers: int | None) -> None:
        self.numbers = numbers
        super().__init__(message)


class ContextOverflowError(RequestBudgetError):
    """Prompt tokens + ``max_new_tokens`` pass the model's context window."""


class RequestMemoryError(RequestBudgetError):
    """The request's KV cache and prefill would pass the memory limit."""


class TemplateError(KernelExtError, ValueError):
    """A chat template is unsafe, too large or failed to render."""


# --- providers and resilience ------------------------------------------------------------------
class ProviderError(KernelExtError, RuntimeError):
    """A provider failed to produce an answer."""


class TransientProviderError(ProviderError):
    """A failure that may go away on retry (connection reset, 5xx, busy)."""


class ProviderOutOfMemoryError(ProviderError, MemoryError):
    """The provider ran out of (GPU) memory; retried only in a degraded form."""

    prompt_tokens: int | None = None  # the prompt's length, when the provider knows it


class BreakerOpenError(KernelExtError, RuntimeError):
    """A circuit breaker is open and rejects calls until ``retry_at``."""

    def __init__(self, message: str, *, name: str = "", retry_at: float | None = None,
                 retry_in: float | None = None) -> None:
        self.name = name
        self.retry_at = retry_at
        self.retry_in = retry_in
        super().__init__(message)


class RateLimitedError(KernelExtError, RuntimeError):
    """A provider's rate limit is exhausted."""


class AllProvidersFailedError(KernelExtError, RuntimeError):
    """Every provider in a fallback chain failed; ``causes`` maps provider name to its error."""

    def __init__(self, message: str, causes: dict[str, BaseException] | None = None) -> None:
        self.causes = dict(causes or {})
        super().__init__(message)


# --- checkpoints -------------------------------------------------------------------------------
class CheckpointError(KernelExtError, OSError):
    """A checkpoint could not be written or read."""


class CheckpointCorruptError(CheckpointError):
    """A snapshot failed verification (hash mismatch, missing or truncated object)."""


class CheckpointLeaseError(CheckpointError):
    """Another kernel holds the lease of this checkpoint store: this one may read, not write."""
