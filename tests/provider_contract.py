"""The contract every provider passes (in the style of zarr's ``StoreTests``).

A provider's test module subclasses :class:`ProviderTests` and supplies a ``provider``
fixture (a ready-to-load provider) plus, optionally, ``prompt``::

    class TestRemoteProviderContract(ProviderTests):
        @pytest.fixture
        def provider(self, stub):
            p = RemoteProvider("stub", stub.url)
            yield p
            p.close()

The class name does not start with ``Test``, so pytest collects it only through subclasses.
"""

from __future__ import annotations

from typing import Any

import pytest

from kernel_ext.errors import KernelExtError
from kernel_ext.providers.base import (
    FINISH_REASONS,
    GenerationParams,
    GenerationResult,
    Health,
    Provider,
)

__all__ = ["ProviderTests"]


class ProviderTests:
    """Behaviour every :class:`~kernel_ext.providers.base.Provider` must show."""

    prompt = "The capital of France is"
    max_new_tokens = 4
    # The stop button while an answer streams returns the partial answer; a subclass whose
    # provider does not do this yet sets this to the reason, and the test is skipped.
    interrupt_pending: str | None = None

    def params(self, **kw: Any) -> GenerationParams:
        kw.setdefault("max_new_tokens", self.max_new_tokens)
        return GenerationParams(**kw)

    def test_is_a_provider_with_a_name(self, provider: Any) -> None:
        assert isinstance(provider, Provider)
        assert isinstance(provider.name, str) and provider.name

    def test_load_is_idempotent(self, provider: Any) -> None:
        provider.load()
        provider.load()
        assert isinstance(provider.health(), Health)

    def test_generate_returns_a_result(self, provider: Any) -> None:
        provider.load()
        r = provider.generate(self.prompt, self.params())
        assert isinstance(r, GenerationResult)
        assert isinstance(r.text, str) and r.text
        assert r.finish_reason in FINISH_REASONS
        assert r.provider == provider.name
        assert r.completion_tokens >= 1 and r.total_s >= 0
        assert str(r) == r.text

    def test_streamed_pieces_add_up_to_the_text(self, provider: Any) -> None:
        provider.load()
        pieces: list[str] = []
        r = provider.generate(self.prompt, self.params(), on_token=pieces.append)
        assert pieces and "".join(pieces) == r.text

    def test_max_new_tokens_is_respected(self, provider: Any) -> None:
        provider.load()
        r = provider.generate(self.prompt, self.params(max_new_tokens=2))
        assert 1 <= r.completion_tokens <= 2
        if r.finish_reason == "length":
            assert r.completion_tokens == 2

    def test_greedy_is_deterministic(self, provider: Any) -> None:
        provider.load()
        a = provider.generate(self.prompt, self.params(temperature=0.0))
        b = provider.generate(self.prompt, self.params(temperature=0.0))
        assert a.text == b.text

    def test_should_stop_stops_cooperatively_with_partial_text(self, provider: Any) -> None:
        provider.load()
        full = provider.generate(self.prompt, self.params(max_new_tokens=6))
        polls: list[int] = []

        def stop() -> bool:
            polls.append(1)
            return True

        r = provider.generate(self.prompt, self.params(max_new_tokens=6), should_stop=stop)
        assert polls, "should_stop was never polled"
        assert r.finish_reason == "timeout" and r.timed_out
        assert full.text.startswith(r.text)
        assert r.completion_tokens < full.completion_tokens or full.completion_tokens <= 1

    def test_the_stop_button_returns_the_partial_answer(self, provider: Any) -> None:
        if self.interrupt_pending:
            pytest.skip(self.interrupt_pending)
        provider.load()
        seen: list[str] = []

        def on_token(piece: str) -> None:
            seen.append(piece)
            if len(seen) == 2:
                raise KeyboardInterrupt  # what SIGINT raises in the kernel mid-stream

        try:
            r = provider.generate(self.prompt, self.params(max_new_tokens=8), on_token=on_token)
        except KeyboardInterrupt:  # would end the whole test run, not just this test
            pytest.fail("the KeyboardInterrupt escaped the provider: it must return the partial "
                        "answer marked finish_reason='interrupted'")
        assert isinstance(r, GenerationResult) and r.provider == provider.name
        assert r.finish_reason == "interrupted" and r.interrupted and r.partial
        shown = "".join(seen)
        assert r.text and (shown.startswith(r.text) or r.text.startswith(shown))
        assert provider.generate(self.prompt, self.params()).text  # still usable afterwards

    def test_errors_are_typed(self, provider: Any) -> None:
        provider.load()
        try:
            provider.generate(self.prompt, self.params(max_new_tokens=1))
        except Exception as e:  # a well-behaved provider raises only library errors
            assert isinstance(e, KernelExtError), f"untyped error {type(e).__name__}: {e}"

    def test_close_is_idempotent(self, provider: Any) -> None:
        provider.load()
        provider.close()
        provider.close()
