"""``%model load|list|info|unload|health|warm|fallback|remote|cache|answers``."""

from __future__ import annotations

import importlib
import time
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from ..config import DEVICE_RE, DTYPES
from ..memory import format_bytes
from ._args import dispatch, parse

__all__ = ["run", "usage"]


def usage() -> None:
    """Load and manage models and the providers %%infer uses.

    ::

      %model load [PATH|NAME] [--name N] [--dtype D] [--device D] [--sha256 H] [--signature F]
      %model list                        every provider: memory, health, breaker state
      %model health [NAME]               probe providers (one token), feed their breakers
      %model warm [NAME|PATH]            load, page in and run a first forward pass
      %model info [NAME]                 parameters, quant types, SHA-256, memory, plan, decoding
      %model unload NAME                 free the model's memory
      %model fallback [NAME ...|--clear] the providers tried after the primary
      %model remote NAME --url URL ...   an OpenAI-compatible server as a provider
      %model cache [list|clear [SHA256]] the conversion cache (converted GGUF files)
      %model answers [list|clear [NAME]] the offline answer cache (answers kept on disk)

    %model SUBCOMMAND --help shows a subcommand's options.
    """


@magic_arguments("model load")
@argument("target", nargs="?", default=None, metavar="PATH|NAME",
          help="path of a .gguf file or a known model name (default: the default model)")
@argument("--name", help="name to register it under (default: from the file name)")
@argument("--dtype", choices=DTYPES, help="weights dtype (default: %%config KernelExt.dtype)")
@argument("--device", help="auto, cpu, cuda or cuda:N (default: %%config KernelExt.device)")
@argument("--sha256", help="expected SHA-256 of the file; a mismatch refuses the load")
@argument("--signature", metavar="FILE",
          help="model-signing signature of the file (default: FILE.gguf.sig if present), "
          "verified offline against %%config KernelExt.signature_trusted_keys (keys, certificates) "
          "or signature_identities (keyless Sigstore signatures)")
@argument("--no-progress", action="store_true", help="no progress bar")
def _load_usage() -> None:
    """Validate, hash-check, size and load a GGUF model (no argument: the default model)."""


def _load(ext: Any, args: list[str]) -> None:
    ns = parse(_load_usage, args)
    if ns.device is not None and not DEVICE_RE.match(ns.device):
        raise UsageError(f"%model load: --device must be auto, cpu, cuda or cuda:N, not {ns.device!r}")
    entry = ext.session.models.load(ns.target, name=ns.name, dtype=ns.dtype, device=ns.device,
                                    sha256=ns.sha256, progress=not ns.no_progress,
                                    signature=ns.signature)
    print(f"loaded {entry.name}: {entry.summary.get('architecture')}, "
          f"{entry.summary.get('n_params', 0):,} parameters on {entry.plan.describe()} "
          f"in {entry.load_s:.1f} s")
    for note in entry.notes:
        print(f"  note: {note}")


def _list(ext: Any, args: list[str]) -> None:
    if args:
        raise UsageError("%model list takes no arguments")
    session = ext.session
    models = session.models
    hub = session.resilience
    remotes = dict(hub.extra_providers) if hub is not None else {}
    if not models.names() and not remotes:
        print("no model loaded; %model load loads the default model")
        return
    print(f"  {'name':<24} {'kind':<7} {'where':<17} {'memory':>10}  {'health':<10} "
          f"{'breaker':<11} source")
    for e in models.entries():
        mark = "*" if e.name == models.active else " "
        m = models.memory(e.name)
        size = format_bytes(m["total"]) if m["resident"] else "evicted"
        shared = f"  (shares weights with {', '.join(m['shared_with'])})" if m["shared_with"] else ""
        print(f"{mark} {e.name:<24} {'local':<7} {e.plan.device + ' ' + e.plan.dtype:<17} "
              f"{size:>10}  {_health(session, e.name):<10} "
              f"{_breaker_state(hub, e.name):<11} {e.path}{shared}")
    for name, p in remotes.items():
        print(f"  {name:<24} {'remote':<7} {'server':<17} {'-':>10}  {_health(session, name):<10} "
              f"{_breaker_state(hub, name):<11} {getattr(p, 'base_url', '?')}")
    cap = session.config.resident_max_gb
    print(f"  resident models: {format_bytes(models.residency.total())} measured (weights, "
          "runtime copies, tokenizers)" + (f"; cap {cap:g} GB (resident_max_gb)" if cap else ""))
    if any(n not in session.health for n in [*models.names(), *remotes]):
        print("health: %model health probes every provider")


def _health(session: Any, name: str) -> str:
    r = session.health.get(name)
    if r is None:
        return "unchecked"
    age = time.time() - r.checked_at
    return f"{'ok' if r.ok else 'FAILING'} {age:.0f}s" if age < 3600 else ("ok" if r.ok else "FAILING")


def _breaker_state(hub: Any, name: str) -> str:
    if hub is None or name not in hub.breakers:
        return "closed" if hub is not None else "-"
    return str(hub.breakers[name].state.value)


def _probe(ext: Any, args: list[str]) -> None:
    from ..health import probe, probe_all

    if len(args) > 1:
        raise UsageError("usage: %model health [NAME]  (no NAME: every provider)")
    session = ext.session
    results = [probe(session, args[0])] if args else probe_all(session)
    if not results:
        print("no providers yet: %model load a model or %model remote NAME --url ...")
    for r in results:
        print(f"{r.name:<24} {'ok' if r.ok else 'FAILING':<8} {r.latency_s:>7.2f} s  "
              f"breaker {r.breaker or '-':<10} {r.detail}")


def _warm(ext: Any, args: list[str]) -> None:
    from ..health import warm

    if len(args) > 1:
        raise UsageError("usage: %model warm [NAME|PATH]  (no argument: the default model)")
    name, done = warm(ext.session, args[0] if args else None)
    print(f"{name} is warm: " + "; ".join(done))


def _info(ext: Any, args: list[str]) -> None:
    if len(args) > 1:
        raise UsageError("usage: %model info [NAME]")
    models = ext.session.models
    entry = models.get(args[0] if args else None)
    print(models.describe(entry))
    decoding = _decoding(entry)
    if decoding:
        print(f"  decoding  {decoding}")


def _decoding(entry: Any) -> str | None:
    """How a local model decodes now (mode, copies, fused step or why not), once prepared."""
    provider = getattr(entry, "provider", None)
    local = getattr(provider, "local", None)
    mode = getattr(provider, "decode_mode", None)
    if local is None or mode is None:
        return None
    from ..providers.decode import describe

    return describe(local.model, mode() if callable(mode) else mode)


def _unload(ext: Any, args: list[str]) -> None:
    if len(args) != 1:
        raise UsageError("usage: %model unload NAME  (see %model list)")
    entry = ext.session.models.unload(args[0])
    kept = "" if entry.freed else " (its weights stay: shared with another name, or evicted)"
    print(f"unloaded {entry.name}; freed {format_bytes(entry.freed)}{kept}")


def _resilience(name: str) -> Any:
    def handler(ext: Any, args: list[str]) -> Any:
        module = importlib.import_module("kernel_ext.cmd.resilience")
        return getattr(module, name)(ext, args)

    return handler


def _cache(ext: Any, args: list[str]) -> None:
    from ..gguf import cache

    root = ext.session.cache_dir / "conversions"
    ext.session.models.wait_idle()  # a load's cache writes finish first (never cleared halfway)
    if args == ["list"] or not args:
        entries = cache.list_entries(root)
        if not entries:
            print(f"conversion cache {root} is empty")
        for e in entries:
            weights = ", ".join(e.weights) or "no weights"
            print(f"{e.sha256[:16]}…  {format_bytes(e.size_bytes):>10}  {weights:<18} "
                  f"{e.source or '?'}  (last used {time.strftime('%Y-%m-%d %H:%M', time.localtime(e.last_used))})")
    elif args[0] == "clear" and len(args) <= 2:
        cache.clear(root, *(args[1:2]))
        print(f"cleared the conversion cache {root}" + (f" for {args[1]}" if len(args) == 2 else ""))
    else:
        raise UsageError("usage: %model cache list | %model cache clear [SHA256]  (the "
                         "conversion cache; the offline answer cache is %model answers)")


def _answers(ext: Any, args: list[str]) -> None:
    """``%model answers [list] | clear [NAME]``: the offline answer cache."""
    hub = ext.session.resilience
    cache = hub.offline_cache
    cap = format_bytes(cache.max_bytes) if cache.max_bytes else "no cap"
    names = {ident: name for name, ident in hub.identities.items()}
    if args in ([], ["list"]):
        entries = cache.entries()
        if not entries:
            print(f"the offline answer cache {cache.root} is empty (cap {cap})")
            return
        total = sum(e.size_bytes for e in entries)
        print(f"{len(entries)} answer(s), {format_bytes(total)} of {cap} in {cache.root} "
              "(most recently used first):")
        for e in entries:
            who = names.get(e.identity) or e.model or e.identity
            used = time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))
            prompt = " ".join(e.prompt.split())
            prompt = prompt if len(prompt) <= 48 else prompt[:47] + "…"
            print(f"  {e.key[:12]}  {who:<16} {format_bytes(e.size_bytes):>9}  used {used}  "
                  f"{prompt!r} -> {len(e.text)} chars")
        return
    if args and args[0] == "clear" and len(args) <= 2:
        if len(args) == 1:
            n = cache.clear()
            print(f"cleared the offline answer cache: {n} answer(s) removed")
            return
        name = args[1]
        identity = hub.identities.get(name)
        if identity is None:
            known = ", ".join(sorted(hub.identities)) or "none"
            raise UsageError(f"%model answers clear: no answers were kept for {name!r} "
                             f"(names with answers: {known})")
        n = cache.clear(identity)
        print(f"removed {n} answer(s) of {name} from the offline answer cache")
        return
    raise UsageError("usage: %model answers [list] | %model answers clear [NAME]")


_TABLE = {
    "load": _load,
    "list": _list,
    "health": _probe,
    "warm": _warm,
    "info": _info,
    "unload": _unload,
    "fallback": _resilience("fallback"),
    "remote": _resilience("remote"),
    "cache": _cache,
    "answers": _answers,
}


def run(ext: Any, magic: str, line: str, cell: str | None = None) -> Any:
    table = {k: (lambda args, f=f: f(ext, args)) for k, f in _TABLE.items()}
    return dispatch("%model", line, table, default="list", usage=usage.__doc__)
