"""ScanNet labels: the labelled mesh (NYU40 per vertex), the 2D label-filt images (ScanNet ids,
mapped to NYU40 through ``scannetv2-labels.combined.tsv``) and the 20 benchmark classes.

The ScanNet-20 mapping is lift3d's one table (``lift3d/core/classmaps.py``): NYU40 ids
1 2 3 4 5 6 7 8 9 10 11 12 14 16 24 28 33 34 36 39 -> 0..19, everything else (0 = unlabelled,
other NYU40 classes) -> ``IGNORE_INDEX`` = 255 (fits uint8 label arrays; pass it as the loss's
ignore_index).

2D label images as a :class:`~lift3d.pipeline.readers.base.LabelSource` (``reader.labels_2d()``):

- :class:`ScanNetLabels`, ScanNet's raw layout (``kind: scannet`` and ``synthetic``):
  ``<root>/scans/<scene>/label-filt/<frame>.png`` (unpacked) or ``label-filt/<frame>.png`` inside
  ``<root>/scans/<scene>/<scene>_2d-label-filt.zip``; the size must be the colour size of the
  scene's ``.sens`` header (only the header is read);
- :class:`ScanNetExportLabels`, ``kind: scannet_export``: ``<root>/<scene>/label-filt/<N>.png``;
  the size must be that of ``<root>/<scene>/color/<N>.jpg`` (read from the JPEG header).

Both: 16-bit PNGs of ScanNet label ids (0 = unlabelled), mapped id -> NYU40 through
``scannetv2-labels.combined.tsv`` (column ``nyu40id``; in ``<root>``, else ``<root>``'s parent),
then NYU40 -> ScanNet-20. An id the tsv does not list is an error naming the image (a tsv row
with an empty ``nyu40id`` maps to 0, unlabelled).
"""

from __future__ import annotations

import csv
import zipfile
from pathlib import Path
from typing import Iterator

import numpy as np

from lift3d.core.classmaps import IGNORE_INDEX, SCANNET20_NYU40_IDS
from lift3d.core.classmaps import nyu40_to_scannet20 as _lut
from lift3d.pipeline.readers.base import LabelSource, ReaderError, make_reader
from lift3d.pipeline.readers.common import check_label_size, decode_label_png, image_hw
from lift3d.pipeline.readers.ply import read_ply
from lift3d.pipeline.readers.scannet_sens import read_header

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
            img = decode_label_png(zf.read(entries[i]), f"{zip_path}:{entries[i]}")
            yield i, lut[img]


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
    return lut[decode_label_png(data, f"{zip_path}:{name}")]


# ----------------------------------------------------------------------------- 2D label images

LABELS_TSV = "scannetv2-labels.combined.tsv"
SCANNET_KINDS = ("scannet", "synthetic")  # datasets in ScanNet's raw layout (2D labels included)
MAX_ID = 65535  # label-filt images are 16-bit


def find_label_tsv(root: str | Path) -> Path:
    """``<root>/scannetv2-labels.combined.tsv`` (where ScanNet's download script puts it, beside
    ``scans/``), else the one in ``root``'s parent; the first when neither exists."""
    root = Path(root)
    for p in (root / LABELS_TSV, root.parent / LABELS_TSV):
        if p.is_file():
            return p
    return root / LABELS_TSV


def load_label_map(tsv: str | Path) -> np.ndarray:
    """ScanNet label id -> NYU40 id (0 = unknown) as an int64 lookup table; ReaderError naming the
    tsv when it is missing, malformed or maps an id outside NYU40's 0..40."""
    tsv = Path(tsv)
    if not tsv.is_file():
        raise ReaderError(f"{tsv}: not found; ScanNet's label table (id -> nyu40id) is needed to read 2D labels")
    pairs = read_label_map(tsv)  # the shared tsv parser (column checks, blank rows)
    lut = np.zeros(max(pairs, default=0) + 1, dtype=np.int64)
    for sid, nyu in pairs.items():
        if not 0 <= nyu <= 40:
            raise ReaderError(f"{tsv}: id {sid} has nyu40id {nyu}, outside 0..40")
        if sid >= 0:
            lut[sid] = nyu
    return lut


class LabelTable:
    """``scannetv2-labels.combined.tsv`` as lookup tables over every 16-bit id: which ids it lists
    (and 0, unlabelled) and their NYU40 id and ScanNet-20 index."""

    def __init__(self, tsv: str | Path):
        self.tsv = Path(tsv)
        if not self.tsv.is_file():
            raise ReaderError(
                f"{self.tsv}: not found; ScanNet's label table (id -> nyu40id) is needed to read 2D labels"
            )
        self.known = np.zeros(MAX_ID + 1, bool)
        self.known[0] = True
        self.to_nyu40 = np.zeros(MAX_ID + 1, np.uint8)
        for sid, nyu in read_label_map(self.tsv).items():
            if not 0 <= nyu <= 40:
                raise ReaderError(f"{self.tsv}: id {sid} has nyu40id {nyu}, outside 0..40")
            if 0 <= sid <= MAX_ID:
                self.known[sid] = True
                self.to_nyu40[sid] = nyu
        self.to_scannet20 = _lut(IGNORE_INDEX).astype(np.uint8)[self.to_nyu40]

    def scannet20(self, ids: np.ndarray, where: str) -> np.ndarray:
        """uint8 ScanNet-20 index per pixel of a ScanNet id image; ReaderError naming ``where`` when
        an id is not in the tsv."""
        bad = ~self.known[ids]
        if bad.any():
            unknown = np.unique(ids[bad])
            shown = ", ".join(str(int(i)) for i in unknown[:8]) + (", ..." if len(unknown) > 8 else "")
            raise ReaderError(
                f"{where}: label ids {shown} ({int(bad.sum())} pixels) are not in {self.tsv} "
                f"(ScanNet label id -> nyu40id)"
            )
        return self.to_scannet20[ids]


class ScanNetLabels(LabelSource):
    """Ground-truth ScanNet-20 label images of a dataset in ScanNet's raw layout: ``label-filt/<frame>.png``
    in ``<root>/scans/<scene>/label-filt/`` or ``<root>/scans/<scene>/<scene>_2d-label-filt.zip``.

    A label image must have the colour size of the scene's ``.sens`` header (not checked for a
    scene without its ``.sens``). The tsv and the archives are opened on first use."""

    def __init__(self, root: str | Path, tsv: str | Path | None = None):
        self.root = Path(root)
        self.tsv = Path(tsv) if tsv else find_label_tsv(self.root)
        self._table: LabelTable | None = None
        self._zips: dict[str, tuple[zipfile.ZipFile, dict[int, str]] | None] = {}
        self._colour_hw: dict[str, tuple[int, int] | None] = {}

    @property
    def table(self) -> LabelTable:
        if self._table is None:
            self._table = LabelTable(self.tsv)
        return self._table

    def available(self) -> bool:
        return (self.root / "scans").is_dir()

    def scene_dir(self, scene: str) -> Path:
        return self.root / "scans" / scene

    def _zip(self, scene: str):
        if scene not in self._zips:
            p = self.scene_dir(scene) / f"{scene}_2d-label-filt.zip"
            entry = None
            if p.is_file():
                try:
                    zf = zipfile.ZipFile(p)
                except (OSError, zipfile.BadZipFile) as exc:
                    raise ReaderError(f"{p}: not a readable zip archive: {exc}") from None
                names = {}
                for name in zf.namelist():
                    q = Path(name)
                    if q.suffix == ".png" and q.parent.name == "label-filt" and q.stem.isdigit():
                        names[int(q.stem)] = name
                entry = (zf, names)
            self._zips[scene] = entry
        return self._zips[scene]

    def label_bytes(self, scene: str, frame: int) -> tuple[bytes, str] | None:
        """The PNG bytes of a frame's label image and where they came from, or None."""
        folder = self.scene_dir(scene) / "label-filt" / f"{int(frame)}.png"
        if folder.is_file():
            return _read(folder), str(folder)
        got = self._zip(scene)
        if got is None or int(frame) not in got[1]:
            return None
        zf, names = got
        try:
            return zf.read(names[int(frame)]), f"{zf.filename}:{names[int(frame)]}"
        except (OSError, zipfile.BadZipFile, EOFError) as exc:
            raise ReaderError(f"{zf.filename}: cannot read {names[int(frame)]}: {exc}") from None

    def colour_hw(self, scene: str, frame: int) -> tuple[tuple[int, int], str] | None:
        """(H, W) of the frame's colour image and what gave it; None when it cannot be known."""
        if scene not in self._colour_hw:
            path = self.scene_dir(scene) / f"{scene}.sens"
            hw = None
            if path.is_file():
                try:
                    with open(path, "rb") as f:
                        hd = read_header(f, path)
                except OSError as exc:
                    raise ReaderError(f"{path}: cannot read: {exc.strerror or exc}") from None
                if not (hd.color_width and hd.color_height):
                    raise ReaderError(f"{path}: zero colour image size in header")
                hw = (hd.color_height, hd.color_width)
            self._colour_hw[scene] = hw
        hw = self._colour_hw[scene]
        return None if hw is None else (hw, f"colour size in {scene}.sens's header")

    def _ids(self, scene: str, frame: int) -> tuple[np.ndarray, str] | None:
        got = self.label_bytes(scene, frame)
        if got is None:
            return None
        data, where = got
        ids = decode_label_png(data, where)
        ref = self.colour_hw(scene, frame)
        if ref is not None:
            check_label_size(ids.shape, ref[0], where, ref[1])
        return ids, where

    def raw(self, scene: str, frame: int) -> np.ndarray | None:
        """The ScanNet label ids of one frame (uint16 (H, W)), or None when it has no label image."""
        got = self._ids(scene, frame)
        return None if got is None else got[0]

    def __call__(self, scene: str, source_index: int) -> np.ndarray | None:
        """ScanNet-20 index per pixel (uint8, IGNORE_INDEX where none), or None without a label image."""
        got = self._ids(scene, source_index)
        return None if got is None else self.table.scannet20(*got)

    def close(self):
        for entry in self._zips.values():
            if entry is not None:
                entry[0].close()
        self._zips.clear()


class ScanNetExportLabels(ScanNetLabels):
    """Label images of ScanNet's exported frames: ``<root>/<scene>/label-filt/<N>.png`` (the unpacked
    ``<scene>_2d-label-filt.zip``), each the size of ``<root>/<scene>/color/<N>.jpg``."""

    def scene_dir(self, scene: str) -> Path:
        return self.root / scene

    def available(self) -> bool:
        return self.root.is_dir()

    def label_bytes(self, scene: str, frame: int) -> tuple[bytes, str] | None:
        path = self.scene_dir(scene) / "label-filt" / f"{int(frame)}.png"
        return (_read(path), str(path)) if path.is_file() else None

    def colour_hw(self, scene: str, frame: int) -> tuple[tuple[int, int], str] | None:
        path = self.scene_dir(scene) / "color" / f"{int(frame)}.jpg"
        return (image_hw(path), str(path)) if path.is_file() else None


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ReaderError(f"{path}: cannot read: {exc.strerror or exc}") from None


def default_labels(entry: dict, wd: Path) -> LabelSource | None:
    """The dataset's 2D label images (``make_reader(entry, wd).labels_2d()``), or None."""
    return make_reader(entry, wd).labels_2d()
