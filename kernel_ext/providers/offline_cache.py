"""The offline response cache: answers kept on disk, served (marked) when no provider can.

One JSON file per answer under ``<state_dir>/offline_cache/``, named by the SHA-256 of the key
``(identity, prompt, params.cache_key())``. ``identity`` is the model file's SHA-256 for a local
model, or the provider's identity (URL + model) for a remote one. Writes are atomic (temp file
+ ``os.replace``), so a crash never leaves a torn entry.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

from .base import GenerationParams, GenerationResult

__all__ = ["OfflineCache", "cache_key"]

log = logging.getLogger(__name__)


def cache_key(identity: str, prompt: str, params: GenerationParams) -> str:
    blob = json.dumps([identity, prompt, params.cache_key()], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


class OfflineCache:
    """Store and look up answers. ``clock`` gives wall-clock seconds (for the age)."""

    name = "offline_cache"

    def __init__(self, root: str | Path, *, clock: Callable[[], float] = time.time) -> None:
        self.root = Path(root)
        self._clock = clock

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def put(
        self, identity: str, prompt: str, params: GenerationParams, result: GenerationResult
    ) -> Path:
        """Keep ``result`` for this key (timed-out partial answers are not kept)."""
        key = cache_key(identity, prompt, params)
        path = self._path(key)
        entry = {
            "identity": identity,
            "prompt": prompt,
            "params": params.cache_key(),
            "text": result.text,
            "model": result.model,
            "provider": result.provider,
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "finish_reason": result.finish_reason,
            "created": self._clock(),
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(entry, f, ensure_ascii=False)
            os.replace(tmp, path)
        except OSError:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path

    def get(
        self, identities: Iterable[str], prompt: str, params: GenerationParams
    ) -> GenerationResult | None:
        """The first answer kept for any of ``identities`` (in order), marked cached, or None."""
        for identity in identities:
            path = self._path(cache_key(identity, prompt, params))
            try:
                entry = json.loads(path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                continue
            except (OSError, ValueError) as e:
                log.warning("kernel_ext: unreadable offline-cache entry %s: %s", path, e)
                continue
            if entry.get("identity") != identity or entry.get("prompt") != prompt:
                continue  # a hash collision or a foreign file: never serve a wrong answer
            age = max(0.0, self._clock() - float(entry.get("created", 0.0)))
            return GenerationResult(
                text=str(entry.get("text", "")),
                prompt=prompt,
                model=str(entry.get("model", "")),
                provider=self.name,
                prompt_tokens=int(entry.get("prompt_tokens", 0)),
                completion_tokens=int(entry.get("completion_tokens", 0)),
                finish_reason="cached",
                cached=True,
                cache_age_s=age,
                notes=[
                    f"answered from the offline cache ({age:.0f} s old, first answered by "
                    f"{entry.get('provider', '?')})"
                ],
            )
        return None

    def __len__(self) -> int:
        if not self.root.exists():
            return 0
        return sum(1 for _ in self.root.glob("*/*.json"))

    def clear(self) -> int:
        n = 0
        for p in self.root.glob("*/*.json"):
            p.unlink(missing_ok=True)
            n += 1
        return n
