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
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import cv2
import numpy as np

from lift3d.pipeline.readers.base import BaseReader, Frame, ReaderError, Skip
from lift3d.pipeline.readers.common import (
    bgr_to_rgb,
    decode_image,
    entry_image_size,
    read_matrix,
    resize_depth,
    resize_rgb,
)
from lift3d.pipeline.readers.scannet import scale_intrinsics

GRAVITY_AXES = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # (x, y, z) -> (x, z, -y)
MAX_DEPTH_MM = 8000
DEFAULT_SIZE = (480, 640)
IMAGE_EXT = (".jpg", ".jpeg", ".png")


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
