"""The scheduler behind ``%%infer --over`` and :func:`kernel_ext.infer_many`.

One prompt per item, answered through the session's chain, saved item by item (as each one
finishes) in a resumable task (:mod:`kernel_ext.checkpoint.tasks`):

* **Identity.** An item's key is a hash of its rendered prompt (after interpolation), the
  model's identity (the GGUF file's SHA-256, or the remote provider's identity) and the
  generation options. Re-running recomputes only the items whose key changed; a changed
  ``{lang}`` in the prompt changes every key, so nothing stale is reused. Duplicate prompts
  get their own keys (``#2``, ``#3``...).
* **Local models** run in batches (:class:`kernel_ext.providers.batch.BatchEngine`):
  continuous batching, ``batch_size`` rows at a time (default: :func:`batch_size_for`).
  Each item goes through the model's breaker (one permit per batch, one outcome per item),
  is audited and kept in the offline cache like a single ``%%infer``. An engine failure is
  recorded by the breaker and the unfinished items go one at a time through the full chain
  (fallbacks, offline cache); out of memory halves the batch first.
* **Remote providers** get ``concurrency`` requests in flight, each through the full chain
  (breaker, retries, fallbacks, offline cache); the workers share the provider's one rate
  limiter, on which the chain waits for its turn.
* **Per-item outcomes.** A failed item is an :class:`ItemError` in its place (text ``""``,
  the error kept); the others are ``GenerationResult`` objects in item order. Failed items,
  timed-out partial answers and offline-cache answers are not recorded as done, so a re-run
  tries them again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, fields
from typing import Any

from .errors import BreakerOpenError, KernelExtError, ProviderOutOfMemoryError
from .providers.base import GenerationParams, GenerationResult
from .trace import new_id

log = logging.getLogger(__name__)

__all__ = ["ItemError", "OverResults", "batch_size_for", "item_keys", "run_over"]

DEFAULT_CONCURRENCY = 4
"""Requests in flight against a remote provider when ``concurrency`` is not given."""

KV_BUDGET_FRACTION = 0.25
"""Share of the memory available now that the default batch size may fill with KV cache."""

_RESULT_FIELDS = {f.name for f in fields(GenerationResult)}


@dataclass
class ItemError:
    """An item that got no answer. ``str()`` is ``""`` and it is falsy, so ``[r for r in out
    if r]`` keeps the answers; ``error`` says what went wrong."""

    index: int
    prompt: str
    error: str
    error_type: str
    text: str = ""
    provider: str = ""
    model: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "error"
    cached: bool = False

    def __str__(self) -> str:
        return ""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return f"ItemError(index={self.index}, {self.error_type}: {self.error[:200]!r})"


class OverResults(list):  # type: ignore[type-arg]
    """The answers in item order (``GenerationResult`` or :class:`ItemError`), plus what the
    run did: ``texts``, ``failed``, ``restored`` (answers reused from earlier runs),
    ``summary``."""

    restored: int = 0
    computed: int = 0
    elapsed_s: float = 0.0
    completion_tokens: int = 0
    mode: str = ""
    interrupted: bool = False  # the stop button: the unanswered items are None

    @property
    def missing(self) -> int:
        return sum(r is None for r in self)

    @property
    def texts(self) -> list[str]:
        return [r.text for r in self]

    @property
    def failed(self) -> list[ItemError]:
        return [r for r in self if isinstance(r, ItemError)]

    @property
    def summary(self) -> str:
        answered = [r for r in self if not isinstance(r, ItemError)]
        by: Counter[str] = Counter(
            "the offline cache" if r.cached else (r.provider or r.model or "?") for r in answered
        )
        where = ", ".join(f"{n} from {p}" for p, n in by.most_common())
        parts = [f"{len(answered)}/{len(self)} answered" + (f" ({where})" if where else "")]
        if self.restored:
            parts.append(f"{self.restored} reused from earlier runs")
        failed = self.failed
        if failed:
            first = failed[0]
            parts.append(f"{len(failed)} failed (first: item {first.index}: {first.error_type}: "
                         f"{first.error.splitlines()[0][:160] if first.error else ''})")
        if self.computed:
            rate = self.completion_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0
            parts.append(f"{self.computed} computed in {self.elapsed_s:.1f} s, {rate:.1f} tok/s"
                         + (f", {self.mode}" if self.mode else ""))
        return " · ".join(parts)


def item_keys(prompts: Sequence[str], identity: str, params: GenerationParams) -> list[str]:
    """One key per prompt: a hash of the rendered prompt, the model's identity and the options
    that change the answer (``params.cache_key()``); repeats get ``#2``, ``#3``..."""
    options = json.dumps(params.cache_key(), sort_keys=True, default=str)
    seen: Counter[str] = Counter()
    keys = []
    for prompt in prompts:
        digest = hashlib.sha256(json.dumps([identity, options, prompt]).encode()).hexdigest()[:24]
        seen[digest] += 1
        keys.append(digest if seen[digest] == 1 else f"{digest}#{seen[digest]}")
    return keys


def batch_size_for(config: Any, tokens_per_row: int, *, device: str = "cpu",
                   available: int | None = None) -> int:
    """The default batch size: rows whose KV cache (from the model config) fits in
    :data:`KV_BUDGET_FRACTION` of the memory available now (see
    :func:`kernel_ext.providers.batch.default_batch_size`)."""
    from .memory import available_bytes
    from .providers.batch import default_batch_size

    free = available_bytes(device) if available is None else available
    dtype_bytes = 2 if str(getattr(config, "torch_dtype", getattr(config, "dtype", ""))).endswith(
        ("float16", "bfloat16")) else 4
    return default_batch_size(config, tokens_per_row, int(free * KV_BUDGET_FRACTION),
                              dtype_bytes=dtype_bytes)


# --- the run ---------------------------------------------------------------------------------------
def run_over(session: Any, prompts: Sequence[str], params: GenerationParams, *,
             model: str | None = None, name: str = "infer_many", batch_size: int | None = None,
             concurrency: int | None = None, progress: bool = True) -> OverResults:
    """Answer every prompt (see the module docstring); returns the answers in item order."""
    from .checkpoint.tasks import task

    if batch_size is not None and batch_size < 1:
        raise KernelExtError(f"batch_size must be >= 1, got {batch_size}")
    if concurrency is not None and concurrency < 1:
        raise KernelExtError(f"concurrency must be >= 1, got {concurrency}")
    prompts = [str(p) for p in prompts]
    target, provider = _primary(session, model)
    identity = provider.cache_identity() if provider is not None else f"name:{target}"
    keys = item_keys(prompts, identity, params)
    # every answer is saved as soon as it is recorded (an answer costs far more than a commit),
    # so a SIGKILL loses at most the items in flight
    t = task(name, keys, key=lambda k: k, session=session, progress=False, every_items=1)
    out = OverResults([None] * len(prompts))
    restored = t.results_by_key
    for i, k in enumerate(keys):
        if k in restored:
            out[i] = _result_from(restored[k])
    out.restored = sum(r is not None for r in out)
    todo = [i for i, r in enumerate(out) if r is None]
    bar = _Progress(session, name, len(prompts), out.restored, show=progress)
    start = time.perf_counter()

    def finish(i: int, result: GenerationResult | ItemError) -> None:
        out[i] = result
        out.computed += 1
        out.completion_tokens += result.completion_tokens
        if isinstance(result, GenerationResult) and not result.cached and not result.timed_out:
            t.record(keys[i], _result_json(result))
        bar.item(failed=isinstance(result, ItemError))

    try:
        if todo:
            from .providers.transformers_gguf import TransformersGGUFProvider

            if isinstance(provider, TransformersGGUFProvider) and batch_size != 1:
                todo = _run_batched(session, target, provider, prompts, todo, params, batch_size,
                                    finish, bar, out)
            elif provider is not None and not isinstance(provider, TransformersGGUFProvider):
                n = concurrency if concurrency is not None else DEFAULT_CONCURRENCY
                if n > 1 and len(todo) > 1:
                    out.mode = f"{n} concurrent requests"
                    todo = _run_concurrent(session, target, prompts, todo, params, model, n,
                                           finish, bar)
            for i in todo:  # one at a time through the chain
                result = _one(session, prompts, i, params, model, bar)
                if getattr(result, "interrupted", False):
                    raise KeyboardInterrupt  # the stop button: its partial answer is not kept
                finish(i, result)
    except KeyboardInterrupt:
        out.interrupted = True  # what finished is saved and kept; a re-run answers the rest
    finally:
        out.elapsed_s = time.perf_counter() - start
        bar.close()
        t._flush_quietly()  # every finished item is saved before we return or raise
    return out


def _primary(session: Any, model: str | None) -> tuple[str | None, Any]:
    """The provider the chain tries first (None when it cannot be resolved: the chain then
    reports why, item by item)."""
    hub = getattr(session, "resilience", None)
    try:
        if hub is not None:
            name = model or hub.default_model()
            return name, (hub.resolve(name) if name else None)
        entry = session.models.get(model)
        return entry.name if hasattr(entry, "name") else model, entry.provider
    except Exception:  # noqa: BLE001 - unknown model: the chain's own error, per item
        return model, None


def _one(session: Any, prompts: Sequence[str], i: int, params: GenerationParams,
         model: str | None, bar: _Progress | None = None) -> GenerationResult | ItemError:
    try:
        result = session.infer(prompts[i], params, model=model)
    except Exception as e:  # noqa: BLE001 - one item's failure is that item's outcome
        return ItemError(i, prompts[i], str(e), type(e).__name__)
    if bar is not None:
        bar.tokens(result.completion_tokens)
    return result


def _result_json(result: GenerationResult) -> dict[str, Any]:
    d = {k: v for k, v in result.to_dict().items() if k in _RESULT_FIELDS}
    return json.loads(json.dumps(d, default=str))


def _result_from(value: Any) -> GenerationResult:
    if isinstance(value, GenerationResult):
        return value
    if isinstance(value, dict):
        return GenerationResult(**{k: v for k, v in value.items() if k in _RESULT_FIELDS})
    return GenerationResult(text=str(value))  # a plain string saved by an older version


# --- remote: N requests in flight -------------------------------------------------------------------
def _run_concurrent(session: Any, target: str | None, prompts: Sequence[str], todo: list[int],
                    params: GenerationParams, model: str | None, n: int,
                    finish: Callable[[int, Any], None], bar: _Progress) -> list[int]:
    """Answer ``todo`` with ``n`` workers; results are recorded in the caller's thread.
    Returns the items left to run one at a time (none, unless interrupted)."""
    # The chain waits on the provider's one shared token bucket (up to the call's timeout),
    # so the workers together stay within its rate instead of being turned away by it.
    def work(i: int) -> GenerationResult | ItemError:
        return _one(session, prompts, i, params, model)

    pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="kernel_ext-over")
    pending: dict[Future[Any], int] = {}
    queue = list(todo)
    try:
        while queue or pending:
            while queue and len(pending) < n:
                i = queue.pop(0)
                pending[pool.submit(work, i)] = i
            done, _ = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                i = pending.pop(fut)
                result = fut.result()
                if getattr(result, "interrupted", False):
                    raise KeyboardInterrupt
                bar.tokens(result.completion_tokens)
                finish(i, result)
    finally:
        for fut in pending:
            fut.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
    return []


# --- local: batches ---------------------------------------------------------------------------------
def _run_batched(session: Any, target: str | None, provider: Any, prompts: Sequence[str],
                 todo: list[int], params: GenerationParams, batch_size: int | None,
                 finish: Callable[[int, Any], None], bar: _Progress, out: OverResults) -> list[int]:
    """Answer what the batch engine can; returns the items left to run one at a time."""
    import torch

    from .providers.batch import BatchEngine, BatchOutput, BatchRequest
    from .providers.decode import Sampling
    from .providers.transformers_gguf import _eos_ids

    try:
        provider.load()  # touches the registry's LRU; an evicted model is loaded again
    except Exception:  # noqa: BLE001 - the chain reports it, item by item
        return todo
    local = provider.local
    if local is None:
        return todo
    why = BatchEngine.unsupported(local.model)
    if why is not None:
        out.mode = f"one at a time ({why})"
        return todo
    prepared = None
    try:  # the copies %%infer alone decodes with (its head screen; int4 linears if quantized)
        prepared = provider.prepare_decode()
    except Exception as e:  # noqa: BLE001 - the model's own head still answers exactly
        log.warning("batched decoding with the model's own head: %s", e)
    engine = BatchEngine(local.model, local.tokenizer, eos_ids=_eos_ids(local), prepared=prepared)
    tok = local.tokenizer
    requests, rest = [], []
    sampling = Sampling(temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    for i in todo:
        try:
            text, used_chat = provider.build_prompt(prompts[i], params)
        except Exception:  # noqa: BLE001 - the chain reports it for this item
            rest.append(i)
            continue
        guard = getattr(provider, "guard", None)
        try:
            if guard is not None:  # the same context and memory budgets as a single call
                ids = guard.prepare(local.model, tok, text, max_new_tokens=params.max_new_tokens,
                                    add_special_tokens=not used_chat, device=local.device,
                                    name=provider.name).input_ids[0].tolist()
            else:
                ids = tok(text, add_special_tokens=not used_chat)["input_ids"]
        except Exception:  # noqa: BLE001 - refused: the chain gives this item its error
            rest.append(i)
            continue
        if not ids or not engine.fits(len(ids), params.max_new_tokens):
            rest.append(i)  # longer than the sliding window allows in a batch: alone
            continue
        requests.append(BatchRequest(i, ids, params.max_new_tokens, sampling, params.seed,
                                     params.stop, params.timeout))
    if not requests:
        return rest
    if batch_size is None:
        longest = max(len(r.input_ids) for r in requests) + params.max_new_tokens
        batch_size = batch_size_for(local.model.config, longest, device=local.device)
    batch_size = min(batch_size, len(requests))
    out.mode = f"batches of {batch_size}"
    # numerics differ from the model's own in quantized mode: each answer says so, as alone
    notes = ("quantized weights",) if engine.mode == "quantized" else ()
    hub = getattr(session, "resilience", None)
    name = target or provider.name
    breaker = hub.breaker(name) if hub is not None else None
    identity = hub.identity(name, provider) if hub is not None else provider.cache_identity()
    finished: set[int] = set()

    def on_done(o: BatchOutput) -> None:
        i = o.request.tag
        result = GenerationResult(
            text=o.text, prompt=prompts[i], model=provider.name, provider=provider.name,
            prompt_tokens=o.prompt_tokens, completion_tokens=len(o.tokens),
            finish_reason=o.finish_reason, time_to_first_token_s=o.first_token_s,
            total_s=o.total_s, correlation_id=new_id(), notes=list(notes),
        )
        state = None
        if breaker is not None:
            if result.timed_out:
                breaker.record_timeout(o.total_s, f"timed out after {o.total_s:.2f} s")
            else:
                breaker.record_success(o.total_s / max(1, batch_size))
            state = breaker.state.value
        result.attempts = [{"provider": name, "outcome": "timeout" if result.timed_out else "ok",
                            "error": None, "breaker_state": state, "batch_size": batch_size}]
        if hub is not None and not result.timed_out and session.config.offline_cache:
            try:
                hub.offline_cache.put(identity, prompts[i], params, result)
            except OSError:
                pass
        session.audit.write(
            "infer", correlation_id=result.correlation_id, model=name, providers_tried=[name],
            attempts=result.attempts, latency_s=round(o.total_s, 6),
            outcome="timeout" if result.timed_out else "ok", provider=name,
            prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
            finish_reason=result.finish_reason, cached=False, notes=list(notes), batch_size=batch_size,
        )
        session.last_result = result
        session.events.emit("infer", action="end", model=name, result=result,
                            correlation_id=result.correlation_id)
        finished.add(i)
        finish(i, result)

    remaining = requests
    while remaining:
        if breaker is not None:
            try:
                breaker.acquire()
            except BreakerOpenError:
                break  # the chain falls back, item by item
        for r in remaining:
            session.events.emit("infer", action="start", model=name)
        devices = [torch.device(local.device).index or 0] if local.device.startswith("cuda") else []
        recorded = False
        try:
            with torch.random.fork_rng(devices=devices):
                engine.run(remaining, batch_size=batch_size, on_done=on_done, on_step=bar.tokens)
            recorded = True
        except (torch.OutOfMemoryError, ProviderOutOfMemoryError) as e:
            recorded = True
            if breaker is not None:
                breaker.record_error(ProviderOutOfMemoryError(f"{name}: {e}"))
            remaining = [r for r in remaining if r.tag not in finished]
            if batch_size <= 1:
                break
            batch_size = max(1, batch_size // 2)
            out.mode = f"batches of {batch_size} (halved after running out of memory)"
            continue
        except Exception as e:  # noqa: BLE001 - the engine failed: the chain takes the rest
            recorded = True
            if breaker is not None:
                breaker.record_error(e)
            print(f"kernel_ext: batched generation failed ({type(e).__name__}: {e}); the "
                  "remaining items run one at a time", file=sys.stderr)
        finally:
            if not recorded and breaker is not None and not finished:
                breaker.release()  # interrupted before any outcome: give the permit back
        remaining = [r for r in remaining if r.tag not in finished]
        break
    return sorted(rest + [r.tag for r in remaining])


# --- progress -----------------------------------------------------------------------------------------
class _Progress:
    """The cell's bar (tqdm: items, tok/s, ETA) and ``task`` events for the dashboard."""

    def __init__(self, session: Any, name: str, total: int, done: int, *, show: bool) -> None:
        self.session = session
        self.name = name
        self.total = total
        self.done = done
        self.failed = 0
        self.start = time.perf_counter()
        self.first_done = done
        self.made = 0
        self._last_emit = 0.0
        self.bar: Any = None
        if show and total:
            try:
                from tqdm.auto import tqdm
            except ImportError:  # pragma: no cover - tqdm is a dependency
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=done, desc=name, unit="item")
        self._emit(force=True)

    @property
    def tokens_per_s(self) -> float:
        took = time.perf_counter() - self.start
        return self.made / took if took > 0 else 0.0

    @property
    def eta_s(self) -> float | None:
        finished = self.done - self.first_done
        left = self.total - self.done
        if finished <= 0 or left <= 0:
            return None if left > 0 else 0.0
        return (time.perf_counter() - self.start) / finished * left

    def tokens(self, n: int) -> None:
        self.made += n
        self._emit()

    def item(self, *, failed: bool = False) -> None:
        self.done += 1
        self.failed += failed
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(f"{self.tokens_per_s:.1f} tok/s"
                                     + (f", {self.failed} failed" if self.failed else ""),
                                     refresh=False)
        self._emit(force=True)

    def _emit(self, force: bool = False) -> None:
        now = time.perf_counter()
        if not force and now - self._last_emit < 0.5:
            return
        self._last_emit = now
        if self.session is not None:
            self.session.events.emit("task", name=self.name, done=self.done, total=self.total,
                                     tokens_per_s=round(self.tokens_per_s, 2), eta_s=self.eta_s,
                                     failed=self.failed)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


# --- the Python API -----------------------------------------------------------------------------------
def infer_many(session: Any, prompts: Sequence[str] | Any, *, model: str | None = None,
               max_new_tokens: int | None = None, temperature: float | None = None,
               top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
               stop: Sequence[str] | str = (), system: str | None = None,
               chat: bool | None = None, timeout: float | None = None,
               batch_size: int | None = None, concurrency: int | None = None,
               name: str = "infer_many", progress: bool = True) -> OverResults:
    """:func:`kernel_ext.infer_many` with an explicit session; see there."""
    if isinstance(prompts, (str, bytes)):
        raise KernelExtError("infer_many needs a list of prompts, not one string; wrap it: [prompt]")
    prompts = list(prompts.tolist() if hasattr(prompts, "tolist") else prompts)
    bad = next((i for i, p in enumerate(prompts) if not isinstance(p, str)), None)
    if bad is not None:
        raise KernelExtError(f"infer_many: prompt {bad} is a {type(prompts[bad]).__name__}, not "
                             "a string (convert the column first, e.g. df['text'].astype(str))")
    config = session.config
    max_new = int(max_new_tokens if max_new_tokens is not None else config.max_new_tokens)
    temp = float(temperature if temperature is not None else config.temperature)
    checks = [
        (max_new >= 1, f"max_new_tokens must be >= 1, got {max_new}"),
        (temp >= 0, f"temperature must be >= 0 (0 is greedy), got {temp}"),
        (0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p}"),
        (top_k >= 0, f"top_k must be >= 0, got {top_k}"),
        (timeout is None or timeout >= 0, f"timeout must be >= 0 seconds, got {timeout}"),
    ]
    for ok, message in checks:
        if not ok:
            raise KernelExtError(f"infer_many: {message}")
    stops = (stop,) if isinstance(stop, str) else tuple(stop)
    t = timeout if timeout is not None else config.timeout
    params = GenerationParams(max_new_tokens=max_new, temperature=temp, top_p=top_p, top_k=top_k,
                              seed=seed, stop=tuple(s for s in stops if s), system=system,
                              chat=chat, timeout=t or None)
    return run_over(session, prompts, params, model=model, name=name, batch_size=batch_size,
                    concurrency=concurrency, progress=progress)
