"""``vlq`` command line: parse, validate (before any heavy import), call :mod:`vlq.pipeline`, print.

``vlq.cli:main`` is the console entry point; ``python -m vlq.cli`` runs it too (:mod:`vlq.cli.__main__`).
"""

from .parser import EXIT_CHECK_FAILED, EXIT_INTERNAL, EXIT_OK, EXIT_REFUSED, build_parser, main

__all__ = ["EXIT_CHECK_FAILED", "EXIT_INTERNAL", "EXIT_OK", "EXIT_REFUSED", "build_parser", "main"]
