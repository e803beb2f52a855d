"""Labelled scenes in ScanNet's layout, for fine-tuning and evaluation, and the data-efficient
benchmark files (limited annotations / limited reconstructions).

A labelled scene is ``<root>/scans/<scene>/<scene>_vh_clean_2.ply`` (vertices, colours) plus
``<scene>_vh_clean_2.labels.ply`` (vertex property ``label`` = NYU40 id), mapped to the 20
ScanNet benchmark classes (everything else -> :data:`IGNORE_INDEX`). Splits come from
``<root>/scannetv2_{train,val}.txt``. The synthetic dataset is written in this same layout.

Data-efficient files, in the formats of ScanNet's ``--data_efficient`` download:

- limited annotations (LA): a ``torch.save`` dict ``scene id -> int64 vertex indices``; only
  those vertices' labels are used for training;
- limited reconstructions (LR): a text file of scene ids, one per line; only those scenes
  are trained on.

:func:`make_la_file` / :func:`make_lr_file` write such files for any labelled dataset (the
demo uses them on the synthetic data).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from lift3d.core import checkpoint as ckpt
from lift3d.core.classmaps import scannet20_names
from lift3d.pipeline.readers.base import ReaderError, make_reader
from lift3d.pipeline.readers.common import read_split
from lift3d.pipeline.readers.scannet_labels import IGNORE_INDEX, nyu40_to_scannet20, read_labelled_mesh

NUM_CLASSES = 20
LABELLED_KINDS = ("scannet", "synthetic")  # datasets in ScanNet's raw layout with labelled meshes

__all__ = [
    "Scene",
    "LabelledDataset",
    "IGNORE_INDEX",
    "NUM_CLASSES",
    "CLASS_NAMES",
    "load_scene",
    "read_la_file",
    "read_lr_file",
    "make_la_file",
    "make_lr_file",
]

CLASS_NAMES = scannet20_names()


@dataclass
class Scene:
    name: str
    xyz: np.ndarray  # float32 (V, 3), metres, the .sens pose frame (world z up)
    rgb: np.ndarray  # uint8 (V, 3)
    labels: np.ndarray  # int64 (V,), ScanNet-20 index or IGNORE_INDEX


@lru_cache(maxsize=64)
def load_scene(scene_dir: str) -> Scene:
    """One labelled scene (cached per process: fine-tuning visits each scene many times)."""
    d = Path(scene_dir)
    xyz, rgb, nyu40 = read_labelled_mesh(d)
    return Scene(d.name, xyz, rgb, nyu40_to_scannet20(nyu40, IGNORE_INDEX))


class LabelledDataset:
    """The labelled scenes of one configured dataset entry (kind scannet or synthetic)."""

    def __init__(self, entry: dict, workdir: Path):
        if entry["kind"] not in LABELLED_KINDS:
            raise ReaderError(
                f"dataset {entry['name']!r}: kind {entry['kind']!r} has no labelled meshes in "
                f"ScanNet's layout; fine-tuning reads kinds {', '.join(LABELLED_KINDS)}"
            )
        self.entry = entry
        reader = make_reader({**entry, "split": "all"}, workdir)
        reader.prepare()  # the synthetic dataset generates itself here when it is not there yet
        self.root = Path(reader.root)
        self.scans = self.root / "scans"

    def split(self, name: str) -> list[str]:
        """Scene ids of split ``train`` / ``val`` (from the split files), checked to exist on disk."""
        ids = read_split(
            self.root / f"scannetv2_{name}.txt",
            name,
            f"fine-tuning reads ScanNet's train and val split files under the dataset's root ({self.root}): "
            f"check its root, or add the file",
        )
        missing = [s for s in ids if not (self.scans / s / f"{s}_vh_clean_2.labels.ply").is_file()]
        if missing:
            raise ReaderError(
                f"{self.root / f'scannetv2_{name}.txt'}: {len(missing)} scene(s) of split {name!r} "
                f"have no {missing[0]}_vh_clean_2.labels.ply under {self.scans} "
                f"(first: {', '.join(missing[:3])})"
            )
        return ids

    def scene(self, name: str) -> Scene:
        return load_scene(str(self.scans / name))


# ----------------------------------------------------------------------------- benchmark files


def read_la_file(path: str | Path, scenes: dict[str, int]) -> dict[str, np.ndarray]:
    """Limited annotations: ``torch.save`` dict scene -> int64 vertex indices, checked against
    ``scenes`` (scene id -> vertex count): every scene must be one of them, every index in range."""
    path = Path(path)
    if not path.is_file():
        raise ReaderError(f"finetune.la_file {path}: no such file (a torch.save dict scene id -> vertex indices)")
    raw = ckpt.load(path, "a torch.save dict scene id -> vertex indices", numpy=True, error=ReaderError)
    if not isinstance(raw, dict):
        raise ReaderError(f"{path}: expected a dict scene id -> vertex indices, got {type(raw).__name__}")
    out = {}
    for scene, idx in raw.items():
        if scene not in scenes:
            raise ReaderError(
                f"{path}: scene {scene!r} is not a training scene of this dataset "
                f"({len(scenes)} known, e.g. {', '.join(sorted(scenes)[:3])})"
            )
        arr = np.asarray(idx.numpy() if hasattr(idx, "numpy") else idx)
        if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
            raise ReaderError(
                f"{path}: scene {scene!r}: expected a 1-D integer array of vertex indices, "
                f"got shape {arr.shape} dtype {arr.dtype}"
            )
        n = scenes[scene]
        bad = arr[(arr < 0) | (arr >= n)]
        if len(bad):
            raise ReaderError(
                f"{path}: scene {scene!r}: vertex index {int(bad[0])} out of range "
                f"(the mesh has {n} vertices; {len(bad)} bad indices)"
            )
        out[scene] = np.unique(arr.astype(np.int64))
    if not out:
        raise ReaderError(f"{path}: no scenes")
    return out


def read_lr_file(path: str | Path, scenes: list[str]) -> list[str]:
    """Limited reconstructions: scene ids (one per line) that must all be training scenes."""
    path = Path(path)
    if not path.is_file():
        raise ReaderError(f"finetune.lr_file {path}: no such file (a text file of scene ids, one per line)")
    ids = read_split(path)
    unknown = sorted(set(ids) - set(scenes))
    if unknown:
        raise ReaderError(
            f"finetune.lr_file {path}: {len(unknown)} scene(s) are not training scenes of this "
            f"dataset (first: {', '.join(unknown[:3])})"
        )
    if not ids:
        raise ReaderError(f"finetune.lr_file {path}: no scene ids")
    return ids


def make_la_file(ds: LabelledDataset, scenes: list[str], points: int, seed: int, out: str | Path) -> Path:
    """Write an LA file: ``points`` random labelled vertices (ScanNet-20 classes) per scene."""
    rng = np.random.default_rng(seed)
    data = {}
    for s in sorted(scenes):
        labelled = np.flatnonzero(ds.scene(s).labels != IGNORE_INDEX)
        k = min(points, len(labelled))
        data[s] = torch.from_numpy(np.sort(rng.choice(labelled, size=k, replace=False)).astype(np.int64))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(data, tmp)
    tmp.replace(out)
    return out


def make_lr_file(scenes: list[str], percent: float, seed: int, out: str | Path) -> Path:
    """Write an LR file: ``percent`` % of ``scenes`` (at least one), chosen at random."""
    rng = np.random.default_rng(seed)
    k = max(1, int(round(len(scenes) * percent / 100.0)))
    chosen = sorted(rng.choice(sorted(scenes), size=min(k, len(scenes)), replace=False).tolist())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(s + "\n" for s in chosen))
    return out
