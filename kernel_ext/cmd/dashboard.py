"""``%dashboard``: show the live breaker, memory and checkpoint panels.

``%dashboard [--interval SECONDS]`` shows a new dashboard in the cell's output;
``%dashboard close`` stops and closes every live dashboard of this kernel. The ``widgets``
package is imported here, lazily, never by kernel_ext at module level.
"""

from __future__ import annotations

import math
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic_arguments import argument, magic_arguments

from ._args import parse

__all__ = ["run", "usage"]


@magic_arguments("dashboard")
@argument("action", nargs="?", choices=["show", "close"], default="show",
          help="show (default) a new dashboard, or close the live ones")
@argument("--interval", type=float, default=None, metavar="S",
          help="seconds between memory samples (default: KernelExt.dashboard_interval; "
          "0: update on events only)")
def usage() -> None:
    """Live circuit breakers, memory and checkpoints for this kernel."""


def run(ext: Any, magic: str, line: str, cell: str | None = None) -> None:
    args = parse(usage, line)
    try:
        from widgets.dashboard import Dashboard, close_dashboards
    except ImportError as e:
        raise UsageError(
            f"%dashboard needs ipywidgets ({e}); install it with `pip install ipywidgets>=8`"
        ) from e
    session = ext.session
    if args.action == "close":
        n = close_dashboards(session)
        print(f"closed {n} dashboard{'s' if n != 1 else ''}")
        return None
    if args.interval is not None and not (math.isfinite(args.interval) and args.interval >= 0):
        raise UsageError(f"%dashboard: --interval must be >= 0 seconds (a finite number), got "
                         f"{args.interval:g}")
    interval = args.interval if args.interval is not None else session.config.dashboard_interval
    if 0 < interval < 0.1:
        raise UsageError(
            f"%dashboard: --interval {interval:g} s would flood the front end; use 0.1 s or more"
        )
    dash = Dashboard(session, interval=interval)
    shell = ext.shell
    # Formatting calls the dashboard's _repr_mimebundle_, which is what starts it.
    data, metadata = shell.display_formatter.format(dash)
    shell.display_pub.publish(data=data, metadata=metadata)
    return None
