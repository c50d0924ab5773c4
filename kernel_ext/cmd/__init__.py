"""One module per magic: each exposes ``run(ext, line, cell=None)``.

``ext`` is the :class:`kernel_ext.magics.KernelExt` instance (``ext.session`` is the Session,
``ext.shell`` the IPython shell). Modules declare their options with IPython's
``magic_arguments`` decorators, parse with :func:`kernel_ext.cmd._args.parse`, route subcommands
with :func:`kernel_ext.cmd._args.dispatch`, and raise ``UsageError`` for user mistakes.
"""
