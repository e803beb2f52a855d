"""Progress bars that suit both a terminal and a log file.

On a terminal: tqdm as usual. Otherwise (``make demo > log``, a SLURM job's output) tqdm's
carriage-return redraws would pile up into one endless line; there the bar writes one plain
line at most every 30 s, and a last one when it closes. ``LIFT3D_PROGRESS=lines`` asks for the
plain lines on a terminal too (processes that share one, like the verdict's workers);
``TQDM_DISABLE=1`` silences the bars.
"""

from __future__ import annotations

import os
import sys

from tqdm import tqdm

LOG_INTERVAL = 30.0  # seconds between lines when stderr is not a terminal


class _Lines:
    """A file-like object for tqdm that turns each redraw into one line."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, s: str) -> None:
        s = s.replace("\r", "").strip()
        if s:
            self.stream.write(s + "\n")

    def flush(self) -> None:
        self.stream.flush()


def bar(total: int, desc: str, unit: str, mininterval: float = 0.5, **kw) -> tqdm:
    stream = sys.stderr
    if os.environ.get("TQDM_DISABLE", "").lower() in ("1", "true"):
        kw["disable"] = True  # explicit, since a caller's own disable= would override tqdm's env default
    if stream.isatty() and os.environ.get("LIFT3D_PROGRESS") != "lines":
        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True, mininterval=mininterval, **kw)
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        file=_Lines(stream),
        ncols=100,
        mininterval=LOG_INTERVAL,
        maxinterval=LOG_INTERVAL,
        **kw,
    )
