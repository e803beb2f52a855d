"""ScanNet labels: the labelled mesh (NYU40 per vertex), the 2D label-filt images (ScanNet ids,
mapped to NYU40 through ``scannetv2-labels.combined.tsv``) and the 20 benchmark classes.

The ScanNet-20 mapping is lift3d's one table (``lift3d/classmaps.py``): NYU40 ids
1 2 3 4 5 6 7 8 9 10 11 12 14 16 24 28 33 34 36 39 -> 0..19, everything else (0 = unlabelled,
other NYU40 classes) -> ``IGNORE_INDEX`` = 255 (fits uint8 label arrays; pass it as the loss's
ignore_index).
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from lift3d.core.classmaps import IGNORE_INDEX, SCANNET20_NYU40_IDS
from lift3d.core.classmaps import nyu40_to_scannet20 as _lut
from lift3d.pipeline.readers.base import ReaderError
from lift3d.pipeline.readers.ply import read_ply

BENCHMARK_NYU40 = SCANNET20_NYU40_IDS


def nyu40_to_scannet20(nyu40: np.ndarray, ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """int64 ScanNet-20 index per NYU40 id; ids outside the benchmark (and 0, > 40) -> ignore_index."""
    nyu40 = np.asarray(nyu40, np.int64)
    lut = _lut(ignore_index)
    out = np.full(nyu40.shape, ignore_index, np.int64)
    ok = (nyu40 >= 0) & (nyu40 < len(lut))
    out[ok] = lut[nyu40[ok]]
    return out


def read_labelled_mesh(scene_dir: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(xyz float32 (V, 3), rgb uint8 (V, 3), nyu40 int64 (V,)) of ``<scene>_vh_clean_2[.labels].ply``.

    Colours come from the plain mesh, labels from the ``.labels.ply``; both must have the same
    vertices. Coordinates are in the ``.sens`` pose frame (no axis alignment applied)."""
    scene_dir = Path(scene_dir)
    scene = scene_dir.name
    mesh_p = scene_dir / f"{scene}_vh_clean_2.ply"
    lab_p = scene_dir / f"{scene}_vh_clean_2.labels.ply"
    v, _ = read_ply(mesh_p)
    lv, _ = read_ply(lab_p)
    for p, d, keys in ((mesh_p, v, ("x", "y", "z", "red", "green", "blue")), (lab_p, lv, ("x", "y", "z", "label"))):
        missing = [k for k in keys if k not in d]
        if missing:
            raise ReaderError(f"{p}: vertex properties {missing} missing")
    if len(lv["x"]) != len(v["x"]):
        raise ReaderError(f"{lab_p}: {len(lv['x'])} vertices, but {mesh_p.name} has {len(v['x'])}")
    xyz = np.stack([v["x"], v["y"], v["z"]], 1).astype(np.float32)
    lxyz = np.stack([lv["x"], lv["y"], lv["z"]], 1).astype(np.float32)
    if not np.allclose(xyz, lxyz, atol=1e-4):
        raise ReaderError(f"{lab_p}: vertex positions differ from {mesh_p.name}")
    rgb = np.stack([v["red"], v["green"], v["blue"]], 1).astype(np.uint8)
    return xyz, rgb, lv["label"].astype(np.int64)


def read_label_map(tsv_path: Path, to: str = "nyu40id") -> dict[int, int]:
    """ScanNet label id -> ``to`` column (default NYU40 id) from scannetv2-labels.combined.tsv.
    Rows whose target is empty or not an integer map to 0 (unlabelled)."""
    tsv_path = Path(tsv_path)
    try:
        with open(tsv_path, newline="") as f:
            rows = list(csv.DictReader(f, delimiter="\t"))
    except OSError as exc:
        raise ReaderError(f"{tsv_path}: cannot read: {exc.strerror or exc}") from None
    if not rows or "id" not in rows[0] or to not in rows[0]:
        raise ReaderError(f"{tsv_path}: expected tab-separated columns 'id' and {to!r}")
    out = {}
    for r in rows:
        try:
            sid = int(r["id"])
        except (TypeError, ValueError):
            continue
        try:
            out[sid] = int(r[to])
        except (TypeError, ValueError):
            out[sid] = 0
    return out


def read_label_tsv(tsv_path: Path, to: str = "nyu40id") -> dict[int, int]:
    """Alias of :func:`read_label_map`: ScanNet label id -> NYU40 id."""
    return read_label_map(tsv_path, to)


def label_lut(mapping: dict[int, int]) -> np.ndarray:
    """uint16 lookup table over all 16-bit ids; ids not in ``mapping`` -> 0 (unlabelled)."""
    lut = np.zeros(65536, np.uint16)
    for k, v in mapping.items():
        if 0 <= k < 65536:
            lut[k] = v
    return lut


def iter_2d_labels(zip_path: Path, tsv_path: Path, frames: set[int] | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """(frame index, NYU40 uint16 (H, W)) for each ``label-filt/<frame>.png`` of a
    ``<scene>_2d-label-filt.zip`` (sorted by frame; only ``frames`` if given)."""
    zip_path = Path(zip_path)
    lut = label_lut(read_label_map(tsv_path))
    try:
        zf = zipfile.ZipFile(zip_path)
    except (OSError, zipfile.BadZipFile) as exc:
        raise ReaderError(f"{zip_path}: cannot open zip: {exc}") from None
    with zf:
        entries = {}
        for name in zf.namelist():
            stem = Path(name).stem
            if name.endswith(".png") and Path(name).parent.name == "label-filt" and stem.isdigit():
                entries[int(stem)] = name
        for i in sorted(entries):
            if frames is not None and i not in frames:
                continue
            img = cv2.imdecode(np.frombuffer(zf.read(entries[i]), np.uint8), cv2.IMREAD_UNCHANGED)
            if img is None or img.ndim != 2:
                raise ReaderError(f"{zip_path}: {entries[i]} is not a single-channel PNG")
            yield i, lut[img.astype(np.uint16)]


def read_2d_labels(zip_path: Path, frame: int, table: dict[int, int] | Path) -> np.ndarray:
    """NYU40 uint16 (H, W) label image of one frame; ``table`` is a ScanNet id -> NYU40 dict
    (:func:`read_label_tsv`) or the tsv's path."""
    zip_path = Path(zip_path)
    lut = label_lut(table if isinstance(table, dict) else read_label_map(table))
    name = f"label-filt/{int(frame)}.png"
    try:
        with zipfile.ZipFile(zip_path) as zf:
            data = zf.read(name)
    except KeyError:
        raise ReaderError(f"{zip_path}: no {name}") from None
    except (OSError, zipfile.BadZipFile) as exc:
        raise ReaderError(f"{zip_path}: cannot open zip: {exc}") from None
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 2:
        raise ReaderError(f"{zip_path}: {name} is not a single-channel PNG")
    return lut[img.astype(np.uint16)]


# ----------------------------------------------------------------------------- 2D label images

LABELS_TSV = "scannetv2-labels.combined.tsv"
SCANNET_KINDS = ("scannet", "synthetic")  # datasets in ScanNet's raw layout (2D labels included)


def load_label_map(tsv: str | Path) -> np.ndarray:
    """ScanNet label id -> NYU40 id (0 = unknown) as an int64 lookup table."""
    tsv = Path(tsv)
    if not tsv.is_file():
        raise FileNotFoundError(f"{tsv} not found: ScanNet's label table (id -> nyu40id) is needed to read 2D labels")
    pairs = read_label_map(tsv)  # the shared tsv parser (column checks, blank rows)
    lut = np.zeros(max(pairs, default=0) + 1, dtype=np.int64)
    for sid, nyu in pairs.items():
        if not 0 <= nyu <= 40:
            raise ValueError(f"{tsv}: id {sid} has nyu40id {nyu}, outside 0..40")
        lut[sid] = nyu
    return lut


def _decode_png16(data: bytes, where: str) -> np.ndarray:
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.ndim != 2:
        raise ValueError(f"{where}: not a single-channel label PNG")
    return img


class ScanNetLabels:
    """Ground-truth ScanNet-20 label images of a dataset in ScanNet's raw layout."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        tsv = self.root / LABELS_TSV
        if not tsv.is_file() and (self.root.parent / LABELS_TSV).is_file():
            tsv = self.root.parent / LABELS_TSV
        self.id_to_nyu = load_label_map(tsv)
        self.nyu_to_20 = _lut(IGNORE_INDEX)
        self._zips: dict[str, zipfile.ZipFile | None] = {}

    def available(self) -> bool:
        return (self.root / "scans").is_dir()

    def _zip(self, scene: str):
        if scene not in self._zips:
            p = self.root / "scans" / scene / f"{scene}_2d-label-filt.zip"
            self._zips[scene] = zipfile.ZipFile(p) if p.is_file() else None
        return self._zips[scene]

    def raw(self, scene: str, frame: int) -> np.ndarray | None:
        """The ScanNet label ids of one frame, or None when it has no label image."""
        name = f"label-filt/{frame}.png"
        folder = self.root / "scans" / scene / name
        if folder.is_file():
            return _decode_png16(folder.read_bytes(), str(folder))
        zf = self._zip(scene)
        if zf is None:
            return None
        try:
            data = zf.read(name)
        except KeyError:
            return None
        return _decode_png16(data, f"{zf.filename}:{name}")

    def __call__(self, scene: str, frame: int) -> np.ndarray | None:
        """ScanNet-20 index per pixel (IGNORE_INDEX where none), or None without a label image."""
        ids = self.raw(scene, frame)
        if ids is None:
            return None
        ids = ids.astype(np.int64)
        nyu = np.where(ids < len(self.id_to_nyu), self.id_to_nyu[np.minimum(ids, len(self.id_to_nyu) - 1)], 0)
        return self.nyu_to_20[nyu]

    def close(self):
        for zf in self._zips.values():
            if zf is not None:
                zf.close()


def default_labels(entry: dict, wd: Path) -> "ScanNetLabels | None":
    """The 2D label images of a dataset in ScanNet's raw layout, or None (other kinds, no scans/)."""
    if entry["kind"] not in SCANNET_KINDS:
        return None
    root = Path(entry["root"]).expanduser() if entry.get("root") else Path(wd) / "raw" / entry["name"]
    if not (root / "scans").is_dir():
        return None
    return ScanNetLabels(root)
