"""Inference providers: one protocol, several backends."""

from __future__ import annotations

from .base import GenerationParams, GenerationResult, Health, Provider, StopCheck, TokenCallback

__all__ = ["GenerationParams", "GenerationResult", "Health", "Provider", "StopCheck", "TokenCallback"]
