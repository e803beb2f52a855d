"""The ``lift3d`` console script: glibc malloc settings (:mod:`lift3d.core.malloc`), then the
command line. The command line is imported only after the re-execution, so that nothing is
loaded twice."""

from __future__ import annotations

import sys

from lift3d.core.malloc import MALLOC_ENV, reexec_tuned, tune_script, tuned_env

__all__ = ["entry", "MALLOC_ENV", "reexec_tuned", "tune_script", "tuned_env"]


def entry() -> None:
    """The console script: the malloc settings, then the CLI."""
    reexec_tuned()
    from lift3d.cli import main  # after the re-exec, on purpose

    sys.exit(main(prog_name="lift3d"))
