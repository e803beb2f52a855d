"""Set-up of a verdict worker process, in a module that imports nothing heavy: a spawned
worker unpickles :func:`init_worker` by importing this module, and MinkowskiEngine reads
OMP_NUM_THREADS once, when it is first imported, so the variable must be set before torch
and MinkowskiEngine load (the stage modules import both)."""

from __future__ import annotations

import os


def init_worker(threads: int) -> None:
    """Pinned threads, and progress as plain lines (two redrawn bars would garble a shared terminal)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["LIFT3D_PROGRESS"] = "lines"
    import torch  # after OMP_NUM_THREADS, on purpose

    torch.set_num_threads(threads)
