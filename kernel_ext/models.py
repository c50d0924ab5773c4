"""Model registry (placeholder API; implemented by the foundation work)."""

from __future__ import annotations

from typing import Any

__all__ = ["ModelRegistry"]


class ModelRegistry:
    def __init__(self, session: Any) -> None:
        self.session = session
        self._models: dict[str, Any] = {}

    def unload_all(self) -> None:
        self._models.clear()

    def state(self) -> list[dict[str, Any]]:
        return []

    def restore_state(self, state: list[dict[str, Any]]) -> list[str]:
        return []
