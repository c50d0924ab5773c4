"""What the resilience layer costs per call, against the bare call, measured in the same run.

    python -m benchmarks.bench_resilience [--calls N]

- ``breaker.call(fn)`` against ``fn()`` (a no-op): the breaker's bookkeeping and listeners;
- ``FallbackChain.run`` against ``provider.generate`` of an instant in-memory provider: the
  breaker, rate limiter, retry wrapper, offline-cache write and the fsynced audit line;
- the remote provider over loopback HTTP (the stdlib stub server) against the chain around it.

A real model takes seconds per answer; these overheads are meant to stay in the
sub-millisecond to few-millisecond range.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._timing import per_call as _per_call

__all__ = ["main"]


class _Instant:
    name = "instant"

    def load(self) -> None:
        return None

    def generate(
        self, prompt: str, params: Any, *, on_token: Any = None, should_stop: Any = None
    ) -> Any:
        from kernel_ext.providers.base import GenerationResult

        return GenerationResult(text="ok", prompt=prompt, provider=self.name, completion_tokens=1)

    def health(self) -> Any:
        from kernel_ext.providers.base import Health

        return Health(True)

    def close(self) -> None:
        return None


def main(argv: list[str] | None = None) -> int:
    from kernel_ext.config import KernelExtConfig
    from kernel_ext.providers.base import GenerationParams
    from kernel_ext.providers.remote import RemoteProvider
    from kernel_ext.resilience import CircuitBreaker, attach
    from kernel_ext.session import Session

    ap = argparse.ArgumentParser(prog="python -m benchmarks.bench_resilience")
    ap.add_argument("--calls", type=int, default=200)
    args = ap.parse_args(argv)
    n = args.calls

    def noop() -> int:
        return 1

    breaker = CircuitBreaker("bench")
    breaker.add_listener(lambda e: None)
    bare = _per_call(noop, n * 10)
    guarded = _per_call(lambda: breaker.call(noop), n * 10)
    print(
        f"breaker.call        {guarded * 1e6:8.1f} us/call  vs bare {bare * 1e6:6.2f} us "
        f"(+{(guarded - bare) * 1e6:.1f} us)"
    )

    with tempfile.TemporaryDirectory() as tmp:
        session = Session(KernelExtConfig(), None, state_dir=Path(tmp))
        hub = attach(session)
        provider = _Instant()
        hub.add_provider("instant", provider)  # type: ignore[arg-type]
        params = GenerationParams(max_new_tokens=1)
        direct = _per_call(lambda: provider.generate("p", params), n)
        chained = _per_call(lambda: session.chain.run("p", params, model="instant"), n)
        print(
            f"chain.run (instant) {chained * 1e3:8.3f} ms/call  vs direct "
            f"{direct * 1e6:6.1f} us (+{(chained - direct) * 1e3:.3f} ms: breaker, limiter, "
            "retry, cache write, fsynced audit line)"
        )

        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
        from openai_stub import OpenAIStub

        with OpenAIStub() as stub:
            remote = RemoteProvider("stub", stub.url)
            hub.add_provider("stub", remote)
            http = _per_call(lambda: remote.generate("p", params), n // 4 or 1)
            via = _per_call(lambda: session.chain.run("p", params, model="stub"), n // 4 or 1)
            print(
                f"remote over HTTP    {http * 1e3:8.3f} ms/call; through the chain "
                f"{via * 1e3:.3f} ms (ratio {via / http:.2f}x)"
            )
        session.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
