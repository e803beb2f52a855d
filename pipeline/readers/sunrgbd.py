"""SUN RGB-D (``kind: sunrgbd``): one image folder = one scene with one frame (source_index 0).

An image folder is any folder under ``root`` with an ``image/`` and a ``depth_bfx/`` or ``depth/``
subfolder; it must hold one image (.jpg/.png), one depth .png, ``intrinsics.txt`` (3x3) and
``extrinsics/*.txt`` (a missing one is an error naming it, never a silently dropped folder).
The scene id is its path relative to root (e.g. ``kv1/NYUdata/NYU0001``).

Conventions (the official toolbox's read3dPoints, re-derived in the data card):
- depth PNGs are bit-rotated: metres = ((d >> 3) | (d << 13)) / 1000 on uint16, clamped at 8 m;
  stored as millimetres (the rotated value, clamped at 8000);
- the toolbox counts pixels from 1: the 0-based principal point is K[0,2] - 1, K[1,2] - 1;
- the extrinsics file's 3x3 R is a gravity tilt, not a pose: the toolbox rotates camera points
  (x, y, z) written as (x, z, -y) by R, i.e. camera-to-world rotation = A @ R with
  A = [[1,0,0],[0,0,1],[0,-1,0]] and no translation (world z up, height relative to the camera);
- the four sensors give different sizes: every frame is resized to ``image_size`` (default
  480x640) with the intrinsics scaled about pixel centres.

Entry keys: ``depth_folder``: ``auto`` (default: ``depth_bfx`` where the folder has it, else
``depth``; the toolbox's choice), ``depth_bfx`` or ``depth`` (the raw, unfilled depth).
Splits: ``split: train|val`` reads ``split_train_file`` / ``split_val_file`` (default
``<root>/sunrgbd_train.txt`` / ``sunrgbd_val.txt``): one image folder per line, relative to root;
absolute paths from the official lists are cut after their last ``SUNRGBD/``.

2D labels (``labels_2d()``): the release's ``seg.mat`` in each image folder (MATLAB v5, read with
``scipy.io.loadmat``): ``seglabel`` (H x W, the image's size) holds per pixel a 1-based index into
the folder's own ``names`` (a cell array of the annotators' object names; 0 = unlabelled). A name
is mapped to NYU40 by its normalised spelling (lower case, letters and digits only) when it is one
of SUN RGB-D's 37 classes (the toolbox's ``seg37list``, NYU40 ids 1..37 in order), NYU40's own
name for one of them, or a listed variant (``SUN37_ALIASES``); any other name is unlabelled. Then
NYU40 -> ScanNet-20.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from lift3d.core.classmaps import IGNORE_INDEX, nyu40_names, nyu40_to_scannet20
from lift3d.pipeline.readers.base import BaseReader, Frame, LabelSource, ReaderError, Skip
from lift3d.pipeline.readers.common import (
    bgr_to_rgb,
    check_label_size,
    decode_image,
    entry_image_size,
    image_hw,
    read_matrix,
    resize_depth,
    resize_rgb,
)
from lift3d.pipeline.readers.scannet import scale_intrinsics

GRAVITY_AXES = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # (x, y, z) -> (x, z, -y)
MAX_DEPTH_MM = 8000
DEFAULT_SIZE = (480, 640)
IMAGE_EXT = (".jpg", ".jpeg", ".png")
SEG_FILE = "seg.mat"
# SUN RGB-D's 37 classes as the toolbox's Metadata/seg37list.mat spells them: NYU40 ids 1..37 in order
SUN37 = (
    "wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
    "counter", "blinds", "desk", "shelves", "curtain", "dresser", "pillow", "mirror", "floor_mat", "clothes",
    "ceiling", "books", "fridge", "tv", "paper", "towel", "shower_curtain", "box", "whiteboard", "person",
    "night_stand", "toilet", "sink", "lamp", "bathtub", "bag",
)  # fmt: skip
# other spellings of the same 37 classes (singular forms; NYU's own misspelling)
SUN37_ALIASES = {"shelf": 15, "book": 23, "refridgerator": 24}


def decode_depth(raw: np.ndarray) -> np.ndarray:
    """SUN RGB-D depth PNG (uint16, bit-rotated) -> uint16 millimetres, clamped at 8 m."""
    d = raw.astype(np.uint16)
    mm = (d >> 3) | (d << 13)  # uint16 arithmetic: the high bits wrap, as in the toolbox
    return np.minimum(mm, MAX_DEPTH_MM).astype(np.uint16)


def gravity_pose(r: np.ndarray) -> np.ndarray:
    """4x4 camera-to-world (OpenCV camera) from the extrinsics file's tilt R: rotation A @ R."""
    pose = np.eye(4)
    pose[:3, :3] = GRAVITY_AXES @ r
    return pose


def split_entry_path(line: str) -> str:
    """A split-file line -> folder id relative to the dataset root."""
    s = line.strip().replace("\\", "/").rstrip("/")
    if "SUNRGBD/" in s:
        s = s.rsplit("SUNRGBD/", 1)[1]
    while s.startswith("./"):
        s = s[2:]
    return s


def _one_file(folder: Path, exts, what: str) -> Path:
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in exts and p.is_file())
    except OSError:
        raise ReaderError(f"{folder}: {what} folder missing or unreadable") from None
    if not files:
        raise ReaderError(f"{folder}: no {what} file ({'/'.join(exts)})")
    if len(files) > 1:
        raise ReaderError(f"{folder}: {len(files)} {what} files ({files[0].name}, {files[1].name}, ...); expected one")
    return files[0]


class Reader(BaseReader):
    kind = "sunrgbd"
    extra_keys = {"depth_folder": str, "split_train_file": str, "split_val_file": str}

    def __init__(self, entry: dict, workdir: Path):
        super().__init__(entry, workdir)
        self.depth_folder = entry.get("depth_folder") or "auto"
        if self.depth_folder not in ("auto", "depth_bfx", "depth"):
            raise ReaderError(
                f"dataset {entry.get('name')!r}: depth_folder must be 'auto', 'depth_bfx' or 'depth', "
                f"got {self.depth_folder!r}"
            )
        self._scenes: list[str] | None = None

    def stored_size(self) -> tuple[int, int]:
        return entry_image_size(self.entry) or DEFAULT_SIZE

    def _root(self) -> Path:
        if self.root is None or not self.root.is_dir():
            raise ReaderError(f"{self.root}: not a folder (expected SUN RGB-D image folders under it)")
        return self.root

    def find_folders(self) -> list[str]:
        """Image folders under root (not descending into one once found), as root-relative ids."""
        root = self._root()
        found = []

        def unreadable(exc: OSError):  # os.walk leaves such a folder out without a word otherwise
            raise ReaderError(f"{exc.filename}: unreadable folder: {exc.strerror or exc}")

        for dirpath, dirnames, filenames in os.walk(root, onerror=unreadable):
            if "image" in dirnames and ("depth" in dirnames or "depth_bfx" in dirnames):
                rel = Path(dirpath).relative_to(root).as_posix()
                found.append(rel)
                dirnames[:] = []
            else:
                dirnames.sort()
        return sorted(found)

    def scenes(self) -> list[str]:
        if self._scenes is None:
            found = self.find_folders()
            split = self.entry.get("split", "all")
            if split == "all":
                out = found
            else:
                name = self.entry.get(f"split_{split}_file") or f"sunrgbd_{split}.txt"
                path = Path(name).expanduser()
                path = path if path.is_absolute() else self._root() / path
                if not path.is_file():
                    raise ReaderError(
                        f"split file {path} not found (needed for split={split!r}); set "
                        f"split_{split}_file, add the file, or use split: all"
                    )
                ids = {
                    split_entry_path(x.split("#", 1)[0])
                    for x in path.read_text().splitlines()
                    if x.split("#", 1)[0].strip()
                }
                missing = sorted(ids - set(found))
                if missing:
                    raise ReaderError(
                        f"{path}: {len(missing)} of the {len(ids)} folders of split {split!r} are not "
                        f"image folders under {self.root} (first: {', '.join(missing[:3])})"
                    )
                out = sorted(ids)
            if not out:
                raise ReaderError(
                    f"{self.root}: no SUN RGB-D image folders (image/ beside depth/ or depth_bfx/) "
                    f"found for split {self.entry.get('split', 'all')!r}"
                )
            self._scenes = out
        return self._scenes

    def labels_2d(self) -> LabelSource | None:
        """``seg.mat`` of each image folder, through its ``names`` and NYU40; None without root."""
        if self.root is None or not self.root.is_dir():
            return None
        return SunRGBDLabels(self.root)

    def _depth_path(self, folder: Path) -> Path:
        name = self.depth_folder
        if name == "auto":
            name = "depth_bfx" if (folder / "depth_bfx").is_dir() else "depth"
        return _one_file(folder / name, (".png",), f"{name} depth")

    def frames(self, scene: str, frame_skip: int) -> Iterator[Frame | Skip]:
        folder = self._root() / scene
        out_h, out_w = self.stored_size()
        image_path = _one_file(folder / "image", IMAGE_EXT, "colour image")
        depth_path = self._depth_path(folder)
        k = read_matrix(folder / "intrinsics.txt", (3, 3), "intrinsics")
        fx, fy, cx, cy = k[0, 0], k[1, 1], k[0, 2] - 1.0, k[1, 2] - 1.0  # 1-based -> 0-based
        if not (np.isfinite([fx, fy, cx, cy]).all() and fx > 0 and fy > 0):
            raise ReaderError(
                f"{folder / 'intrinsics.txt'}: invalid intrinsics fx={fx} fy={fy} cx={cx + 1} cy={cy + 1}"
            )
        ext_path = _one_ext(folder / "extrinsics")
        ext = read_matrix(ext_path, None, "extrinsics")
        if ext.shape not in ((3, 3), (3, 4), (4, 4)):
            raise ReaderError(f"{ext_path}: extrinsics has shape {ext.shape}, expected 3x3 or 3x4 (R | 0)")
        if not np.isfinite(ext[:3, :3]).all():
            yield Skip(0, "nonfinite_pose")
            return
        raw = decode_image(depth_path, cv2.IMREAD_UNCHANGED)
        if raw is None:
            yield Skip(0, "corrupt_frame")
            return
        if raw.ndim != 2 or raw.dtype != np.uint16:
            raise ReaderError(
                f"{depth_path}: depth PNG is {raw.dtype} with shape {raw.shape}, expected 16-bit single channel"
            )
        depth = decode_depth(raw)
        if not depth.any():
            yield Skip(0, "empty_depth")
            return
        bgr = decode_image(image_path, cv2.IMREAD_COLOR)
        if bgr is None:
            yield Skip(0, "corrupt_frame")
            return
        if bgr.shape[:2] != depth.shape:
            raise ReaderError(
                f"{depth_path}: depth is {depth.shape[1]}x{depth.shape[0]} but {image_path.name} is "
                f"{bgr.shape[1]}x{bgr.shape[0]} (SUN RGB-D images are registered to depth)"
            )
        src = depth.shape
        intr = scale_intrinsics(fx, fy, cx, cy, src, (out_h, out_w))
        rgb = bgr_to_rgb(resize_rgb(bgr, (out_h, out_w)))
        depth = resize_depth(depth, (out_h, out_w))
        yield Frame(
            0,
            np.ascontiguousarray(rgb),
            np.ascontiguousarray(depth),
            intr,
            gravity_pose(ext[:3, :3]).astype(np.float32),
        )


def _one_ext(folder: Path) -> Path:
    """The extrinsics file: the last ``*.txt`` by name (the toolbox reads the newest annotation)."""
    try:
        files = sorted(p for p in folder.iterdir() if p.suffix == ".txt")
    except OSError:
        raise ReaderError(f"{folder}: extrinsics folder missing or unreadable") from None
    if not files:
        raise ReaderError(f"{folder}: no extrinsics *.txt file")
    return files[-1]


# ----------------------------------------------------------------------------- 2D labels


def name_key(name: str) -> str:
    """An object name compared by its letters and digits only, in lower case ("Night_Stand" -> "nightstand")."""
    return "".join(ch for ch in name.lower() if ch.isalnum())


@lru_cache(maxsize=None)
def _name_table() -> dict[str, int]:
    table = {name_key(n): i + 1 for i, n in enumerate(nyu40_names()[:37])}
    table.update({name_key(n): i + 1 for i, n in enumerate(SUN37)})
    table.update({name_key(n): v for n, v in SUN37_ALIASES.items()})
    return table


def name_to_nyu40(name: str) -> int:
    """NYU40 id (1..37) of a SUN RGB-D object name, 0 when it is not one of the 37 classes."""
    return _name_table().get(name_key(name), 0)


def _cell_strings(arr, path: Path) -> list[str]:
    """A MATLAB cell array (or char matrix) of strings, as scipy.io.loadmat returns it."""
    out = []
    for x in np.asarray(arr, dtype=object).ravel():
        if isinstance(x, str):
            out.append(x)
        elif isinstance(x, np.ndarray) and x.dtype.kind == "U":
            out.append("".join(str(c) for c in x.ravel()))
        else:
            raise ReaderError(f"{path}: 'names' holds a {type(x).__name__}, expected strings (a cell array of names)")
    return out


def read_seg_mat(path: Path) -> tuple[np.ndarray, list[str]]:
    """(seglabel int64 (H, W), names) of an image folder's ``seg.mat``; ReaderError naming it when
    it cannot be read, lacks either variable, or holds an index that is not a whole number >= 0."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ReaderError(f"{path}: reading SUN RGB-D's seg.mat needs scipy (pip install scipy)") from None
    try:
        m = loadmat(str(path), variable_names=["seglabel", "names"])
    except NotImplementedError:
        raise ReaderError(
            f"{path}: a MATLAB v7.3 (HDF5) file; the release's seg.mat is MATLAB v5 (readable by scipy.io.loadmat)"
        ) from None
    except Exception as exc:  # scipy raises several types for a damaged file (ValueError, MatReadError, ...)
        raise ReaderError(f"{path}: unreadable .mat file: {exc}") from None
    for key in ("seglabel", "names"):
        if key not in m:
            raise ReaderError(f"{path}: no variable {key!r} (expected seglabel, the per-pixel index into names)")
    seg = np.asarray(m["seglabel"])
    if seg.ndim != 2 or seg.dtype.kind not in "uifb" or 0 in seg.shape:
        raise ReaderError(f"{path}: seglabel is {seg.dtype} with shape {seg.shape}, expected a 2-D image of indices")
    if seg.dtype.kind == "f" and not (np.isfinite(seg).all() and (seg == np.round(seg)).all()):
        raise ReaderError(f"{path}: seglabel holds values that are not whole numbers")
    seg = seg.astype(np.int64)
    if seg.min() < 0:
        raise ReaderError(f"{path}: seglabel holds the negative index {int(seg.min())}")
    return seg, _cell_strings(m["names"], path)


class SunRGBDLabels(LabelSource):
    """SUN RGB-D's per-image ``seg.mat`` (``<root>/<image folder>/seg.mat``) as ScanNet-20: index ->
    the folder's ``names`` -> NYU40 (the 37 classes) -> ScanNet-20. The only frame of an image folder
    is source_index 0; a folder without ``seg.mat`` has no label image."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.to_scannet20 = nyu40_to_scannet20(IGNORE_INDEX)

    def __call__(self, scene: str, source_index: int) -> np.ndarray | None:
        folder = self.root / scene
        path = folder / SEG_FILE
        if int(source_index) != 0 or not path.is_file():
            return None
        seg, names = read_seg_mat(path)
        top = int(seg.max())
        if top > len(names):
            raise ReaderError(
                f"{path}: seglabel holds class index {top}, outside its names ({len(names)} names, "
                f"indices 1..{len(names)}; 0 = unlabelled)"
            )
        image = _one_file(folder / "image", IMAGE_EXT, "colour image")
        check_label_size(seg.shape, image_hw(image), str(path), str(image))
        lut = np.full(len(names) + 1, IGNORE_INDEX, np.uint8)
        for i, name in enumerate(names):
            lut[i + 1] = self.to_scannet20[name_to_nyu40(name)]
        return lut[seg]
