"""The run folder: the one protocol every trainer (pretrain, finetune, distill2d) follows.

A run lives in ``<workdir>/runs/<stage>/<name>/``. Its name ends in 10 hex digits of the run's
identity (the settings that change what is learned), so two configurations never share a
folder. The folder holds:

- ``run.json``: the configuration, ``identity_sha256``, ``upstream`` (what the run was made
  from: cache lineages, a checkpoint's hash), ``step`` / ``steps`` and ``complete``;
- ``checkpoint.pt``: the latest state (weights, optimiser, step and every random generator),
  written atomically every ``checkpoint_every`` steps;
- ``metrics.csv``: one row per step, up to the checkpoint after a kill;
- the results: ``model.pt``, ``loss.png`` and what the trainer adds (``eval.json``).

The protocol: one process per run (a lock); a complete run of the same identity and upstream
is left as it is; a run of another identity or upstream is removed and started over; a killed
run resumes from its checkpoint and ends with the same weights as an uninterrupted one
(on the CPU); every file is written to a temporary name and renamed, so a kill never leaves a
half-written file, and a failed write (disk full, no permission) is one error naming the file.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from lift3d.core import checkpoint as ckpt
from lift3d.core.store import stage_lock, writing

log = logging.getLogger("lift3d")

RESUME = "the last checkpoint is kept: the re-run resumes from it"


# ----------------------------------------------------------------------------- files


def read_json(path: Path):
    """The JSON in ``path``, or None when it is missing or unreadable."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)``, then rename over ``path``. A failed write is one StoreError naming ``path``;
    torch.save reports it as a RuntimeError whose context is the OSError (when it writes through
    a Python file object), so that one is unwrapped."""
    tmp = path.with_name(path.name + ".tmp")
    with writing(path, "write", RESUME):
        try:
            write(tmp)
        except RuntimeError as exc:
            if not isinstance(exc.__context__, OSError):
                raise
            tmp.unlink(missing_ok=True)
            raise exc.__context__ from None
        os.replace(tmp, path)


def torch_save(obj, path: Path) -> None:
    with open(path, "wb") as fh:  # a Python file object: its OSError reaches write_atomic
        torch.save(obj, fh)


def save_torch(path: Path, obj) -> None:
    write_atomic(path, lambda t: torch_save(obj, t))


def save_json(path: Path, obj) -> None:
    write_atomic(path, lambda t: t.write_text(json.dumps(obj, indent=1, sort_keys=True)))


def read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_csv(path: Path, rows: list[dict], fields: list[str]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def plot_loss(rows: list[dict], path: Path, title: str) -> None:
    """``loss.png``: the loss per step and its running mean of 10."""
    import matplotlib  # optional-weight import: only runs that finish draw a plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = [int(r["step"]) for r in rows]
    loss = np.array([float(r["loss"]) for r in rows])
    ax.plot(steps, loss, lw=0.8, alpha=0.5, label="loss")
    if len(loss) >= 10:
        k = 10
        smooth = np.convolve(loss, np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1 :], smooth, lw=1.5, label="mean of 10")
    if rows and all(r.get("floor") for r in rows):  # pretraining: chance level or the targets' entropy
        ax.plot(steps, [float(r["floor"]) for r in rows], lw=1.0, ls="--", color="k", label="floor")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda t: fig.savefig(t, dpi=100, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------- status


def run_status(
    d: Path, where: str, reasons: list[str], upstream: tuple | None = None
) -> tuple[str, list[str], dict | None]:
    """The state of run folder ``d`` (shown as ``where``) from its ``run.json``: ``missing``
    (never run), ``out of date`` (incomplete; made from other inputs than ``upstream`` = (the
    expected ``run.json`` "upstream", why not); or anything in ``reasons``), else ``done`` with
    no reasons. Returns (state, reasons, the run.json or None)."""
    info = read_json(d / "run.json")
    if info is None:
        return ("missing" if not d.exists() else "out of date"), reasons + [f"{where} has not been run"], None
    if not info.get("complete"):
        phase = f"{info['phase']} " if info.get("phase") else ""
        return "out of date", reasons + [f"{where} is incomplete ({phase}step {info.get('step', '?')})"], info
    if upstream is not None and info.get("upstream") != upstream[0]:
        return "out of date", reasons + [f"{where} {upstream[1]}"], info
    if reasons:
        return "out of date", reasons, info
    return "done", [], info


# ----------------------------------------------------------------------------- the run


@contextmanager
def run_lock(workdir: Path, stage: str, path: Path):
    """One process per run folder: a second one on the same run is refused with a message."""
    with stage_lock(workdir, f"{stage}-{Path(path).name}"):
        yield


class Run:
    """One run folder of ``stage`` with its identity (a hash) and upstream (a dict or None)."""

    def __init__(self, stage: str, path: Path, identity: str, upstream: dict | None = None):
        self.stage, self.path, self.identity, self.upstream = stage, Path(path), identity, upstream
        self.checkpoint_path = self.path / "checkpoint.pt"
        self.metrics_path = self.path / "metrics.csv"

    @property
    def info(self) -> dict | None:
        return read_json(self.path / "run.json")

    def _same_inputs(self, info: dict) -> bool:
        return info.get("identity_sha256") == self.identity and info.get("upstream") == self.upstream

    def is_done(self) -> bool:
        """Complete, with this identity and these inputs: nothing to do."""
        info = self.info
        return bool(info and info.get("complete") and self._same_inputs(info))

    def prepare(self, why_stale: str = "was made from other settings or inputs") -> None:
        """Remove a run made from another identity or upstream, then make the folder."""
        info = self.info
        if info and not self._same_inputs(info) and self.path.exists():
            log.info("%s: %s %s; starting over", self.stage, self.path, why_stale)
            shutil.rmtree(self.path)
        with writing(self.path, "create the run folder", RESUME):
            self.path.mkdir(parents=True, exist_ok=True)

    def lock(self, workdir: Path):
        return run_lock(workdir, self.stage, self.path)

    def mark(self, base: dict, step: int, complete: bool = False, **extra) -> None:
        """Write ``run.json``: ``base`` (config, steps, ...) plus the identity, upstream and progress."""
        save_json(
            self.path / "run.json",
            {
                **base,
                "identity_sha256": self.identity,
                "upstream": self.upstream,
                "complete": complete,
                "step": step,
                **extra,
            },
        )

    # --- checkpoints
    def save_checkpoint(self, step: int, state: dict) -> None:
        """``state`` (weights, optimiser, ...) plus the step, the identity and every RNG, atomically."""
        save_torch(
            self.checkpoint_path,
            {**state, "step": int(step), "identity": self.identity, "upstream": self.upstream, "rng": ckpt.rng_state()},
        )

    def load_checkpoint(self, **match) -> dict | None:
        """The checkpoint of this identity and upstream (and ``match``, e.g. a phase), with every RNG
        restored; None when there is none or it belongs to something else (the run starts over)."""
        if not self.checkpoint_path.exists():
            return None
        state = ckpt.load(self.checkpoint_path, f"a {self.stage} checkpoint.pt")
        want = {"identity": self.identity, "upstream": self.upstream, **match}
        if any(state.get(k) != v for k, v in want.items()):
            log.info("%s: %s is from other settings or inputs; starting over", self.stage, self.checkpoint_path)
            return None
        ckpt.set_rng_state(state["rng"])
        return state

    # --- metrics
    def open_metrics(self, fields: list[str], keep: list[dict]) -> "Metrics":
        """metrics.csv with the rows ``keep`` (rewritten atomically: a kill while rewriting loses
        nothing), then open for appending."""
        return Metrics(self.metrics_path, fields, keep)

    def finish(
        self,
        model: dict | None,
        base: dict,
        steps: int,
        rows: list[dict] | None = None,
        title: str = "",
        model_name: str = "model.pt",
        **extra,
    ) -> None:
        """The results: ``model.pt`` (when given), ``loss.png`` (when rows), then ``run.json`` complete."""
        if model is not None:
            save_torch(self.path / model_name, model)
        if rows:
            plot_loss(rows, self.path / "loss.png", title)
        self.mark(base, steps, complete=True, **extra)


class Metrics:
    """metrics.csv, appended row by row and flushed at every checkpoint."""

    def __init__(self, path: Path, fields: list[str], keep: list[dict]):
        self.path, self.fields = path, fields
        write_atomic(path, lambda t: write_csv(t, keep, fields))
        self.fh = open(path, "a", newline="")
        self.writer = csv.DictWriter(self.fh, fieldnames=fields, extrasaction="ignore")

    def write(self, row: dict) -> None:
        self.writer.writerow(row)

    def flush(self) -> None:
        with writing(self.path, "write", RESUME):
            self.fh.flush()

    def close(self) -> None:
        try:
            self.fh.close()
        except OSError:  # a failed write is being reported already; the checkpoint holds the rows
            pass


def rows_before(path: Path, step: int, **match) -> list[dict]:
    """The rows of metrics.csv with ``step`` < ``step`` (and the ``match`` columns equal)."""
    return [r for r in read_csv(path) if int(r["step"]) < step and all(r.get(k) == str(v) for k, v in match.items())]
