"""GGUF -> Transformers: the config object and the tokenizer, from a parsed :class:`GGUFFile`.

Everything here works on the metadata our bounded reader already parsed: the file is never
opened again. Architecture-specific work (config keys, tensor names and transforms) lives in
the adapters of :mod:`kernel_ext.gguf.arch`; this module is architecture-agnostic:

* config: :func:`build_config` turns an adapter's config dict into a ``PretrainedConfig``.
* tokenizer: ``GGUF_TOKENIZER_MAPPING`` and Transformers' builders (``convert_gguf_tokenizer``:
  the gemma / llama / phi3 sentencepiece, byte-level BPE and unigram converters) are fed our
  metadata instead of their own reader (which re-parses the file); the final tokenizer adopts the
  built backend instead of deep-copying it (a ~3 s JSON round trip for Gemma's 262k tokens), and
  the merges of a vocabulary without them are derived in one pass when its scores are distinct.

Two of those speed-ups replace a private attribute of Transformers for the duration of one call
(:func:`_fast_merges`, :func:`_handed_over`). Both are scoped (a context manager that restores
the original), transparent (a concurrent caller gets the same results it would without them:
the merges are equal, and only the one backend object built here is adopted instead of copied),
and pinned to the Transformers versions they were checked against (:data:`PATCHES_CHECKED`):
with any other version they are skipped and the stock, slower code runs.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import re
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import GGUFFormatError, GGUFUnsupportedError

__all__ = [
    "PATCHES_CHECKED",
    "build_config",
    "build_tokenizer",
    "chat_template",
    "check_tokenizer",
    "plain",
    "tokenizer_class",
    "tokenizer_inputs",
]

log = logging.getLogger(__name__)

# Transformers (major, minor) versions the scoped patches of this module were checked against.
PATCHES_CHECKED: tuple[tuple[int, int], tuple[int, int]] = ((5, 24), (5, 24))


def plain(value: Any) -> Any:
    """A metadata value as Transformers' own parser returns it (lists, not arrays)."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@functools.cache
def _patches_apply() -> bool:
    """Whether the installed Transformers is one the patches were checked against (logged
    once when it is not)."""
    import transformers

    parts = [int(p) for p in re.findall(r"\d+", transformers.__version__)[:2]]
    version = (parts + [0, 0])[:2]
    ok = PATCHES_CHECKED[0] <= (version[0], version[1]) <= PATCHES_CHECKED[1]
    if not ok:
        log.info(
            "kernel_ext: Transformers %s is not one its tokenizer speed-ups were checked "
            "against (%s); using Transformers' own code", transformers.__version__,
            PATCHES_CHECKED,
        )
    return ok


def build_config(config: Mapping[str, Any], dtype: Any = None) -> Any:
    """A Transformers ``PretrainedConfig`` from an adapter's config dict (``model_type`` in it)."""
    from transformers import AutoConfig

    cfg = dict(config)
    model_type = cfg.pop("model_type")
    try:
        result = AutoConfig.for_model(model_type, **cfg)
    except (ValueError, KeyError) as e:
        raise GGUFUnsupportedError(
            f"Transformers cannot build a {model_type!r} config from this file: {e}"
        ) from e
    if dtype is not None:
        result.dtype = dtype
    return result


# --- tokenizer -----------------------------------------------------------------------------------
_SPECIAL_TOKENS = {
    "bos_token": "bos_token_id",
    "eos_token": "eos_token_id",
    "unk_token": "unknown_token_id",
    "pad_token": "padding_token_id",
}


def check_tokenizer(metadata: Mapping[str, Any]) -> None:
    """Refuse, before any work, a file that carries no vocabulary."""
    tokens = metadata.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise GGUFUnsupportedError(
            "the file has no tokenizer (no 'tokenizer.ggml.tokens' list in its metadata); "
            "use a GGUF that embeds its vocabulary"
        )


def tokenizer_inputs(metadata: Mapping[str, Any]) -> tuple[str, dict[str, Any], dict[str, Any]]:
    """``(architecture, tokenizer_dict, tokenizer_config)`` as Transformers' ``get_gguf_tokenizer``
    returns them, from our metadata."""
    from transformers.integrations.gguf import GGUF_TOKENIZER_MAPPING

    arch = metadata.get("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise GGUFFormatError(
            "the file has no 'general.architecture'", field="general.architecture"
        )
    check_tokenizer(metadata)
    grouped = {
        group: {
            name: plain(metadata[f"tokenizer.{key}"])
            for key, name in renames.items()
            if f"tokenizer.{key}" in metadata
        }
        for group, renames in GGUF_TOKENIZER_MAPPING.items()
    }
    tokenizer, tok_config = grouped["tokenizer"], grouped["tokenizer_config"]
    ttype = tokenizer.get("tokenizer_type")
    if ttype == "llama":
        tok_config.setdefault("add_bos_token", True)
    elif ttype == "gemma4":
        tok_config["add_bos_token"] = False
    tokens = tokenizer["tokens"]
    for name, key in _SPECIAL_TOKENS.items():
        token_id = metadata.get(f"tokenizer.ggml.{key}")
        if token_id is not None and not 0 <= int(token_id) < len(tokens):
            raise GGUFFormatError(
                f"tokenizer.ggml.{key} = {token_id} is outside the vocabulary "
                f"of {len(tokens)} tokens",
                field=f"tokenizer.ggml.{key}",
            )
        tok_config[name] = tokens[int(token_id)] if token_id is not None else None
    return arch, tokenizer, tok_config


def _generate_merges(
    vocab: dict[str, int], vocab_scores: dict[str, float] | None = None, skip_tokens: Any = None
) -> list[tuple[str, str]]:
    """``transformers.tokenization_utils_base.generate_merges``, without its global sort when
    the scores are all distinct (Gemma's are: minus the position in the file).

    The original collects every split of every token into pieces that are both in the
    vocabulary, then stable-sorts them all by (score, left length, right length), descending
    when scores are given. With distinct scores that order is simply: tokens by score, and
    within a token its splits by left length (longest first when descending) -- which is
    what is produced here directly, in one pass (~4x faster on Gemma's 262k tokens). Equal
    scores fall back to the original.
    """
    from transformers.tokenization_utils_base import generate_merges

    reverse = vocab_scores is not None
    scores: dict[str, float] = dict(vocab_scores) if vocab_scores is not None else dict(vocab)
    if len(set(scores.values())) != len(scores):
        return generate_merges(vocab, vocab_scores, skip_tokens)
    skip = frozenset(skip_tokens) if skip_tokens is not None else frozenset()
    pieces = {k for k in vocab if k not in skip} if skip else vocab
    order = sorted(scores, key=scores.__getitem__, reverse=reverse)
    merges: list[tuple[str, str]] = []
    extend = merges.extend
    for token in order:
        n = len(token)
        if n < 2 or token in skip:
            continue
        splits = range(n - 1, 0, -1) if reverse else range(1, n)
        extend(
            [(token[:i], token[i:]) for i in splits if token[:i] in pieces and token[i:] in pieces]
        )
    return merges


@contextlib.contextmanager
def _fast_merges() -> Iterator[None]:
    """Use :func:`_generate_merges` inside Transformers' GGUF tokenizer builders."""
    from transformers.integrations.gguf import gguf_tokenizer_mapping as mapping

    if not (_patches_apply() and hasattr(mapping, "generate_merges")):
        yield
        return
    original = mapping.generate_merges
    mapping.generate_merges = _generate_merges
    try:
        yield
    finally:
        mapping.generate_merges = original


def tokenizer_class(model_type: str) -> type:
    """The tokenizer class ``AutoTokenizer`` picks for ``model_type`` (fast backend)."""
    from transformers import PreTrainedTokenizerFast
    from transformers.models.auto.tokenization_auto import (
        TOKENIZER_MAPPING_NAMES,
        tokenizer_class_from_name,
    )

    name = TOKENIZER_MAPPING_NAMES.get(model_type)
    cls = tokenizer_class_from_name(name) if name else None
    return cls if cls is not None else PreTrainedTokenizerFast


def build_tokenizer(metadata: Mapping[str, Any], model_type: str) -> Any:
    """The Transformers tokenizer the file describes (what ``AutoTokenizer.from_pretrained(dir,
    gguf_file=...)`` builds), without re-reading the file."""
    from transformers.integrations.gguf import convert_gguf_tokenizer

    arch, tok_dict, tok_config = tokenizer_inputs(metadata)
    try:
        with _fast_merges():
            backend, extra = convert_gguf_tokenizer(arch, tok_dict)
    except (ValueError, KeyError, TypeError) as e:
        raise GGUFUnsupportedError(
            f"cannot build a tokenizer from this file's metadata "
            f"(tokenizer.ggml.model={tok_dict.get('tokenizer_type')!r}): {e}"
        ) from e
    kwargs = {k: v for k, v in tok_config.items() if v is not None}
    kwargs.update(extra)
    cls = tokenizer_class(model_type)
    with _handed_over(backend):
        return cls(tokenizer_object=backend, **kwargs)


@contextlib.contextmanager
def _handed_over(backend: Any) -> Iterator[None]:
    """Let the tokenizer class adopt ``backend`` instead of deep-copying it.

    ``TokenizersBackend.__init__`` deep-copies ``tokenizer_object`` (a JSON round trip: ~3 s
    for Gemma's vocabulary). We built ``backend`` just now and keep no reference, so adopting
    it is safe; any other object is still copied.
    """
    import copy as _copy
    import types

    from transformers import tokenization_utils_tokenizers as module

    if not (_patches_apply() and hasattr(module, "copy")):
        yield
        return

    def deepcopy(obj: Any, memo: Any = None) -> Any:
        return obj if obj is backend else _copy.deepcopy(obj, memo)

    original = module.copy
    module.copy = types.SimpleNamespace(deepcopy=deepcopy, copy=_copy.copy)  # type: ignore[assignment]
    try:
        yield
    finally:
        module.copy = original


def chat_template(metadata: Mapping[str, Any]) -> str | None:
    """The file's ``tokenizer.chat_template`` (not rendered here), or None."""
    value = metadata.get("tokenizer.chat_template")
    return value if isinstance(value, str) and value else None
