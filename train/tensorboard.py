"""TensorBoard scalars for a run, when ``torch.utils.tensorboard`` imports; metrics.csv stays the record."""

from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("lift3d")


class TensorBoard:
    """Scalars to ``<run dir>/tb/`` when ``torch.utils.tensorboard`` imports; otherwise off,
    said once in the log. ``purge_step`` hides the events a killed run logged after its last
    checkpoint."""

    def __init__(self, d: Path, start: int, enabled: bool, stage: str = "pretrain"):
        self.stage = stage
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            log.info(
                "%s: TensorBoard logging is off: the 'tensorboard' package is not installed "
                "(%s); metrics.csv has every value",
                stage,
                exc,
            )
            return
        self.writer = SummaryWriter(log_dir=str(d / "tb"), purge_step=start if start > 0 else None)
        log.info("%s: TensorBoard scalars in %s", stage, d / "tb")

    def add(self, row: dict) -> None:
        if self.writer is not None:
            for key in ("loss", "lr"):
                self.writer.add_scalar(f"{self.stage}/{key}", float(row[key]), int(row["step"]))

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
