"""Class mappings shipped under ``lift3d/data/``: teacher classes -> NYU40 -> ScanNet-20.

- ``nyu40_scannet20.csv``: the 40 NYU40 classes (ids 1..40) and their ScanNet-20 benchmark
  index (0..19; -1 = ignored). The benchmark keeps NYU40 ids
  1 2 3 4 5 6 7 8 9 10 11 12 14 16 24 28 33 34 36 39.
- ``ade20k150_to_nyu40.csv``: the ADE20K SceneParsing-150 classes (model output index 0..149,
  Hugging Face ``id2label`` names) -> NYU40 id (0 = no indoor counterpart).
- ``imagenet_to_nyu40.csv``: a coarse map from the few ImageNet-1k classes that plausibly are
  indoor furniture / structure -> NYU40 id; every other ImageNet class maps to 0 (none).

Lookup tables are numpy int64 arrays indexed by the source id.
"""

from __future__ import annotations

import csv
import io
from functools import lru_cache
from importlib import resources

import numpy as np

__all__ = [
    "SCANNET20_NYU40_IDS",
    "IGNORE_INDEX",
    "nyu40_names",
    "scannet20_names",
    "nyu40_to_scannet20",
    "ade20k150_names",
    "ade20k150_to_nyu40",
    "imagenet_to_nyu40",
    "teacher_to_nyu40",
    "teacher_to_scannet20",
    "load_table",
]

SCANNET20_NYU40_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 14, 16, 24, 28, 33, 34, 36, 39)
# the one "no ScanNet-20 class" value everywhere in lift3d (labels, losses, evaluation): it
# fits the uint8 label arrays; pass it as a loss's ignore_index
IGNORE_INDEX = 255


@lru_cache(maxsize=None)
def load_table(name: str) -> tuple[dict, ...]:
    """Rows of ``lift3d/data/<name>`` as dicts of strings."""
    text = resources.files("lift3d").joinpath("data", name).read_text(encoding="utf-8")
    return tuple(csv.DictReader(io.StringIO(text)))


def nyu40_names() -> list[str]:
    """NYU40 class names; entry i is NYU40 id i + 1."""
    rows = load_table("nyu40_scannet20.csv")
    assert [int(r["nyu40_id"]) for r in rows] == list(range(1, 41)), "nyu40 ids must be 1..40"
    return [r["nyu40_name"] for r in rows]


def nyu40_to_scannet20(ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(41,) int64: NYU40 id (0 = unlabelled) -> ScanNet-20 index, ``ignore_index`` if none."""
    lut = np.full(41, ignore_index, dtype=np.int64)
    for r in load_table("nyu40_scannet20.csv"):
        if int(r["scannet20_index"]) >= 0:
            lut[int(r["nyu40_id"])] = int(r["scannet20_index"])
    return lut


def scannet20_names() -> list[str]:
    """The 20 ScanNet benchmark class names, in benchmark index order."""
    rows = sorted(
        (int(r["scannet20_index"]), r["nyu40_name"])
        for r in load_table("nyu40_scannet20.csv")
        if int(r["scannet20_index"]) >= 0
    )
    return [n for _, n in rows]


def ade20k150_names() -> list[str]:
    rows = load_table("ade20k150_to_nyu40.csv")
    assert [int(r["ade_index"]) for r in rows] == list(range(150))
    return [r["ade_name"] for r in rows]


def ade20k150_to_nyu40() -> np.ndarray:
    """(150,) int64: ADE20K-150 output index -> NYU40 id (0 = none)."""
    return np.array([int(r["nyu40_id"]) for r in load_table("ade20k150_to_nyu40.csv")], dtype=np.int64)


def imagenet_to_nyu40() -> np.ndarray:
    """(1000,) int64: ImageNet-1k index -> NYU40 id (0 = none)."""
    lut = np.zeros(1000, dtype=np.int64)
    for r in load_table("imagenet_to_nyu40.csv"):
        lut[int(r["imagenet_index"])] = int(r["nyu40_id"])
    return lut


def _norm(name: str) -> str:
    return name.split(",")[0].split(";")[0].strip().lower().replace("_", " ")


def teacher_to_nyu40(classes: list[str]) -> np.ndarray:
    """NYU40 lookup for a teacher's class list (the store's ``classes`` attribute).

    Recognises ImageNet-1k (1000 classes; the mapped names are checked) and ADE20K-150
    (150 classes whose names match the shipped list).
    """
    names = [_norm(c) for c in classes]
    if len(names) == 1000:
        rows = load_table("imagenet_to_nyu40.csv")
        wrong = [
            (r["imagenet_name"], names[int(r["imagenet_index"])])
            for r in rows
            if _norm(r["imagenet_name"]) != names[int(r["imagenet_index"])]
        ]
        if not wrong:
            return imagenet_to_nyu40()
        raise ValueError(f"1000 classes but not in ImageNet-1k order: {wrong[:5]}")
    if len(names) == 150:
        ade = [_norm(n) for n in ade20k150_names()]
        wrong = [(a, b) for a, b in zip(ade, names) if a != b]
        if not wrong:
            return ade20k150_to_nyu40()
        raise ValueError(f"150 classes but not ADE20K-150's names (shipped vs teacher): {wrong[:5]}")
    raise ValueError(f"no NYU40 mapping for a teacher with {len(names)} classes (known: ImageNet-1k, ADE20K-150)")


def teacher_to_scannet20(classes: list[str], ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """Teacher class index -> ScanNet-20 index (``ignore_index`` where none). A teacher whose
    classes are ScanNet-20 itself (a fitted teacher; a folded one with its "other" bin last) maps
    to itself."""
    names = scannet20_names()
    if list(classes)[: len(names)] == names and len(classes) <= len(names) + 1:
        lut = np.full(len(classes), ignore_index, dtype=np.int64)
        lut[: len(names)] = np.arange(len(names))
        return lut
    nyu = teacher_to_nyu40(classes)
    return nyu40_to_scannet20(ignore_index)[nyu]
