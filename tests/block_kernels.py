"""The block kernels' presence for the tests (kernel_ext.gguf.blockdot needs a C compiler)."""

from __future__ import annotations

import os

import pytest


def require_block_kernels() -> None:
    """Skip when the block kernels cannot run here (no C compiler), saying why; under
    ``make test`` (``KERNEL_EXT_REQUIRE_BLOCKDOT=1``) that is a failure: CI must test them."""
    from kernel_ext.gguf import blockdot

    why = blockdot.unavailable()
    if why is None:
        return
    if os.environ.get("KERNEL_EXT_REQUIRE_BLOCKDOT") == "1":
        pytest.fail(f"the block kernels cannot run here: {why}")
    pytest.skip(f"no block kernels here: {why}")
