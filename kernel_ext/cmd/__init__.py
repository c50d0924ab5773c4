"""One module per magic: each exposes ``run(ext, line, cell=None)``.

``ext`` is the :class:`kernel_ext.magics.KernelExt` instance (``ext.session`` is the Session,
``ext.shell`` the IPython shell). Modules parse with :class:`kernel_ext.cmd._args.MagicParser`
and raise ``UsageError`` for user mistakes.
"""
