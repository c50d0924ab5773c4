"""kernel_ext: run local GGUF LLMs in Jupyter without losing work.

``%load_ext kernel_ext`` registers the magics (``%%infer``, ``%model``, ``%checkpoint``,
``%resume``, ``%breaker``, ``%audit``, ``%dashboard``) and the checkpoint hook.
"""

from __future__ import annotations

from typing import Any

from .errors import KernelExtError

__all__ = ["KernelExtError", "load_ipython_extension", "unload_ipython_extension", "task",
           "infer_many", "current_session", "__version__"]

__version__ = "0.1.0"

_ext: Any = None  # the KernelExt magics instance of the loaded extension


def current_session() -> Any:
    """The Session of the loaded extension (``None`` before ``%load_ext kernel_ext``)."""
    return _ext.session if _ext is not None else None


def task(name: str, items: Any, **kwargs: Any) -> Any:
    """A resumable loop: ``for item in kernel_ext.task("name", items): ...``.

    See :func:`kernel_ext.checkpoint.tasks.task`.
    """
    from .checkpoint.tasks import task as _task

    return _task(name, items, session=current_session(), **kwargs)


def infer_many(prompts: Any, **options: Any) -> Any:
    """Answer each prompt (a list, or a pandas Series) with the loaded model, in order:
    ``df["answer"] = kernel_ext.infer_many(df["text"].tolist(), max_new_tokens=32)``.

    Same chain, batching, progress and resumability as ``%%infer --over``; options are the
    magic's (``model``, ``max_new_tokens``, ``temperature``, ``top_p``, ``top_k``, ``seed``,
    ``stop``, ``system``, ``chat``, ``timeout``, ``batch_size``, ``concurrency``) plus ``name``
    (the resumable task's name) and ``progress``. See :func:`kernel_ext.over.run_over`.
    """
    from .over import infer_many as _infer_many

    session = current_session()
    if session is None:
        raise KernelExtError("infer_many needs the extension: run `%load_ext kernel_ext` and "
                             "`%model load` first")
    return _infer_many(session, prompts, **options)


# What an unloaded extension leaves to the next load in the same kernel (models, settings,
# checkpoint choices), kept on the shell: %reload_ext re-imports this module.
_HANDOVER = "_kernel_ext_handover"


def load_ipython_extension(ip: Any) -> None:
    global _ext
    if _ext is not None:
        if _ext.shell is ip:
            return  # already loaded in this shell
        unload_ipython_extension(_ext.shell)  # one kernel_ext per process
    from . import checkpoint, resilience
    from .magics import KernelExt

    handover = ip.__dict__.pop(_HANDOVER, None)
    ext = KernelExt(shell=ip, parent=ip)
    kept: list[str] = []
    try:
        if handover is not None:
            kept += ext.session.adopt(handover)
        resilience.attach(ext.session)
        if handover is not None:
            kept += ext.session.adopt_resilience(handover)
        checkpoint.attach(ext.session, handover["checkpoints"] if handover else None)
    except Exception:
        if handover is not None:
            handover["models"] = ext.session.handover()["models"]
            ip.__dict__[_HANDOVER] = handover  # a retried %load_ext still finds the models
        ext.session.close()
        while ext in ip.configurables:
            ip.configurables.remove(ext)
        raise
    # Registered last: a failure above leaves nothing half-loaded, and %load_ext can be retried.
    ip.register_magics(ext)  # Magics.__init__ already put it in ip.configurables (%config)
    _ext = ext
    if handover is not None:
        manager = ext.session.checkpoints
        if manager is not None and manager.writer:
            kept.append(f"checkpoints go on ({manager.location})")
        print(f"kernel_ext: loaded again in the same kernel: {'; '.join(kept) or 'nothing kept'}")


def unload_ipython_extension(ip: Any) -> None:
    global _ext
    ext = _ext
    if ext is None:
        return
    _ext = None
    handover = ext.session.handover()
    ext.session.close()  # saves what is pending, gives the checkpoint lease back
    ip.__dict__[_HANDOVER] = handover
    models = handover["models"].names()
    if models:
        print(f"kernel_ext unloaded; model(s) {', '.join(models)} stay in memory for the next "
              "%load_ext kernel_ext in this kernel (to free them: %model unload NAME before "
              "%unload_ext)")
    while ext in ip.configurables:
        ip.configurables.remove(ext)
    ip.magics_manager.registry.pop(type(ext).__name__, None)
    magics = ip.magics_manager.magics
    for kind, names in ext.magics.items():
        for name in names:
            if magics[kind].get(name) is not None:
                del magics[kind][name]
