"""``%breaker``, ``%audit``, and ``%model fallback`` / ``%model remote`` (routed here)."""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from ..audit import metrics
from ..errors import ModelNotFoundError
from ._args import dispatch, parse

__all__ = ["audit_usage", "breaker_usage", "fallback", "remote", "run"]


def breaker_usage() -> None:
    """The circuit breakers of the providers (loaded models, remote servers).

    ::

      %breaker [list]              state, calls and failures in the window, failure rate,
                                   time to the next trial, trips, rejected calls, last error
      %breaker reset NAME|all      close a breaker (its window emptied)
      %breaker open NAME|all       force a breaker open: calls go to the fallbacks
    """


def _hub(ext: Any) -> Any:
    return ext.session.resilience  # attached by load_ipython_extension


def run(ext: Any, magic: str, line: str, cell: str | None = None) -> Any:
    if magic == "breaker":
        return _breaker(ext, line)
    if magic == "audit":
        return _audit(ext, line)
    raise UsageError(f"kernel_ext.cmd.resilience does not implement %{magic}")


# --- %breaker ----------------------------------------------------------------------------------
def _fmt_s(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _breaker(ext: Any, line: str) -> None:
    hub = _hub(ext)

    def listing(args: list[str]) -> None:
        if args:
            raise UsageError("%breaker list takes no arguments")
        names = list(dict.fromkeys([*hub.known_names(), *hub.breakers]))
        if not names:
            print("no providers yet: %model load a model or %model remote NAME --url ...")
            return
        print(
            f"{'provider':<20} {'state':<11} {'window':>8} {'rate':>6} {'consec':>6} "
            f"{'retry in':>8} {'trips':>5} {'reject':>6}  last error"
        )
        for name in names:
            s = hub.breaker(name).snapshot()
            err = (s.last_error or "")[:90]
            print(
                f"{name:<20} {s.state:<11} {s.failures_in_window:>3}/{s.calls_in_window:<4} "
                f"{s.failure_rate:>6.0%} {s.consecutive_failures:>6} {_fmt_s(s.retry_in):>8} "
                f"{s.trip_count:>5} {s.rejected_calls:>6}  {err}"
            )
        if hub.fallbacks:
            print(f"fallbacks: {' -> '.join(hub.fallbacks)} -> offline cache")

    def target(args: list[str], verb: str) -> list[str]:
        if len(args) != 1:
            raise UsageError(f"usage: %breaker {verb} NAME  (or: %breaker {verb} all)")
        if args[0] == "all":
            return list(hub.breakers)
        known = set(hub.known_names()) | set(hub.breakers)
        if args[0] not in known:
            raise UsageError(
                f"%breaker {verb}: no provider {args[0]!r}; known: "
                f"{', '.join(sorted(known)) or 'none'}"
            )
        return [args[0]]

    def reset(args: list[str]) -> None:
        for name in target(args, "reset"):
            hub.breaker(name).reset()
            print(f"breaker {name}: closed")

    def force_open(args: list[str]) -> None:
        for name in target(args, "open"):
            hub.breaker(name).force_open()
            print(
                f"breaker {name}: forced open (calls go to the fallbacks until "
                f"%breaker reset {name})"
            )

    dispatch(
        "%breaker", line, {"list": listing, "reset": reset, "open": force_open}, default="list",
        usage=breaker_usage.__doc__,
    )


# --- %audit ------------------------------------------------------------------------------------
@magic_arguments("audit")
@argument("--tail", type=int, default=20, metavar="N",
          help="show the last N records (default 20; 0: all)")
@argument("--kind", default=None, metavar="K",
          help="only records whose kind starts with K (infer, breaker, model, checkpoint)")
@argument("--metrics", action="store_true",
          help="load time, latency percentiles, breaker trip rate")
@argument("--json", action="store_true", help="print the raw JSON lines")
def audit_usage() -> None:
    """Show the audit log (JSON lines in <state_dir>/audit.jsonl)."""


def _summary(rec: dict[str, Any]) -> str:
    kind = rec.get("kind", "")
    if kind == "infer":
        tried = ">".join(rec.get("providers_tried") or [])
        tokens = rec.get("completion_tokens")
        extra = f" {tokens} tok" if tokens is not None else ""
        err = ""
        if rec.get("outcome") == "failed":
            err = " " + " ".join(str(rec.get("error", "")).split())[:100]
        return (
            f"{rec.get('correlation_id', '')} {rec.get('outcome', '?')} via "
            f"{rec.get('provider') or '-'} [{tried}] {rec.get('latency_s', 0):.2f}s{extra}{err}"
        )
    if kind == "breaker":
        trips = rec.get("trip_count")
        return f"{rec.get('name')}: {rec.get('old')} -> {rec.get('new')} (trips {trips})"
    skip = {"ts", "kind"}
    parts = []
    for k, v in rec.items():
        if k in skip:
            continue
        text = v if isinstance(v, str) else json.dumps(v, default=str)
        parts.append(f"{k}={text[:40]}")
    return " ".join(parts)[:120]


def _audit(ext: Any, line: str) -> None:
    ns = parse(audit_usage, line)
    if ns.tail < 0:
        raise UsageError("%audit --tail must be >= 0")
    log = ext.session.audit
    if ns.metrics:
        m = metrics(log.read())
        for key, value in m.items():
            if isinstance(value, float):
                value = f"{value:.3f}"
            print(f"{key:<34} {value}")
        return
    records = log.read(kind=ns.kind, tail=ns.tail or None)
    if not records:
        print(f"no audit records{' of kind ' + ns.kind if ns.kind else ''} in {log.path}")
        return
    for rec in records:
        if ns.json:
            print(json.dumps(rec, default=str))
            continue
        ts = _dt.datetime.fromtimestamp(float(rec.get("ts", 0))).strftime("%H:%M:%S")
        print(f"{ts} {rec.get('kind', ''):<18} {_summary(rec)}")


# --- %model fallback / %model remote -----------------------------------------------------------
def fallback(ext: Any, args: list[str]) -> None:
    """``%model fallback NAME [NAME ...]`` sets the list; none shows it; ``--clear`` empties it."""
    hub = _hub(ext)
    if not args:
        chain = " -> ".join(hub.fallbacks) if hub.fallbacks else "(none)"
        print(f"fallbacks: {chain} -> offline cache")
        return
    if args == ["--clear"] or args == ["none"]:
        hub.fallbacks = []
        print("fallbacks cleared (the offline cache still answers when every provider fails)")
        return
    if any(a.startswith("-") for a in args):
        raise UsageError("usage: %model fallback NAME [NAME ...]  |  %model fallback --clear")
    known = hub.known_names()
    unknown = [a for a in args if a not in known]
    if unknown:
        raise ModelNotFoundError(
            f"unknown fallback {', '.join(unknown)} (known: {', '.join(known) or 'none'}); "
            "load it with %model load PATH --name NAME or register a server with "
            "%model remote NAME --url URL first"
        )
    hub.fallbacks = list(dict.fromkeys(args))
    print(f"fallbacks: {' -> '.join(hub.fallbacks)} -> offline cache")


@magic_arguments("model remote")
@argument("name", help="provider name (use it with %%%%infer --model and %%model fallback)")
@argument("--url", help="base URL ending in /v1, e.g. http://127.0.0.1:8080/v1")
@argument("--model", default=None, help="model name the server expects (optional)")
@argument("--chat", action="store_true", help="use /v1/chat/completions")
@argument("--api-key-env", default=None, metavar="VAR",
          help="environment variable holding an API key")
@argument("--timeout", type=float, default=120.0, metavar="S",
          help="read timeout in seconds (default 120)")
@argument("--remove", action="store_true", help="unregister NAME")
def _remote_usage() -> None:
    """Register an OpenAI-compatible server as a provider."""


def remote(ext: Any, args: list[str]) -> None:
    """``%model remote NAME --url URL [--model M] [--chat] [--api-key-env VAR]``."""
    from ..providers.remote import RemoteProvider

    hub = _hub(ext)
    ns = parse(_remote_usage, args)
    if ns.remove:
        if ns.name not in hub.extra_providers:
            raise UsageError(f"%model remote: no remote provider {ns.name!r}")
        hub.remove_provider(ns.name)
        if ns.name in hub.fallbacks:
            hub.fallbacks = [n for n in hub.fallbacks if n != ns.name]
        print(f"removed remote provider {ns.name}")
        return
    if not ns.url:
        raise UsageError("usage: %model remote NAME --url http://HOST:PORT/v1 [--model M] [--chat]")
    if ns.name in ext.session.models.names():
        raise UsageError(
            f"%model remote: {ns.name!r} is already a loaded model's name; pick another"
        )
    api_key = None
    if ns.api_key_env:
        api_key = os.environ.get(ns.api_key_env)
        if not api_key:
            raise UsageError(f"%model remote: environment variable {ns.api_key_env} is not set")
    if not (math.isfinite(ns.timeout) and 0 < ns.timeout <= 86400):
        raise UsageError(f"%model remote: --timeout must be a finite number of seconds in "
                         f"(0, 86400], got {ns.timeout}")
    try:
        provider = RemoteProvider(
            ns.name,
            ns.url,
            model=ns.model,
            chat=ns.chat,
            api_key=api_key,
            api_key_env=ns.api_key_env,
            read_timeout=ns.timeout,
        )
    except ValueError as e:
        raise UsageError(f"%model remote: {e}") from e
    hub.add_provider(ns.name, provider)
    health = provider.health()
    state = "reachable" if health.ok else f"NOT reachable now ({health.detail})"
    print(
        f"registered remote provider {ns.name} -> {provider.base_url} "
        f"({'chat' if ns.chat else 'completions'}); {state}"
    )
