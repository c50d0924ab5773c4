"""A provider for an OpenAI-compatible server (vLLM, llama.cpp's server, TGI) over httpx.

``/v1/completions`` (or ``/v1/chat/completions`` with ``chat=True``), streamed as server-sent
events. Errors map onto the hierarchy: connection refused/reset, timeouts, 5xx, 429 and a
stream cut short are :class:`TransientProviderError` (retried, counted by the breaker); other
4xx answers are :class:`ProviderError` (the request is wrong: not retried).

Two ways a call ends early are not errors: the call's own timeout (``params.timeout``, also the
read timeout of the request) returns the text so far marked ``finish_reason="timeout"``, and the
stop button (``KeyboardInterrupt`` while the answer streams) returns it marked
``"interrupted"``; the interrupted connection is dropped, not reused.
"""

from __future__ import annotations

import json
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx

from ..errors import ProviderError, TransientProviderError
from ..trace import current_request_id
from .base import GenerationParams, GenerationResult, Health, StopCheck, TokenCallback

__all__ = ["RemoteProvider"]

_ssl_lock = threading.Lock()
_ssl_context: ssl.SSLContext | None = None


def _shared_ssl_context() -> ssl.SSLContext:
    """One verifying SSL context per process (building one loads the CA bundle: ~0.4 s)."""
    global _ssl_context
    with _ssl_lock:
        if _ssl_context is None:
            import certifi

            _ssl_context = ssl.create_default_context(cafile=certifi.where())
        return _ssl_context


class RemoteProvider:
    """Talks to ``base_url`` (ending in ``/v1``)."""

    def __init__(
        self,
        name: str,
        base_url: str,
        *,
        model: str | None = None,
        chat: bool = False,
        api_key: str | None = None,
        api_key_env: str | None = None,
        connect_timeout: float = 5.0,
        read_timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not base_url.startswith(("http://", "https://")):
            raise ValueError(
                f"remote provider URL must start with http:// or https://, got {base_url!r}"
            )
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.chat = chat
        self._api_key = api_key
        self.api_key_env = api_key_env  # saved with the session state; the key itself never is
        self.read_timeout = float(read_timeout)  # saved with the session state
        self._timeout = httpx.Timeout(read_timeout, connect=connect_timeout)
        self._transport = transport
        self._clock = clock
        self._client: httpx.Client | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"RemoteProvider({self.name!r}, {self.base_url!r}, model={self.model!r}, "
            f"chat={self.chat})"
        )

    def cache_identity(self) -> str:
        return f"remote:{self.base_url}|{self.model or ''}|{'chat' if self.chat else 'completion'}"

    # --- lifecycle ------------------------------------------------------------------------------
    def load(self) -> None:
        with self._lock:
            if self._client is None:
                key = self._api_key or (
                    os.environ.get(self.api_key_env) if self.api_key_env else None
                )
                headers = {"Authorization": f"Bearer {key}"} if key else {}
                # Plain http needs no TLS context; https shares one verifying context.
                verify: ssl.SSLContext | bool = (
                    _shared_ssl_context() if self.base_url.startswith("https://") else False
                )
                self._client = httpx.Client(
                    base_url=self.base_url,
                    timeout=self._timeout,
                    headers=headers,
                    transport=self._transport,
                    verify=verify,
                )

    def close(self) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is not None:
            client.close()

    def _http(self) -> httpx.Client:
        self.load()
        assert self._client is not None
        return self._client

    def health(self) -> Health:
        try:
            r = self._http().get("/models", timeout=self._timeout.connect or 5.0,
                                 headers=_request_headers())
        except httpx.HTTPError as e:
            return Health(False, f"{self.base_url}: {type(e).__name__}: {e}")
        if r.status_code >= 400:
            return Health(False, f"{self.base_url}/models answered HTTP {r.status_code}")
        return Health(True, f"{self.base_url} is up")

    # --- generation -----------------------------------------------------------------------------
    def _body(self, prompt: str, params: GenerationParams) -> dict[str, Any]:
        body: dict[str, Any] = {
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "stream": True,
        }
        if self.model:
            body["model"] = self.model
        if params.top_k:
            body["top_k"] = params.top_k
        if params.seed is not None:
            body["seed"] = params.seed
        if params.stop:
            body["stop"] = list(params.stop)
        chat = self.chat if params.chat is None else params.chat
        if chat:
            messages = [{"role": "system", "content": params.system}] if params.system else []
            messages.append({"role": "user", "content": prompt})
            body["messages"] = messages
        else:
            body["prompt"] = (params.system + "\n\n" + prompt) if params.system else prompt
        return body

    def generate(
        self,
        prompt: str,
        params: GenerationParams,
        *,
        on_token: TokenCallback | None = None,
        should_stop: StopCheck | None = None,
    ) -> GenerationResult:
        chat = self.chat if params.chat is None else params.chat
        path = "/chat/completions" if chat else "/completions"
        body = self._body(prompt, params)
        timeout = self._timeout
        if params.timeout:
            timeout = httpx.Timeout(
                min(params.timeout, self._timeout.read or params.timeout),
                connect=self._timeout.connect,
            )
        start = self._clock()
        pieces: list[str] = []
        first: float | None = None
        finish = "stop"
        usage: dict[str, Any] = {}
        chunks = 0

        def users_timeout_passed() -> bool:
            if should_stop is not None and should_stop():
                return True
            return bool(params.timeout) and self._clock() - start >= (params.timeout or 0.0)

        try:
            with self._http().stream("POST", path, json=body, timeout=timeout,
                                     headers=_request_headers()) as r:
                if r.status_code >= 400:
                    r.read()
                    self._raise_for_status(r, path)
                for event in _sse_events(r.iter_lines()):
                    if event is None:
                        break
                    if event.get("usage"):
                        usage = event["usage"]
                    for choice in event.get("choices") or []:
                        piece = (
                            (choice.get("delta") or {}).get("content")
                            if chat
                            else choice.get("text")
                        )
                        if piece:
                            if first is None:
                                first = self._clock() - start
                            pieces.append(piece)
                            chunks += 1
                            if on_token is not None:
                                on_token(piece)
                        if choice.get("finish_reason"):
                            finish = str(choice["finish_reason"])
                    if users_timeout_passed():
                        finish = "timeout"
                        break
                else:
                    raise TransientProviderError(
                        f"{self.name}: the stream from {self.base_url}{path} ended without "
                        "[DONE] (server dropped the connection?)"
                    )
        except KeyboardInterrupt:
            finish = "interrupted"  # the stop button: keep what came, drop the connection
            self.close()
        except httpx.ReadTimeout as e:
            if not users_timeout_passed():
                raise TransientProviderError(
                    f"{self.name}: {self.base_url}{path} timed out ({type(e).__name__})"
                ) from e
            finish = "timeout"  # the call's own --timeout: not the server's fault
        except httpx.TimeoutException as e:
            raise TransientProviderError(
                f"{self.name}: {self.base_url}{path} timed out ({type(e).__name__})"
            ) from e
        except (httpx.TransportError, httpx.StreamError) as e:
            raise TransientProviderError(
                f"{self.name}: cannot reach {self.base_url}{path}: {type(e).__name__}: {e}"
            ) from e
        except json.JSONDecodeError as e:
            raise TransientProviderError(
                f"{self.name}: malformed event from {self.base_url}{path}: {e}"
            ) from e
        text = "".join(pieces)
        if finish not in ("stop", "length", "timeout", "interrupted"):
            finish = "stop"
        return GenerationResult(
            text=text,
            prompt=prompt,
            model=self.model or self.base_url,
            provider=self.name,
            prompt_tokens=int(usage.get("prompt_tokens", 0) or 0),
            completion_tokens=int(usage.get("completion_tokens", 0) or chunks),
            finish_reason=finish,
            time_to_first_token_s=first,
            total_s=self._clock() - start,
        )

    def _raise_for_status(self, r: httpx.Response, path: str) -> None:
        detail = r.text[:300].strip()
        msg = f"{self.name}: {self.base_url}{path} answered HTTP {r.status_code}: {detail}"
        if r.status_code >= 500 or r.status_code in (408, 429):
            raise TransientProviderError(msg)
        raise ProviderError(msg + " (the request was rejected; check the model name and options)")


def _request_headers() -> dict[str, str]:
    """``X-Request-ID``: the correlation id of the cell (or request) this call serves."""
    cid = current_request_id()
    return {"X-Request-ID": cid} if cid else {}


def _sse_events(lines: Iterator[str]) -> Iterator[dict[str, Any] | None]:
    """JSON payloads of ``data:`` lines; ``None`` for ``[DONE]``."""
    for line in lines:
        line = line.strip()
        if not line or line.startswith(":") or not line.startswith("data:"):
            continue
        data = line[len("data:") :].strip()
        if data == "[DONE]":
            yield None
            return
        payload = json.loads(data)
        if isinstance(payload, dict) and payload.get("error"):
            raise TransientProviderError(f"server reported an error mid-stream: {payload['error']}")
        if isinstance(payload, dict):
            yield payload
