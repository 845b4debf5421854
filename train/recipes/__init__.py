"""One readable file per task. Each recipe exposes ``add_arguments(parser)`` and ``run(args)``."""
