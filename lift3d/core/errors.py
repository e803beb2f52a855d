"""One base class for every error lift3d reports to a user.

The command line prints a ``Lift3dError`` as one line (its message names the file or key and
what is wrong); anything else is a bug and keeps its traceback. Each stage has its subclass;
they also derive from the built-in class they replaced (ValueError, RuntimeError), so code
that catches those keeps working.
"""

from __future__ import annotations


class Lift3dError(Exception):
    """A problem with an input, a setting or the disk; the message says which and why."""


class ConfigError(Lift3dError, ValueError):
    """A configuration value is wrong; the message names the key and what is expected."""


class StoreError(Lift3dError, RuntimeError):
    """A store or run folder is missing, incomplete, locked or not writable."""


class ReaderError(Lift3dError, RuntimeError):
    """A dataset file is missing or broken; the message names the file and the problem."""


class TaskError(Lift3dError, RuntimeError):
    """A per-scene task failed on a worker."""


class CheckpointError(Lift3dError, ValueError):
    """A checkpoint or weights file cannot be read safely or does not fit."""


class TeacherError(Lift3dError, ValueError):
    """A 2D teacher cannot be built or its weights do not fit."""


class FinetuneError(Lift3dError, RuntimeError):
    """A fine-tuning input (checkpoint, label file, configuration) is unusable."""


class DistillError(Lift3dError, ValueError):
    """A 3D-to-2D distillation input is unusable."""


class ExportError(Lift3dError, ValueError):
    """A network cannot be exported in the asked format."""


class SweepError(Lift3dError, ValueError):
    """A sweep grid is malformed."""


class Fit2dError(Lift3dError, ValueError):
    """A fit2d input (corpus, labels, settings) is unusable."""
