"""Correlation ids: one per notebook cell, on every audit record the cell causes (loads,
inferences, breaker transitions, checkpoints, alerts) and sent to remote servers as
``X-Request-ID``.

:class:`CellTrace` (``session.trace``) holds the id of the cell running now; the Session sets
a fresh one in IPython's ``pre_run_cell``, and the checkpoint written in ``post_run_cell``
still carries it. :func:`request_scope` narrows the id for one piece of work (the fallback
chain runs each inference in one), which is what providers read with
:func:`current_request_id`: providers know nothing of sessions. Work moved to another thread
must carry the context along (``contextvars.copy_context().run``).
"""

from __future__ import annotations

import contextlib
import contextvars
import uuid
from collections.abc import Iterator

__all__ = ["CellTrace", "current_request_id", "new_id", "request_scope"]

_request: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "kernel_ext_request_id", default=None
)


def new_id() -> str:
    """A fresh correlation id: a UUID in its canonical text form.

    A UUID because servers validate the header: llama.cpp's server (llama-cpp-python, through
    starlette-context) answers HTTP 400 to any ``X-Request-ID`` that is not one."""
    return str(uuid.uuid4())


def current_request_id() -> str | None:
    """The id of the request in progress in this context, if any."""
    return _request.get()


@contextlib.contextmanager
def request_scope(correlation_id: str | None) -> Iterator[str | None]:
    """Run the block with ``correlation_id`` as the current request id."""
    token = _request.set(correlation_id)
    try:
        yield correlation_id
    finally:
        _request.reset(token)


class CellTrace:
    """The correlation id of the cell running now (None outside cells, e.g. in scripts)."""

    def __init__(self) -> None:
        self.cell_id: str | None = None

    def begin_cell(self, *_: object) -> str:
        """Start a new cell (IPython's ``pre_run_cell`` passes its ``info``)."""
        self.cell_id = new_id()
        return self.cell_id

    def current(self) -> str | None:
        """The innermost id: a request scope's, else the cell's."""
        return _request.get() or self.cell_id
