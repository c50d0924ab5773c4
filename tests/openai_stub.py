"""A tiny OpenAI-compatible HTTP server (stdlib ``http.server``) with scripted faults.

Real HTTP on loopback, for fast tests of :class:`kernel_ext.providers.remote.RemoteProvider`.
``server.script(*behaviours)`` queues what the next requests get; after the queue is empty
every request is answered normally. Behaviours:

- ``"ok"``: a normal streamed (SSE) answer: ``answer`` split in words, at most ``max_tokens``;
- ``500``, ``404``, ``429``, ...: that HTTP status with a JSON error body;
- ``"drop"``: two events, then the connection is closed without ``[DONE]``;
- ``"hang"``: nothing is sent until :meth:`OpenAIStub.close` (for read timeouts);
- ``"bad_json"``: an event whose data is not JSON;
- ``"error_event"``: a stream carrying ``{"error": ...}``;
- ``"trickle"``: a slow stream, one word every ``trickle_s`` seconds, up to ``max_tokens``
  words (the answer repeats), until the client goes away or :meth:`OpenAIStub.close`.

No sleeps in the tests: a hanging request blocks on an ``Event``; a trickle is the server
being slow (it waits on the same ``Event``).
"""

from __future__ import annotations

import json
import threading
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

__all__ = ["OpenAIStub"]


class OpenAIStub:
    def __init__(
        self, answer: str = "Paris is the capital of France.", model: str = "stub-model",
        trickle_s: float = 0.05,
    ) -> None:
        self.answer = answer
        self.model = model
        self.trickle_s = trickle_s
        self.requests: list[dict[str, Any]] = []
        self.gets: list[dict[str, Any]] = []  # GET requests (/v1/models), with their headers
        self._script: deque[Any] = deque()
        self._lock = threading.Lock()
        self._release = threading.Event()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                return None

            def do_GET(self) -> None:
                with stub._lock:
                    stub.gets.append(
                        {"path": self.path, "request_id": self.headers.get("X-Request-ID")})
                if self.path.rstrip("/") == "/v1/models":
                    self._json(
                        200, {"object": "list", "data": [{"id": stub.model, "object": "model"}]}
                    )
                else:
                    self._json(404, {"error": {"message": f"no route {self.path}"}})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                chat = self.path.rstrip("/") == "/v1/chat/completions"
                if not chat and self.path.rstrip("/") != "/v1/completions":
                    self._json(404, {"error": {"message": f"no route {self.path}"}})
                    return
                with stub._lock:
                    stub.requests.append(
                        {"path": self.path, "body": body, "auth": self.headers.get("Authorization"),
                         "request_id": self.headers.get("X-Request-ID")}
                    )
                    behaviour = stub._script.popleft() if stub._script else "ok"
                if isinstance(behaviour, int):
                    self._json(behaviour, {"error": {"message": f"scripted HTTP {behaviour}"}})
                    return
                if behaviour == "hang":
                    stub._release.wait()
                    self.close_connection = True
                    return
                if behaviour == "trickle":
                    self._trickle(chat, int(body.get("max_tokens") or 16))
                    return
                self._start_stream()
                words = stub.answer.split(" ")
                pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
                limit = int(body.get("max_tokens") or 16)
                out = pieces[:limit]
                finish = "length" if len(pieces) > limit else "stop"
                if behaviour == "drop":
                    out = out[:2]
                for i, piece in enumerate(out):
                    last = i == len(out) - 1 and behaviour != "drop"
                    if chat:
                        choice = {
                            "index": 0,
                            "delta": {"content": piece},
                            "finish_reason": finish if last else None,
                        }
                    else:
                        choice = {
                            "index": 0,
                            "text": piece,
                            "finish_reason": finish if last else None,
                        }
                    self._event({"id": "cmpl-1", "model": stub.model, "choices": [choice]})
                    if behaviour == "bad_json" and i == 0:
                        self.wfile.write(b"data: {not json\n\n")
                        self.wfile.flush()
                        return
                    if behaviour == "error_event" and i == 0:
                        self._event({"error": {"message": "model crashed"}})
                        return
                if behaviour == "drop":
                    self.wfile.flush()
                    return  # closes without [DONE]
                self._event(
                    {
                        "id": "cmpl-1",
                        "choices": [],
                        "usage": {"prompt_tokens": 5, "completion_tokens": len(out)},
                    }
                )
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

            def _start_stream(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.send_header("Connection", "close")
                self.end_headers()
                self.close_connection = True

            def _trickle(self, chat: bool, limit: int) -> None:
                self._start_stream()
                words = stub.answer.split(" ")
                try:
                    for i in range(limit):
                        piece = words[i % len(words)] if i == 0 else " " + words[i % len(words)]
                        key = {"delta": {"content": piece}} if chat else {"text": piece}
                        self._event({"id": "cmpl-1", "choices": [
                            {"index": 0, **key, "finish_reason": None}]})
                        if stub._release.wait(stub.trickle_s):
                            return
                    self.wfile.write(b"data: [DONE]\n\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    return  # the client went away (an interrupted call)

            def _event(self, payload: dict[str, Any]) -> None:
                self.wfile.write(b"data: " + json.dumps(payload).encode() + b"\n\n")
                self.wfile.flush()

            def _json(self, status: int, payload: dict[str, Any]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )
        self._thread.start()

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def script(self, *behaviours: Any) -> None:
        with self._lock:
            self._script.extend(behaviours)

    def close(self) -> None:
        self._release.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> OpenAIStub:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
