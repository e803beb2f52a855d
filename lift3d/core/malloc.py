"""glibc malloc settings for lift3d's processes, and the re-execution that applies them.

glibc serves allocations above its mmap threshold (128 KiB at start, raised on the fly) with
fresh mmap'ed pages and trims freed heap memory above 128 KiB, so a frame buffer or a conv
layer's activations can page-fault in anew at every call; on a virtual machine page faults
are expensive. Measured on this project's 2-core machine, one thread, one pinned vCPU, four
alternated runs each: the EfficientNet-Lite0 teacher at 240x320, batch 8, ran 28-29 frames/s
by default and 47-50 with the settings below; a dask worker zstd-encoded a frame in 1.16 vs
0.69 ms (the nanny's own MALLOC_TRIM_THRESHOLD_ made it worse); MinkowskiEngine fine-tuning
was unchanged (1.76 vs 1.71 s per step). Allocations under 256 MiB come from the heap, and
up to 1 GiB of freed heap is kept for reuse.

glibc reads these variables only when a process starts, so the console script re-executes
itself once with them (same process id, same arguments) unless they are set already or
``LIFT3D_MALLOC=default`` asks for glibc's defaults. Dask LocalCluster workers get them
through the nanny (:func:`lift3d.core.cluster.dask_client`).
"""

from __future__ import annotations

import os
import sys

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": 256 << 20, "MALLOC_TRIM_THRESHOLD_": 1 << 30}


def tuned_env(environ) -> dict | None:
    """The environment to re-execute with, or None when nothing needs to change."""
    if not sys.platform.startswith("linux") or environ.get("LIFT3D_MALLOC") == "default":
        return None
    missing = {k: str(v) for k, v in MALLOC_ENV.items() if k not in environ}
    return {**environ, **missing} if missing else None


def reexec_tuned() -> None:
    """Re-execute this process with the settings when they are missing: exactly the command
    line it was started with (``sys.orig_argv``: interpreter flags such as torchrun's ``-u``,
    ``-m lift3d.cli`` or the console script, and the arguments), same process id. The new
    process finds the settings set and carries on. A failed exec leaves glibc's defaults."""
    env = tuned_env(os.environ)
    if env is not None:
        try:
            os.execve(sys.executable, list(sys.orig_argv), env)
        except OSError:  # cannot re-execute (unusual): run with glibc's defaults
            pass


# the benchmarks call this first, so they measure what the lift3d command runs with
tune_script = reexec_tuned
