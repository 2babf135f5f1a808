"""One module per ``avatar-kernels`` subcommand: ``add_arguments(parser)`` and ``run(args)``."""
