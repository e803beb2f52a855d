"""The reader interface shared by every dataset module, and the registry of dataset kinds.

A reader turns one dataset entry of the config (``{name, kind, root, frame_skip, ...}``) into
scenes and, per scene, the kept frames at the dataset's stored size, in the store's conventions
(docs/stores.md): RGB uint8 aligned to depth, depth uint16 millimetres (pinhole: z,
panorama: distance along the ray), intrinsics (fx, fy, cx, cy) in stored pixels with
integer coordinates at pixel centres, pose camera-to-world in OpenCV's camera frame.

Frame-level faults that real datasets contain (non-finite pose, empty depth, one corrupt
frame) are yielded as ``Skip(source_index, reason)`` so the stage counts them; anything else
(missing file, truncated container, wrong sizes, missing intrinsics) raises ``ReaderError``
naming the file and the problem.

Ground-truth 2D labels: ``reader.labels_2d()`` gives a :class:`LabelSource` for a format that has
2D label images (None otherwise). ``src(scene, source_index)`` is the frame's label image as
ScanNet-20 indices (uint8, ``IGNORE_INDEX`` = 255 where unlabelled or the class is not one of the
20), at the label image's own resolution, or None when that frame has no label image. Every format
goes through NYU40 (``lift3d.core.classmaps.nyu40_to_scannet20``). A label image of the wrong
size, with ids its format's mapping does not know, or that cannot be decoded raises
``ReaderError`` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from lift3d.core.errors import ReaderError
from lift3d.core.registry import READERS

PINHOLE, EQUIRECT = 0, 1


@dataclass
class Frame:
    source_index: int
    rgb: np.ndarray  # uint8 (H, W, 3), RGB
    depth: np.ndarray  # uint16 (H, W), millimetres, 0 = no measurement
    intrinsics: np.ndarray  # float32 (4,): fx, fy, cx, cy (NaN for panoramas)
    pose: np.ndarray  # float32 (4, 4), camera-to-world, OpenCV camera frame
    projection: int = PINHOLE


@dataclass
class Skip:
    source_index: int
    reason: str  # a short snake_case reason, counted in the store's `skipped`


class LabelSource:
    """The ground-truth 2D label images of one dataset, as ScanNet-20 indices.

    ``src(scene, source_index)`` -> uint8 (h, w) ScanNet-20 index per pixel (0..19;
    ``IGNORE_INDEX`` = 255 where unlabelled or the class has no ScanNet-20 counterpart) at the label
    image's own resolution, or None when that frame has no label image. Files are opened lazily;
    ``close()`` releases them (also as a context manager)."""

    def __call__(self, scene: str, source_index: int) -> np.ndarray | None:
        raise NotImplementedError

    def close(self) -> None:
        """Release open files (zip archives, ...); the source can still be called afterwards."""

    def __enter__(self) -> "LabelSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class BaseReader:
    """Subclasses set ``kind`` and implement ``stored_size``, ``scenes`` and ``frames``."""

    kind: str = ""
    #: extra keys a dataset entry of this kind may carry, with their expected types
    extra_keys: dict[str, type | tuple] = {}
    #: values the configuration fills in for extra keys an entry leaves out, so that a changed
    #: default changes the stores' identity (and they are rebuilt) instead of passing unseen
    defaults: dict = {}

    def __init__(self, entry: dict, workdir: Path):
        self.entry = entry
        self.workdir = Path(workdir)
        self.root = Path(entry["root"]).expanduser() if entry.get("root") else None

    def prepare(self) -> None:
        """Driver-side one-off work before scenes are listed (e.g. generating synthetic data)."""

    def stored_size(self) -> tuple[int, int]:
        raise NotImplementedError

    def scenes(self) -> list[str]:
        raise NotImplementedError

    def frames(self, scene: str, frame_skip: int) -> Iterator[Frame | Skip]:
        raise NotImplementedError

    def labels_2d(self) -> LabelSource | None:
        """The dataset's ground-truth 2D label images (:class:`LabelSource`), or None when the
        format has none (or the dataset's folder does not exist)."""
        return None

    #: kinds that read the same real dataset (the same scene ids name the same scenes)
    family: str = ""

    def scene_key(self, scene: str) -> tuple:
        """What makes two scenes one scene across dataset entries: (family, scene id) for a real
        dataset (ScanNet read raw or exported is one family); a generated room says its own."""
        return (self.family or self.kind, scene)


def reader_class(kind: str) -> type[BaseReader]:
    """The reader of a dataset kind, from the registry (pyproject.toml's ``lift3d.readers``)."""
    if kind not in READERS:
        raise ReaderError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(READERS.names())}")
    return READERS.get(kind)


def make_reader(entry: dict, workdir: Path) -> BaseReader:
    return reader_class(entry["kind"])(entry, workdir)
